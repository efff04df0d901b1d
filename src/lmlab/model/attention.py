"""The one attention core: every model (from-scratch and each Hugging Face family) runs this.

A model projects q, k, v, applies its own norms and rotary embedding, and hands
them here; what follows is the same everywhere, so a hook point means the same
activation on every model and the two code paths cannot drift apart: the KV
cache update, the causal mask (narrowed to a sliding window where the layer has
one), GQA's repeated key/value heads, `hook_attn_scores` and `hook_pattern`,
dropout and `hook_z`.

`hook_attn_scores` is TransformerLens's: the scaled scores after the causal
mask, so masked (future or out-of-window) entries are -inf. The mask is applied
again after the hook, so no hook can let a query see the future. PyTorch's
fused `scaled_dot_product_attention` is used whenever neither the scores nor
the pattern is hooked, since only then must they exist as tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.model.points import HookPoint


def add_attention_points(module: nn.Module, rotary: bool, qk_norm: bool) -> None:
    """Give `module` the attention hook points, named and shaped as TransformerLens's.

    q, k, v, rot_q, rot_k and z are [batch, pos, head, d_head] (k and v with the
    key/value heads); q_normed / k_normed [batch, head, pos, d_head] as
    TransformerLens 4 reports them; scores and pattern [batch, head, q_pos, k_pos].
    """
    module.hook_q, module.hook_k, module.hook_v = HookPoint(), HookPoint(), HookPoint()
    if qk_norm:
        module.hook_q_normed, module.hook_k_normed = HookPoint(), HookPoint()
    if rotary:
        module.hook_rot_q, module.hook_rot_k = HookPoint(), HookPoint()
    module.hook_attn_scores, module.hook_pattern = HookPoint(), HookPoint()
    module.hook_z = HookPoint()


def on_heads(point: HookPoint, x: torch.Tensor) -> torch.Tensor:
    """Run a [batch, pos, head, d_head] point on x laid out [batch, head, pos, d_head]."""
    return point(x.transpose(1, 2)).transpose(1, 2)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, T, hd] -> [B, Hkv * n_rep, T, hd], each key/value head serving n_rep queries."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


class KVCache:
    """Keys and values of the positions seen so far, so a new token costs one position.

    The one cache of every model, from-scratch and imported, since all of them
    attend through `attend` below. It holds at most one window (`capacity` =
    block size); each layer's buffers are allocated on its first update, in the
    keys' batch, heads, dtype and device (so grouped-query models keep only their
    key-value heads). When it is full the sampler starts a fresh one from the
    recent half window: every forward pass is then a window the model was trained
    on, starting at position 0. Keys are stored after rotary, at absolute positions,
    so the cache never slides.
    """

    sliding = False

    def __init__(self, n_layer: int, capacity: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.capacity = capacity
        self.pos = 0  # position of the next token

    def reset(self) -> None:
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        end = self.pos + k.size(2)
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} positions exceed {self.capacity}")
        if self.k[layer] is None or self.k[layer].shape[0] != k.size(0):
            self.k[layer] = k.new_zeros(*k.shape[:2], self.capacity, k.size(3))
            self.v[layer] = v.new_zeros(*v.shape[:2], self.capacity, v.size(3))
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def visible(T: int, Tk: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[T, Tk] bool: which keys each query sees; queries are the last T of Tk positions."""
    qpos = torch.arange(Tk - T, Tk, device=device)[:, None]
    kpos = torch.arange(Tk, device=device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask = mask & (qpos - kpos < window)
    return mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, points: nn.Module, *,
           cache: object | None = None, layer: int = 0, scale: float | None = None,
           window: int | None = None, dropout: float = 0.0) -> torch.Tensor:
    """q [B, H, T, hd], k and v [B, Hkv, T, hd] -> z [B, T, H, hd] (after `points.hook_z`).

    `cache.update(layer, k, v)` returns all keys and values so far; `scale`
    None is 1/sqrt(hd); `window` keeps a query to its last `window` keys;
    `dropout` is the probability in training (0 otherwise).
    """
    if cache is not None:
        k, v = cache.update(layer, k, v)
    T, Tk = q.size(2), k.size(2)
    n_rep = q.size(1) // k.size(1)
    mask = None  # None with T > 1: plain causal, which the fused kernel does itself
    if (1 < T < Tk) or (window is not None and Tk > window):
        mask = visible(T, Tk, window, q.device)
    if points.hook_attn_scores.active or points.hook_pattern.active:
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.size(-1) ** -0.5)
        if mask is None and T > 1:
            mask = visible(T, Tk, None, q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        scores = points.hook_attn_scores(scores)
        if mask is not None:  # a hook must not let a query see the future
            scores = scores.masked_fill(~mask, float("-inf"))
        pattern = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        pattern = points.hook_pattern(pattern)
        z = F.dropout(pattern, dropout, training=dropout > 0) @ v
    else:
        if n_rep > 1 and mask is not None:
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        z = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=T > 1 and mask is None,
            scale=scale, enable_gqa=n_rep > 1 and mask is None)
    return points.hook_z(z.transpose(1, 2))
