"""The head and the cross-entropy as one chunked step: full logits are never held.

An imported model's head is large (SmolLM2: 576 -> 49,152). The plain path keeps the
[tokens, vocab] logits, their float32 copy, the softmax and its gradient: at batch 4 x 256
that is ~0.8 GB for one matmul's worth of work. Here the rows go through the head a chunk
at a time, and each chunk's gradients (of the hidden states and, when it trains, of the
head) are made in the same pass as its loss, while its logits are at hand: the logits are
computed once, never recomputed in backward, and backward only scales what forward kept
(the approach of Liger-Kernel's fused linear cross-entropy). The matmuls run in the dtype
they are given (bf16 under autocast), the log-softmax and the loss in float32, so the
result equals `F.cross_entropy(h @ W.T)` to rounding.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # = lmlab.data.sequences.IGNORE_INDEX (the model layer may not import data)
CHUNK_ROWS = 128


def _chunk(hc: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, grads: bool
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A chunk's summed loss and, with `grads`, its gradient wrt the logits in h's dtype."""
    logp = torch.log_softmax(hc @ weight.T, dim=-1, dtype=torch.float32)
    valid = t != IGNORE_INDEX
    rows = valid.nonzero().squeeze(1)
    picked = logp[rows, t[rows]]
    if not grads:
        return -picked.sum(), None
    g = torch.exp(logp, out=torch.empty(logp.shape, dtype=hc.dtype, device=hc.device))
    g[rows, t[rows]] = (picked.exp() - 1.0).to(g.dtype)  # softmax - one-hot, in float32
    if rows.numel() != t.numel():
        g[~valid] = 0
    return -picked.sum(), g


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int, scale: float) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[:2]
        w = weight.to(h.dtype)  # the head once in the matmuls' dtype; its gradient stays fp32
        gh = torch.empty_like(h) if need_h else None
        # a trained head's gradient is one matmul over every chunk's logit gradients (kept in
        # h's dtype, half the plain path's fp32 logits), not one fp32 [vocab, d] sum per chunk
        gz = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device) \
            if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            loss, g = _chunk(h[s:s + chunk], w, targets[s:s + chunk], need_h or need_w)
            total += loss
            if need_h:
                torch.mm(g, w, out=gh[s:s + chunk])
            if need_w:
                gz[s:s + chunk] = g
        gw = (gz.T @ h).float() if need_w else None
        ctx.save_for_backward(gh, gw)
        ctx.scale, ctx.weight_dtype = scale, weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        gh, gw = ctx.saved_tensors
        s = grad.float() * ctx.scale
        gh = None if gh is None else (gh.float() * s).to(gh.dtype)
        gw = None if gw is None else (gw * s).to(ctx.weight_dtype)
        return gh, gw, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Mean next-token loss of `h @ weight.T` against `targets` (IGNORE_INDEX skipped).

    h [..., d], weight [vocab, d], targets [...]. Under autocast the matmuls run in its dtype
    (h and the head are cast once, here); else in h's dtype. The gradients are made in this
    call when autograd will want them, so backward costs nothing more.
    """
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        h = h.to(torch.get_autocast_dtype(dev))
    scale = 1.0 / max(int((targets != IGNORE_INDEX).sum()), 1)
    with torch.autocast(dev, enabled=False):
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(h, weight, targets, chunk, scale)
        w = weight.to(h.dtype)  # evaluation: the losses only
        return sum(_chunk(h[s:s + chunk], w, targets[s:s + chunk], False)[0]
                   for s in range(0, h.shape[0], chunk)) * scale
