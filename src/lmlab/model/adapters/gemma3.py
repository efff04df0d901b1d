"""Gemma3Adapter: Gemma 3 text models (gemma-3-270m, gemma-3-1b) through `transformers`.

Where Gemma 3's block differs from Llama's, and what this file overrides:

- a norm before AND after attention and the MLP (`_block`), whose points are
  TransformerLens's `ln1`, `ln1_post`, `ln2`, `ln2_post`; `hook_attn_out` and
  `hook_mlp_out` are what is added to the residual stream, i.e. after the
  post-norm, as in TL (so resid_mid = resid_pre + attn_out on every family);
- RMSNorm with gain (1 + weight), computed in float32 (`_norm`);
- one rotary table per layer type: local (sliding-window) layers and global
  layers use different bases (`_rope`).

Everything else is the shared decoder: the scaled embedding is Hugging Face's
own module, the per-head q/k norms are `q_norm` / `k_norm` and a sliding layer's
window is its attention's `sliding_window`, both already read by `hf.py`.
Configs with attention or final-logit soft-capping (Gemma 2's; off in Gemma 3)
or bidirectional attention are refused rather than run wrongly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.model.adapters.hf import HFCausalLMAdapter
from lmlab.model.attention import KVCache
from lmlab.model.norms import hooked_norm


class Gemma3Adapter(HFCausalLMAdapter):
    architecture_types = ("gemma3_text",)
    hf_classes = {"gemma3_text": "Gemma3ForCausalLM"}
    block_norms = ("ln1", "ln1_post", "ln2", "ln2_post")

    @classmethod
    def check_config(cls, hf_config: dict[str, Any]) -> None:
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if hf_config.get(key) is not None:
                raise LmlabError(f"This Gemma 3 config sets {key}={hf_config[key]}; lmlab's "
                                 "adapter does not compute soft-capping, so it refuses the model.")
        if hf_config.get("use_bidirectional_attention"):
            raise LmlabError("This Gemma 3 config uses bidirectional attention; lmlab's adapter "
                             "is causal only, so it refuses the model.")

    @classmethod
    def tiny_config(cls, model_type: str, **over: Any) -> Any:
        """Three layers, two of them local with a window of 4, and a query scale not 1/sqrt(hd)."""
        kw = dict(num_hidden_layers=3, sliding_window=4, query_pre_attn_scalar=16,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention"])
        return super().tiny_config(model_type, **(kw | over))

    def _rope(self, x: torch.Tensor, position_ids: torch.Tensor) -> list[tuple]:
        base = self.model.model
        types = base.config.layer_types
        tables = {t: tuple(c.unsqueeze(1) for c in base.rotary_emb(x, position_ids, t))
                  for t in set(types)}
        return [tables[t] for t in types]

    def _norm(self, norm: nn.Module, points: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return hooked_norm(x, norm, points, eps=norm.eps,
                           gain=lambda h, x: (h * (1.0 + norm.weight.float())).type_as(x))

    def _block(self, layer: nn.Module, p: nn.Module, x: torch.Tensor, rope: tuple,
               cache: KVCache | None, i: int) -> torch.Tensor:
        x = p.hook_resid_pre(x)
        h = self._attention(layer.self_attn, p.attn, self._norm(layer.input_layernorm, p.ln1, x),
                            rope, cache, i)
        x = p.hook_resid_mid(x + p.hook_attn_out(
            self._norm(layer.post_attention_layernorm, p.ln1_post, h)))
        h = self._mlp(layer.mlp, p.mlp, self._norm(layer.pre_feedforward_layernorm, p.ln2, x))
        return p.hook_resid_post(x + p.hook_mlp_out(
            self._norm(layer.post_feedforward_layernorm, p.ln2_post, h)))
