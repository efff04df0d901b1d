"""A LoRA layer's forward and backward as one autograd step: y = x W^T + b + s (x A^T) B^T.

PEFT's `lora.Linear` runs `base(x) + lora_B(lora_A(dropout(x))) * scaling` as five autograd
nodes: the scaling and the sum are each a pass over the [tokens, out] output in forward and
again in backward, and the two input gradients are added in a third. Here the LoRA term is
accumulated into the base output by the matmul itself (addmm, alpha = s), and in backward
the LoRA path's input gradient is accumulated into the base's the same way, so those passes
are gone. The frozen weight and bias get no gradient; A and B get theirs in float32.

Used only where it is the same computation as PEFT's: one active adapter, vanilla LoRA (no
DoRA or other variant), dropout 0, not merged, a frozen base and nothing hooking the layer's
parts (a learning rule's forward hooks); otherwise PEFT's own forward runs.
`use_fused_lora` says how many layers it routes.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        dt = x.dtype
        w, ad, bd = weight.to(dt), a.to(dt), b.to(dt)
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ ad.T  # [tokens, r]
        y = x2 @ w.T if bias is None else torch.addmm(bias.to(dt), x2, w.T)
        y.addmm_(xa, bd.T, alpha=scaling)
        ctx.save_for_backward(x2, xa, w, ad, bd)
        ctx.scaling, ctx.shape, ctx.dtypes = scaling, x.shape, (a.dtype, b.dtype)
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, gy: torch.Tensor) -> tuple:
        x2, xa, w, ad, bd = ctx.saved_tensors
        s = ctx.scaling
        g2 = gy.reshape(-1, gy.shape[-1]).to(x2.dtype)
        gb = g2 @ bd  # [tokens, r]
        gx = None
        if ctx.needs_input_grad[0]:
            gx = (g2 @ w).addmm_(gb, ad, alpha=s).view(ctx.shape)
        ga = (gb.T @ x2).mul_(s).to(ctx.dtypes[0]) if ctx.needs_input_grad[3] else None
        gbb = (g2.T @ xa).mul_(s).to(ctx.dtypes[1]) if ctx.needs_input_grad[4] else None
        return gx, None, None, ga, gbb, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """x W^T + bias + scaling (x A^T) B^T, in autocast's dtype when it is on, else in x's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        x = x.to(torch.get_autocast_dtype(dev))
    with torch.autocast(dev, enabled=False):
        return _LoraLinear.apply(x, weight, bias, a, b, scaling)


def _hooked(*modules: nn.Module) -> bool:
    """Whether anything watches these modules' calls (a learning rule's forward hooks)."""
    from torch.nn.modules import module as mm

    return bool(mm._global_forward_hooks or mm._global_forward_pre_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks for m in modules)


def _plain(layer: Any, n: str) -> bool:
    """Whether PEFT's forward would compute exactly `lora_linear` for adapter `n` now."""
    drop, base = layer.lora_dropout[n], layer.base_layer
    frozen = not any(p.requires_grad for p in base.parameters())  # its gradient is not made
    return (frozen and n not in layer.lora_variant and layer.lora_B[n].bias is None
            and not (layer.training and isinstance(drop, nn.Dropout) and drop.p > 0)
            and not _hooked(layer.base_layer, layer.lora_A[n], layer.lora_B[n], drop))


def _forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT's forward unless this is the plain case, which goes through `lora_linear`."""
    names = [n for n in self.active_adapters if n in self.lora_A]
    if (args or kwargs or self.disable_adapters or self.merged or len(names) != 1
            or not _plain(self, names[0])):
        return type(self).forward(self, x, *args, **kwargs)
    n = names[0]
    return lora_linear(x, self.base_layer.weight, self.base_layer.bias,
                       self.lora_A[n].weight, self.lora_B[n].weight, self.scaling[n])


def use_fused_lora(model: nn.Module) -> int:
    """Route every PEFT `lora.Linear` in `model` through `lora_linear`; returns how many."""
    from peft.tuners.lora.layer import Linear

    n = 0
    for m in model.modules():
        if type(m) is Linear and isinstance(m.base_layer, nn.Linear):
            m.forward = types.MethodType(_forward, m)
            n += 1
    return n
