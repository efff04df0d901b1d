"""Every adapter computes its family's transformers forward exactly; other families are refused.

One parametrised test runs over every model_type an adapter covers, from the
tiny random config the adapter itself supplies (`tiny_config`), with norm gains
moved off their initial values so a gain applied twice or not at all shows.
A new family adapter is therefore checked the moment its file exists.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.model.adapters import adapter_class, supported_architectures
from lmlab.model.importer import import_model

from .conftest import random_model

IDX = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("model_type", sorted(supported_architectures()))
def test_logits_equal_transformers_with_and_without_cache(model_type: str, tmp_path: Path
                                                          ) -> None:
    from transformers import AutoModelForCausalLM, DynamicCache

    cls = adapter_class(model_type)
    random_model(cls.tiny_config(model_type), norm_noise=0.3).save_pretrained(str(tmp_path))
    adapter = cls.from_folder(tmp_path, {}).eval()

    def hf(attn: str) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                    attn_implementation=attn).eval()

    sdpa, eager = hf("sdpa"), hf("eager")
    with torch.no_grad():
        assert torch.equal(adapter(IDX), sdpa(IDX).logits)  # fused kernel, same as transformers
        ref = eager(IDX).logits
        handles = [p.register_forward_hook(lambda m, i, o: o)
                   for p in adapter.hook_points().values()]
        assert adapter.uses_eager_attention(0)
        assert torch.equal(adapter(IDX), ref)  # every point hooked: transformers' eager maths
        for h in handles:
            h.remove()
        # the KV cache: prefill, one token, the rest; against transformers' own cached forward
        ours, theirs, hf_cache = adapter.new_cache(2), [], DynamicCache(config=sdpa.config)
        for a, b in [(0, 5), (5, 6), (6, 12)]:
            theirs.append(sdpa(IDX[:, a:b], cache=hf_cache, use_cache=True).logits)
        cached = torch.cat([adapter(IDX[:, a:b], ours) for a, b in [(0, 5), (5, 6), (6, 12)]], 1)
    torch.testing.assert_close(cached, torch.cat(theirs, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached, ref, atol=1e-5, rtol=1e-5)


def _save_config(folder: Path, config) -> Path:
    folder.mkdir()
    config.save_pretrained(str(folder))  # config.json only: refusal must come before weights
    return folder


def test_uncovered_families_are_refused_at_import(tmp_path: Path) -> None:
    """Phi-3 (fused qkv) and Gemma 2 (soft-capping) would run wrongly on the shared decoder."""
    from transformers import Gemma2Config, Gemma3TextConfig, Phi3Config

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    supported = ", ".join(sorted(supported_architectures()))
    assert supported == "gemma3_text, llama, qwen2, qwen3"
    for name, config in [("phi3", Phi3Config(**small)), ("gemma2", Gemma2Config(**small))]:
        folder = _save_config(tmp_path / name, config)
        with pytest.raises(LmlabError, match=f"'{name}' model.*Supported model types: "
                                             f"{supported}"):
            import_model(str(folder), root=tmp_path / "models")
    capped = _save_config(tmp_path / "capped", Gemma3TextConfig(**small,
                                                                final_logit_softcapping=30.0))
    with pytest.raises(LmlabError, match="final_logit_softcapping=30.0"):
        import_model(str(capped), root=tmp_path / "models")
    assert not (tmp_path / "models" / "registry.json").exists()
