"""nanoGPT's model and training step, re-implemented as the baseline to measure against.

Why it exists: issue 5 asks lmlab to be faster than nanoGPT on the same
machine, and ratios measured on a loaded 2-core machine only mean something
when both sides run interleaved in one process. So this is a faithful
re-implementation (written from the description of Karpathy's nanoGPT
`model.py` and `train.py`, not copied) of what runs when nanoGPT trains on CPU:

- GPT: token + learned position embeddings, dropout, N pre-LN blocks, final
  LayerNorm, LM head tied to the token embedding; LayerNorm with optional bias.
- CausalSelfAttention: one `c_attn` Linear for q, k, v, split, heads via
  view/transpose, `scaled_dot_product_attention(is_causal=True)` (the "flash"
  path), `c_proj`, residual dropout.
- MLP: `c_fc` to 4x width, `nn.GELU()` (exact erf), `c_proj`, dropout.
- Init: N(0, 0.02), residual projections N(0, 0.02/sqrt(2L)), zero biases.
- Loss: cross-entropy over the full [B*T, V] logits, `ignore_index=-1`.
- Optimizer: AdamW with decay on >= 2-D tensors only; nanoGPT asks for the fused
  kernel only when `device_type == "cuda"`, so on CPU it runs the default
  (foreach) AdamW. `fused=True` is available here for a like-for-like check.
- Step (train.py): forward with `nullcontext()` on CPU (no autocast; fp32),
  backward, clip at 1.0, `optimizer.step()`, `zero_grad(set_to_none=True)`,
  next batch drawn with `torch.randint` + `torch.stack` of numpy slices;
  `loss.item()` only at log intervals.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 97
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch's own once lacked `bias=False`)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None,
                                           dropout_p=self.dropout if self.training else 0,
                                           is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                   ignore_index=-1)
        else:  # inference: only the last position
            logits, loss = self.lm_head(x[:, [-1], :]), None
        return logits, loss

    def configure_optimizers(self, weight_decay: float, learning_rate: float,
                             betas: tuple[float, float], device_type: str,
                             fused: bool | None = None) -> torch.optim.AdamW:
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        nodecay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": nodecay, "weight_decay": 0.0}]
        if fused is None:  # nanoGPT: fused only on CUDA
            fused = device_type == "cuda"
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)


class NanoGPTTrainer:
    """train.py's inner loop on CPU: one `step()` is one optimizer step."""

    def __init__(self, data: np.ndarray, config: GPTConfig, batch_size: int,
                 lr: float = 1e-3, grad_clip: float = 1.0, fused: bool | None = None,
                 seed: int = 1337) -> None:
        torch.manual_seed(seed)
        self.data, self.config, self.batch_size = data, config, batch_size
        self.grad_clip = grad_clip
        self.model = GPT(config)
        self.model.train()
        self.optimizer = self.model.configure_optimizers(0.1, lr, (0.9, 0.99), "cpu", fused)
        self.ctx = nullcontext()  # device_type == 'cpu' -> no autocast
        self.X, self.Y = self.get_batch()

    def get_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        bs = self.config.block_size
        ix = torch.randint(len(self.data) - bs, (self.batch_size,))
        x = torch.stack([torch.from_numpy(self.data[i:i + bs].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(self.data[i + 1:i + 1 + bs].astype(np.int64))
                         for i in ix])
        return x, y

    def step(self, want_loss: bool = False, lr: float | None = None) -> float | None:
        if lr is not None:  # train.py sets the scheduled lr on every group each iteration
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        with self.ctx:
            _, loss = self.model(self.X, self.Y)
        self.X, self.Y = self.get_batch()  # prefetch, as train.py does
        loss.backward()
        if self.grad_clip != 0.0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item() if want_loss else None
