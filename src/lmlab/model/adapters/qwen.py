"""QwenAdapter: Qwen2 / Qwen2.5 and Qwen3 causal LMs through `transformers`.

Qwen2 and Qwen2.5 share `Qwen2ForCausalLM` (biases on q/k/v); Qwen3 adds an
RMSNorm over each head of q and k before the rotary embedding, which the shared
decoder applies wherever the attention module has a `q_norm`. So this family is
a declaration only.
"""

from __future__ import annotations

from lmlab.model.adapters.hf import HFCausalLMAdapter


class QwenAdapter(HFCausalLMAdapter):
    architecture_types = ("qwen2", "qwen3")
    hf_classes = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
