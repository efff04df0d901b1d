"""Built-in backward hooks: custom gradients via torch.autograd.Function.

Each leaves the forward value untouched and changes only what flows back
through the hook point.
"""

from __future__ import annotations

import torch

from lmlab.hooks.registry import register


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


@register("backward")
def grad_scale(x: torch.Tensor, point: str, *, factor: float = 1.0) -> torch.Tensor:
    """Multiply the gradient flowing back through this point by `factor`."""
    return _GradScale.apply(x, factor)
