"""The head and the cross-entropy as one chunked step: full logits are never held.

An imported model's head is large (SmolLM2: 576 -> 49,152). The plain path keeps the
[tokens, vocab] logits, their float32 copy, the softmax and its gradient: at batch 4 x 256
that is ~0.8 GB for one matmul's worth of work. Here the rows go through the head a chunk
at a time, keeping only each row's logsumexp (one float per token); backward recomputes a
chunk's logits and turns them straight into the gradients of the hidden states and (when
it trains) of the head. The matmuls run in the dtype they are given (bf16 under autocast),
the softmax and the loss in float32, so the result equals `F.cross_entropy(h @ W.T)` to
rounding.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # = lmlab.data.sequences.IGNORE_INDEX (the model layer may not import data)
CHUNK_ROWS = 1024


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            z = (h[s:s + chunk] @ weight.T).float()
            lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
            t = targets[s:s + chunk]
            picked = z.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
            total += ((lse[s:s + chunk] - picked) * (t != IGNORE_INDEX)).sum()
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        h, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        for s in range(0, h.shape[0], ctx.chunk):
            hc, t = h[s:s + ctx.chunk], targets[s:s + ctx.chunk]
            p = torch.exp((hc @ weight.T).float() - lse[s:s + ctx.chunk].unsqueeze(1))
            valid = t != IGNORE_INDEX
            p[valid, t[valid]] -= 1.0  # softmax - one-hot
            p = (p * (valid.unsqueeze(1) * grad)).to(h.dtype)
            if need_h:
                gh[s:s + ctx.chunk] = p @ weight
            if need_w:
                gw += (p.T @ hc).float()
        return gh, (gw.to(weight.dtype) if need_w else None), None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Mean next-token loss of `h @ weight.T` against `targets` (IGNORE_INDEX skipped).

    h [..., d], weight [vocab, d], targets [...]. Under autocast the matmuls run in its dtype
    (the inputs are cast once, here, so backward needs no autocast); else in h's dtype.
    """
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        h, weight = h.to(dt), weight.to(dt)
    elif weight.dtype != h.dtype:
        weight = weight.to(h.dtype)
    with torch.autocast(dev, enabled=False):
        total = _LinearCrossEntropy.apply(h, weight, targets, chunk)
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
