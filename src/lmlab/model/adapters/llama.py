"""LlamaAdapter: Llama-architecture causal LMs (Llama 2/3, SmolLM2, TinyLlama) via `transformers`.

The whole adapter is this declaration: the shared decoder in `lmlab.model.adapters.hf`
already is Llama's forward, which is the point of this file, the proof that a
new family is one new file in `model/adapters/` and nothing else changes.
"""

from __future__ import annotations

from lmlab.model.adapters.hf import HFCausalLMAdapter


class LlamaAdapter(HFCausalLMAdapter):
    architecture_types = ("llama",)
    hf_classes = {"llama": "LlamaForCausalLM"}
