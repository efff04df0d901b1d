"""Built-in backward hooks: custom gradients via torch.autograd.Function.

Each leaves the forward value untouched (straight_through aside, whose forward
is the quantiser) and changes only what flows back through the hook point.

The learning rules (feedback alignment, sign-symmetry, Kolen-Pollack, DFA,
the shallow control), which replace how credit reaches whole layers rather
than transform one activation's gradient, are in `lmlab.hooks.rules`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from lmlab.hooks.forward import Noise, NoiseState
from lmlab.hooks.registry import register


class _GradMap(torch.autograd.Function):
    """Identity forward; backward applies `fn` to the gradient arriving at the point."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.fn(grad), None


@register("backward")
def grad_scale(x: torch.Tensor, point: str, *, factor: float = 1.0) -> torch.Tensor:
    """Multiply the gradient flowing back through this point by `factor`."""
    return _GradMap.apply(x, lambda g: g * factor)


@register("backward")
def grad_clip(x: torch.Tensor, point: str, *, max_norm: float = 1.0) -> torch.Tensor:
    """Rescale the gradient at this point (whole tensor) to norm at most `max_norm`."""
    return _GradMap.apply(x, lambda g: g * torch.clamp(max_norm / (g.norm() + 1e-12), max=1.0))


@register("backward")
class grad_noise(NoiseState):
    """Add Gaussian noise of std `std` to the gradient at this point (seed as for add_noise)."""

    def __init__(self, *, std: float = 0.01, seed: int | None = None) -> None:
        self.std, self.noise = std, Noise(seed)

    def __call__(self, x: torch.Tensor, point: str) -> torch.Tensor:
        return _GradMap.apply(x, lambda g: g + self.std * self.noise.randn_like(g))


@register("backward")
def stop_gradient(x: torch.Tensor, point: str) -> torch.Tensor:
    """Let the value through but no gradient back (what lies upstream learns nothing via here)."""
    return x.detach()


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: str) -> torch.Tensor:
        return torch.sign(x) if fn == "sign" else torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


@register("backward")
def straight_through(x: torch.Tensor, point: str, *,
                     fn: Literal["sign", "round"] = "sign") -> torch.Tensor:
    """Quantise the value (sign or round) but pass the gradient through as if the identity."""
    return _StraightThrough.apply(x, fn)
