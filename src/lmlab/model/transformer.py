"""The from-scratch decoder-only Transformer, with named hook points.

Pre-LayerNorm blocks of causal self-attention and MLP, a final LayerNorm and an
LM head tied to the token embedding, in the manner of nanoGPT. Every place an
experiment may touch is a `HookPoint` named as TransformerLens names it.
Attention after the q/k/v projections (and rotary) is the shared core in
`lmlab.model.attention`, which every imported family runs too, and the norms
expose TL's `ln1` / `ln2` / `ln_final` points through `lmlab.model.norms`; the
LayerNorm weights keep their nanoGPT names `ln_1` / `ln_2`, so checkpoints load
as before.

The speedrun knobs (modded-nanogpt's) are config fields whose defaults give
nanoGPT's model exactly: RMSNorm, ReLU^2 or SwiGLU MLPs, QK-norm, an untied
head, logit soft-capping, zero-initialised output projections, value
embeddings and a skip from the embedding into every block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ModelConfig
from lmlab.model.attention import KVCache, add_attention_points, attend, on_heads
from lmlab.model.norms import Gain, NormPoints, RMSNorm, hooked_norm, layer_norm, layer_norm_gain
from lmlab.model.points import HookPoint


@dataclass
class TransformerConfig(ModelConfig):
    """The config's `model` section (declared once, in lmlab.config, which every layer may
    import) plus what the data decides: the vocabulary and the window."""

    vocab_size: int = 97
    block_size: int = 256

    def to_dict(self) -> dict:
        """The network's shape as checkpoints hold it (`model_config`): no pretrained-only keys."""
        d = asdict(self)
        for key in PRETRAINED_ONLY:
            d.pop(key)
        return {"vocab_size": d.pop("vocab_size"), "block_size": d.pop("block_size"), **d}


PRETRAINED_ONLY = ("model_name", "dtype")  # the adapter's business, not the network's


def rotary_tables(positions: torch.Tensor, head_dim: int) -> torch.Tensor:
    """cos + i sin of each position's angle per pair of channels, [T, head_dim / 2] complex."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=positions.device) / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    return torch.complex(angles.cos(), angles.sin())


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent channel pair (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos).

    As one complex product: five times faster on a CPU than the same maths on
    strided halves, and the same numbers to the last bit or two.
    """
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def sinusoidal_table(n: int, d: int) -> torch.Tensor:
    pos = torch.arange(n).float()[:, None]
    div = torch.exp(torch.arange(0, d, 2).float() * (-math.log(10000.0) / d))
    table = torch.zeros(n, d)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div[: d // 2])
    return table


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        add_attention_points(self, rotary=cfg.pos_encoding == "rotary", qk_norm=cfg.qk_norm)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor, rotary: torch.Tensor | None, cache: KVCache | None,
                layer: int, ve: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        if ve is not None:
            v = v + ve.view_as(v)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B,H,T,hd]
        if hasattr(self, "q_norm"):  # QK-norm, before rotary
            q, k = self.hook_q_normed(self.q_norm(q)), self.hook_k_normed(self.k_norm(k))
        if rotary is not None:
            q = on_heads(self.hook_rot_q, apply_rotary(q, rotary))
            k = on_heads(self.hook_rot_k, apply_rotary(k, rotary))
        z = attend(q, k, v, self, cache=cache, layer=layer,
                   dropout=self.dropout if self.training else 0.0)
        return self.proj(z.reshape(B, T, C))


def swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)  # fc holds gate and up: 2 x d_ff outputs
    return F.silu(gate) * up


