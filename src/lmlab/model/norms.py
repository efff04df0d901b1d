"""Norm hook points: `hook_scale` and `hook_normalized`, as TransformerLens defines them.

`hook_scale` [batch, pos, 1] is sqrt(mean(x^2) + eps) (x centred first for a
LayerNorm) and `hook_normalized` [batch, pos, d_model] is x / scale, the stream
BEFORE the norm's gain (and bias), both in float32. Logit-lens code ported from
TransformerLens therefore applies the gain once, as it expects.

Unhooked, a norm is the model's own module (nn.LayerNorm's fused kernel,
Hugging Face's RMSNorm), so logits equal the original's bit for bit. Hooked,
the two values are computed for the hooks; if the hooks only read them (return
the very tensor they were given) the output is still the module's own, and if a
hook replaces one, the output is rebuilt from the replacement: gain(normalized).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmlab.model.points import HookPoint

Gain = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (normalized fp32, x) -> output


class NormPoints(nn.Module):
    """The hook points of one norm (e.g. `blocks.{i}.ln1`), holding no parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model], before the gain


def hooked_norm(x: torch.Tensor, norm: nn.Module, points: nn.Module, *, eps: float,
                gain: Gain, center: bool = False) -> torch.Tensor:
    """`norm(x)`, with `points.hook_scale` / `hook_normalized` seeing (and editing) its parts."""
    if not (points.hook_scale.active or points.hook_normalized.active):
        return norm(x)
    xf = x.float()
    if center:
        xf = xf - xf.mean(-1, keepdim=True)
    var = xf.pow(2).mean(-1, keepdim=True) + eps
    scale = var.sqrt()
    hooked_scale = points.hook_scale(scale)
    normalized = xf * torch.rsqrt(var) if hooked_scale is scale else xf / hooked_scale
    hooked = points.hook_normalized(normalized)
    if hooked_scale is scale and hooked is normalized:
        return norm(x)
    return gain(hooked, x)


def layer_norm_gain(ln: nn.LayerNorm) -> Gain:
    """nn.LayerNorm's affine part: normalized * weight + bias, in the input's dtype."""
    def gain(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = h * ln.weight if ln.weight is not None else h
        return (out + ln.bias if ln.bias is not None else out).to(x.dtype)

    return gain


def layer_norm(x: torch.Tensor, ln: nn.LayerNorm, points: nn.Module) -> torch.Tensor:
    """An nn.LayerNorm with TransformerLens's norm hook points."""
    return hooked_norm(x, ln, points, eps=ln.eps, gain=layer_norm_gain(ln), center=True)

