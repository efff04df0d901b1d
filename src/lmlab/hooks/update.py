"""Built-in update-rule hooks: gradient transforms applied just before optimizer.step()."""

from __future__ import annotations

import torch

from lmlab.hooks.registry import register


@register("update")
def clip_per_param(named_params: list, *, step: int, lr: float, max_norm: float = 1.0) -> None:
    """Clip each parameter's gradient to `max_norm` on its own (not one global norm)."""
    for _, p in named_params:
        norm = p.grad.norm()
        p.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