def relu2(h: torch.Tensor) -> torch.Tensor:
    return F.relu(h).square()


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu, "relu2": relu2, "swiglu": swiglu}


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.activation = ACTIVATIONS[cfg.mlp]  # chosen once, not per call
        width = 2 * cfg.d_ff if cfg.mlp == "swiglu" else cfg.d_ff
        self.fc = nn.Linear(cfg.d_model, width, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()  # hook_post: the activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.hook_post(self.activation(self.hook_pre(self.fc(x)))))


def make_norm(d: int, cfg: TransformerConfig) -> nn.Module:
    """nanoGPT's LayerNorm, or RMSNorm (`model.norm`); both keep the parameter name `weight`."""
    return nn.LayerNorm(d, bias=cfg.bias) if cfg.norm == "layernorm" else RMSNorm(d, eps=1e-5)


def rms_norm_gain(norm: nn.RMSNorm) -> Gain:
    return lambda h, x: (h * norm.weight).to(x.dtype)


def apply_norm(x: torch.Tensor, norm: nn.Module, points: nn.Module) -> torch.Tensor:
    """The norm with TransformerLens's points (hook_normalized is before the gain, either kind)."""
    if isinstance(norm, nn.RMSNorm):
        return hooked_norm(x, norm, points, eps=norm.eps, gain=rms_norm_gain(norm))
    return layer_norm(x, norm, points)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(cfg.d_model, cfg)
        self.attn = Attention(cfg)
        self.ln_2 = make_norm(cfg.d_model, cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        # TransformerLens's blocks.{i}.ln1 / ln2 points; the weights keep their names ln_1 / ln_2
        self.ln1, self.ln2 = NormPoints(), NormPoints()
        if cfg.embed_skip:
            self.skip = nn.Parameter(torch.zeros(1))
        self.hook_resid_pre, self.hook_resid_mid = HookPoint(), HookPoint()
        self.hook_resid_post = HookPoint()
        self.hook_attn_out, self.hook_mlp_out = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor, rotary: torch.Tensor | None, cache: KVCache | None,
                layer: int, x0: torch.Tensor | None = None,
                ve: torch.Tensor | None = None) -> torch.Tensor:
        if x0 is not None:
            x = x + self.skip * x0
        x = self.hook_resid_pre(x)
        h = apply_norm(x, self.ln_1, self.ln1)
        attn_out = self.hook_attn_out(self.drop(self.attn(h, rotary, cache, layer, ve)))
        x = self.hook_resid_mid(x + attn_out)
        mlp_out = self.hook_mlp_out(self.drop(self.mlp(apply_norm(x, self.ln_2, self.ln2))))
        return self.hook_resid_post(x + mlp_out)


class FinalNorm(nn.LayerNorm):
    """The final LayerNorm, holding its own `ln_final.hook_scale` / `hook_normalized` points."""

    def __init__(self, d: int, bias: bool) -> None:
        super().__init__(d, bias=bias)
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hooked_norm(x, super().forward, self, eps=self.eps, gain=layer_norm_gain(self),
                           center=True)


class FinalRMSNorm(RMSNorm):
    """The final norm when `model.norm: rmsnorm`, with the same points as FinalNorm."""

    def __init__(self, d: int) -> None:
        super().__init__(d, eps=1e-5)
        self.hook_scale, self.hook_normalized = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hooked_norm(x, super().forward, self, eps=self.eps, gain=rms_norm_gain(self))


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos_encoding == "learned":
            self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)
        elif cfg.pos_encoding == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_table(cfg.block_size, cfg.d_model),
                                 persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_final = (FinalNorm(cfg.d_model, cfg.bias) if cfg.norm == "layernorm"
                         else FinalRMSNorm(cfg.d_model))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if cfg.value_embed:
            self.value_embeds = nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.d_model)
                                              for _ in range(cfg.n_layer))
        self.hook_embed = HookPoint()
        if cfg.pos_encoding != "rotary":  # rotary has no position embedding to hook
            self.hook_pos_embed = HookPoint()
        self.hook_logits = HookPoint()
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.zero_init_proj:  # blocks start as the identity; an untied head predicts uniform
            for name, p in self.named_parameters():  # (a tied head is wte, so not listed)
                if name.endswith("proj.weight") or name == "lm_head.weight":
                    nn.init.zeros_(p)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Token ids [B, T] -> logits [B, T, vocab]; with a cache, T continues from cache.pos."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        positions = torch.arange(start, start + T, device=idx.device)
        x = self.hook_embed(self.wte(idx))
        rotary = None
        if self.cfg.pos_encoding == "rotary":
            rotary = rotary_tables(positions, self.cfg.d_model // self.cfg.n_head)
        else:
            if start + T > self.cfg.block_size:
                raise ValueError(f"{start + T} positions exceed block_size {self.cfg.block_size}")
            table = self.wpe.weight if self.cfg.pos_encoding == "learned" else self.sinusoid
            x = x + self.hook_pos_embed(table[start:start + T].expand(B, T, -1))
        x = x0 = self.drop(x)
        for i, block in enumerate(self.blocks):
            ve = self.value_embeds[i](idx) if self.cfg.value_embed else None
            x = block(x, rotary, cache, i, x0 if self.cfg.embed_skip else None, ve)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.ln_final(x))
        if self.cfg.logit_softcap:
            logits = self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)
        return self.hook_logits(logits)

    def new_cache(self, batch_size: int = 1, device: torch.device | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """A cache of one window; its buffers take the batch, device and dtype of the keys."""
        return KVCache(self.cfg.n_layer, self.cfg.block_size)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())  # a tied head is counted once
        if non_embedding and self.cfg.pos_encoding == "learned":
            n -= self.wpe.weight.numel()
        return n
