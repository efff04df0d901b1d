"""QwenAdapter: Qwen2 / Qwen2.5 and Qwen3 causal LMs through `transformers`.

Qwen2 and Qwen2.5 share `Qwen2ForCausalLM` (biases on q/k/v); Qwen3 adds an
RMSNorm over each head of q and k before the rotary embedding, which is the one
place this family's forward differs from the shared Llama-style decoder.
"""

from __future__ import annotations

import torch
from torch import nn

from lmlab.model.adapters.hf import HFCausalLMAdapter


class QwenAdapter(HFCausalLMAdapter):
    architecture_types = ("qwen2", "qwen3")
    hf_classes = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

    def _qk_norm(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen3's per-head q/k RMSNorm (absent on Qwen2, whose attention has no q_norm)."""
        if hasattr(attn, "q_norm"):
            return attn.q_norm(q), attn.k_norm(k)
        return q, k
