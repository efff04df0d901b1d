"""Built-in update-rule hooks: gradient transforms applied just before optimizer.step().

Each is `fn(named_params, step=..., lr=..., **params)` and edits `p.grad` in
place; it runs after the loop's global gradient clipping, so what the optimizer
sees is exactly what the last transform left. The optimizer itself is chosen
by name in `train.optimizer` (adamw, sgd, lion, muon).
"""

from __future__ import annotations

from typing import Literal

import torch

from lmlab.hooks.forward import Noise, NoiseState
from lmlab.hooks.registry import register


@register("update")
def clip_per_param(named_params: list, *, step: int, lr: float, max_norm: float = 1.0) -> None:
    """Clip each parameter's gradient to `max_norm` on its own (not one global norm)."""
    for _, p in named_params:
        norm = p.grad.norm()
        p.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))


@register("update")
def normalise(named_params: list, *, step: int, lr: float, eps: float = 1e-8) -> None:
    """Scale each parameter's gradient to unit norm (direction only, per tensor)."""
    for _, p in named_params:
        p.grad.div_(p.grad.norm() + eps)


@register("update")
def sign(named_params: list, *, step: int, lr: float) -> None:
    """Replace each gradient by its sign (signSGD: with plain SGD every weight moves by lr)."""
    for _, p in named_params:
        p.grad.sign_()


@register("update")
class noise(NoiseState):
    """Add Gaussian noise of std `std` to every gradient (seed as for the add_noise hook)."""

    def __init__(self, *, std: float = 1e-3, seed: int | None = None) -> None:
        self.std, self.noise = std, Noise(seed)

    def __call__(self, named_params: list, *, step: int, lr: float) -> None:
        for _, p in named_params:
            p.grad.add_(self.noise.randn_like(p.grad), alpha=self.std)


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximate U V^T of g = U S V^T by Muon's quintic iteration (singular values ~0.7-1.2)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + 1e-7)
    wide = x.shape[0] <= x.shape[1]
    if not wide:
        x = x.t()
    for _ in range(steps):
        s = x @ x.t()
        x = a * x + (b * s + c * s @ s) @ x
    return x if wide else x.t()


@register("update")
def orthogonalise(named_params: list, *, step: int, lr: float,
                  method: Literal["newton_schulz", "svd"] = "newton_schulz",
                  steps: int = 5) -> None:
    """Replace each 2-D gradient by its orthogonal factor U V^T (others are left alone)."""
    for _, p in named_params:
        if p.grad.dim() != 2:
            continue
        g = p.grad.float()
        if method == "svd":
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            o = u @ vh
        else:
            o = newton_schulz(g, steps)
        p.grad.copy_(o.to(p.grad.dtype))
