"""Built-in backward hooks: custom gradients via torch.autograd.Function.

Each leaves the forward value untouched (straight_through aside, whose forward
is the quantiser) and changes only what flows back through the hook point.

Feedback alignment (Lillicrap et al., 2016) is the one rule that is not a
transform of an activation's gradient: the gradient a linear layer sends to
its input is `g @ B` with a fixed random `B` in place of the weight `W`, while
the weight's own gradient stays the true `g^T x`. So the hook is handed the
point (any point of an MLP, e.g. `blocks.*.mlp.hook_pre`), finds the linear
layers of the MLP that owns it, and puts a PyTorch forward hook on each that
reroutes the output through `_FeedbackLinear`; detaching removes those hooks
like any other. The loop and the model code are untouched.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmlab.errors import LmlabError
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


# --- feedback alignment -------------------------------------------------------------


class _FeedbackLinear(torch.autograd.Function):
    """y = x W^T + b forward (given, already computed); backward sends g @ B to x.

    The weight and bias gradients are the true ones; only the input's differs.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                feedback: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, feedback)
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, feedback = ctx.saved_tensors
        gx = g @ feedback.to(g.device, g.dtype) if ctx.needs_input_grad[0] else None
        g2 = g.reshape(-1, g.shape[-1])
        gw = (g2.t() @ x.reshape(-1, x.shape[-1]).to(g.dtype)).to(ctx.weight_dtype) \
            if ctx.needs_input_grad[1] else None
        gb = g2.sum(0).to(ctx.weight_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None


def feedback_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    feedback: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) whose backward sends `g @ feedback` to x (true weight grads).

    Pass `y` when the linear's output is already computed, to reuse it.
    """
    if y is None:
        with torch.no_grad():
            y = torch.nn.functional.linear(x, weight, bias)
    return _FeedbackLinear.apply(x, weight, bias, feedback, y.detach())


def mlp_module(adapter: Any, layer: int) -> nn.Module:
    """The MLP of block `layer`: `blocks.i.mlp` (from-scratch) or `model.layers.i.mlp` (HF)."""
    net = adapter.network
    for path in (f"blocks.{layer}.mlp", f"model.layers.{layer}.mlp", f"layers.{layer}.mlp"):
        try:
            return net.get_submodule(path)
        except AttributeError:
            continue
    raise LmlabError(f"feedback_alignment cannot find the MLP of block {layer} in "
                     f"{type(net).__name__}.")


@register("backward", points="blocks.*.mlp.*")
class feedback_alignment:
    """Feedback alignment for the MLP linears of the matched blocks: fixed random B replaces W^T.

    `at` names any point of the MLPs to change (e.g. `blocks.*.mlp.hook_pre`).
    Each linear gets its own B ~ N(0, std^2), drawn from `seed`, the block and
    the layer's name only, so a resumed run gets the same matrices. The
    default std 0.02 is the usual init scale of these weights (GPT-2, Llama,
    Qwen), so B starts as large as the W it stands in for, as in Lillicrap et al.
    """

    def __init__(self, *, seed: int = 0, std: float = 0.02) -> None:
        self.seed, self.std = seed, std
        self.feedback: dict[str, torch.Tensor] = {}
        self._done: set[int] = set()

    def attach(self, adapter: Any, point: str, run_dir: Path | None) -> list:
        layer = int(re.match(r"blocks\.(\d+)\.", point).group(1))
        if layer in self._done:  # several points of one MLP matched: hook it once
            return []
        self._done.add(layer)
        handles = []
        for name, linear in mlp_module(adapter, layer).named_modules():
            if isinstance(linear, nn.Linear):
                key = f"blocks.{layer}.mlp.{name}"
                self.feedback[key] = b = self._matrix(key, linear.weight)
                handles.append(linear.register_forward_hook(self._hook(b)))
        if not handles:
            raise LmlabError(f"feedback_alignment found no linear layer in block {layer}'s MLP.")
        return handles

    def _matrix(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))
        b = torch.randn(weight.shape, generator=gen) * self.std
        return b.to(weight.device, weight.dtype)

    @staticmethod
    def _hook(b: torch.Tensor):
        def hook(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not torch.is_grad_enabled():
                return None
            return feedback_linear(inputs[0], module.weight, module.bias, b, output)

        return hook

    def close(self) -> None:
        self._done.clear()
