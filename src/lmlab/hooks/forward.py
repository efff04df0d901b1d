"""Built-in forward hooks: change an activation on its way through the model."""

from __future__ import annotations

import torch

from lmlab.hooks.registry import register


@register("forward")
def scale(x: torch.Tensor, point: str, *, factor: float = 1.0) -> torch.Tensor:
    """Multiply the activation by `factor` (0 ablates it)."""
    return x * factor
