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


class _RMSNormFunction(torch.autograd.Function):
    """x * rsqrt(mean(x^2) + eps) * weight, in float32 at least, with its backward by hand.

    torch's rms_norm has no fused CPU kernel: autograd through its composite ops
    takes ~1.4x as long as this forward and backward (LayerNorm's is fused).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        r = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))
        normalized = xf * r
        ctx.save_for_backward(normalized, r, weight)
        return (normalized * weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        normalized, r, weight = ctx.saved_tensors
        g = grad.to(normalized.dtype)
        gn = g * weight
        dx = (gn - normalized * (gn * normalized).mean(-1, keepdim=True)).mul_(r)
        dw = (g * normalized).flatten(0, -2).sum(0)
        return dx.to(grad.dtype), dw.to(weight.dtype), None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameter, same maths) with a faster forward and backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return _RMSNormFunction.apply(x, self.weight, eps)
