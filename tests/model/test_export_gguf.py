"""`export --format gguf`: a file transformers (a reader lmlab did not write) loads with our logits.

Each model is a tiny random Llama, Qwen2 or Qwen3 with Qwen's real tokenizer, imported
through import-model; the exported file is read back by `transformers`' GGUF loader and by
`import-model`, and its logits on a fixed prompt compared with lmlab's within the outtype's
tolerance.
"""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.model import catalog
from lmlab.model.adapters import adapter_class, load_adapter
from lmlab.model.checkpoint import save_checkpoint
from lmlab.model.export_gguf import export_gguf
from lmlab.model.importer import import_model

from .test_import_export import run_cli
from .test_lora import LORA, lora_adapter, randomise_lora

PROMPT = "Hello world, wherefore art thou? 12345 <|im_start|>"
# max |logit difference| relative to the logits' spread, per outtype (q8_0: 8-bit blocks)
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 1.5e-2, "q8_0": 6e-2}


def _checkpoint(root, tmp_path, kind: str, lora: bool = False):
    """A 'fine-tuned' tiny model of `kind` (weights nudged, or a random LoRA) as a checkpoint."""
    name = f"tiny-{kind}"
    if lora:
        adapter = lora_adapter(root, name)
        randomise_lora(adapter)
    else:
        adapter = adapter_class(kind).from_registry(catalog.resolve(name, root))
        with torch.no_grad():
            adapter.model.model.layers[0].mlp.down_proj.weight.add_(0.05)
    cfg = {"run": {"name": "ft"}, "data": {"path": "data/x", "block_size": 64}}
    path = save_checkpoint(tmp_path / f"run-{kind}-{lora}" / "ckpt_0000005.pt", adapter, step=5,
                           config=cfg, run_id="20260101-ft-abc123")
    return path, adapter.eval()


# transformers' GGUF reader takes no head_dim for qwen3 and assumes Qwen3's 128 (llama.cpp
# reads the key_length the file states); the embedding has rows past the tokenizer's 300 ids
FAMILIES = {"llama": {}, "qwen2": {}, "qwen3": {"tie_word_embeddings": False, "head_dim": 128}}


@pytest.fixture(scope="module")
def shared(tmp_path_factory, bpe_tokenizer_dir):
    """One registry holding a tiny Llama, Qwen2 and Qwen3 (untied head on Qwen3)."""
    from .conftest import make_hf_folder

    root = tmp_path_factory.mktemp("gguf") / "models"
    for kind, over in FAMILIES.items():
        folder = tmp_path_factory.mktemp("src") / f"tiny-{kind}"
        folder.mkdir()
        make_hf_folder(folder, kind, bpe_tokenizer_dir, norm_noise=0.1, vocab_size=320, **over)
        import_model(str(folder), name=f"tiny-{kind}", root=root)
    return root


def _logits_from_transformers(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    ids = tok.encode(PROMPT, add_special_tokens=False)
    with torch.no_grad():
        return ids, model(torch.tensor([ids])).logits[0], tok, model


def _assert_close(theirs: torch.Tensor, ours: torch.Tensor, outtype: str) -> float:
    rel = ((theirs - ours).abs().max() / ours.std()).item()
    assert rel <= TOLERANCE[outtype], f"{outtype}: max |diff| / std = {rel:.2e}"
    return rel


@pytest.mark.parametrize("kind, lora", [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_transformers_loads_the_gguf_with_our_logits_and_tokenizer(shared, tmp_path, kind,
                                                                   lora) -> None:
    path, adapter = _checkpoint(shared, tmp_path, kind, lora)
    out = export_gguf(path, tmp_path / "m.gguf", root=shared)
    ids, theirs, tok, model = _logits_from_transformers(out)
    assert ids == adapter.tokenizer.encode(PROMPT)  # the same tokenizer, special tokens whole
    with torch.no_grad():
        ours = adapter(torch.tensor([ids]))[0]
    _assert_close(theirs, ours, "f32")
    assert model.config.tie_word_embeddings == (kind != "qwen3")
    assert "<|im_start|>hi<|im_end|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False)


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_outtypes_stay_within_their_tolerance_and_shrink_the_file(shared, tmp_path,
                                                                  outtype) -> None:
    path, adapter = _checkpoint(shared, tmp_path, "llama")
    f32 = export_gguf(path, tmp_path / "f32.gguf", root=shared)
    out = export_gguf(path, tmp_path / f"{outtype}.gguf", outtype=outtype, root=shared)
    ids, theirs, _, _ = _logits_from_transformers(out)
    with torch.no_grad():
        ours = adapter(torch.tensor([ids]))[0]
    rel = _assert_close(theirs, ours, outtype)
    assert rel > 0  # it really was rounded
    assert out.stat().st_size < 0.6 * f32.stat().st_size


def test_lineage_and_import_model_round_trip(shared, tmp_path) -> None:
    from gguf import GGUFReader

    from lmlab.config import config_hash

    path, adapter = _checkpoint(shared, tmp_path, "qwen2", lora=True)
    out = export_gguf(path, tmp_path / "ft.gguf", outtype="f32", root=shared)
    fields = {k: f.contents() for k, f in GGUFReader(str(out)).fields.items()
              if k.startswith(("lmlab.", "general.", "tokenizer.ggml.pre"))}
    assert fields["general.base_model.0.name"] == "tiny-qwen2"
    assert fields["lmlab.lineage"] == "tiny-qwen2" and fields["lmlab.step"] == 5
    assert fields["lmlab.run_id"] == "20260101-ft-abc123"
    assert fields["lmlab.config_hash"] == config_hash(torch.load(path, weights_only=True)["config"])
    assert json.loads(fields["lmlab.finetune"])["r"] == LORA["r"]
    assert fields["lmlab.lora_merged"] is True and fields["tokenizer.ggml.pre"] == "qwen2"

    e = import_model(str(out), name="back", root=shared)
    assert (e["architecture_type"], e["source"]) == ("qwen2", "gguf")
    back = adapter_class("qwen2").from_registry(catalog.resolve("back", shared)).eval()
    ids = torch.tensor([adapter.tokenizer.encode(PROMPT)])
    with torch.no_grad():
        torch.testing.assert_close(back(ids), adapter(ids), atol=1e-4, rtol=1e-4)


def test_bad_inputs_name_the_problem_and_the_fix(shared, tmp_path) -> None:
    path, _ = _checkpoint(shared, tmp_path, "llama")
    out = export_gguf(path, tmp_path / "a.gguf", root=shared)
    before = out.read_bytes()
    with pytest.raises(LmlabError, match="exists.*--force"):
        run_cli(["export", "--checkpoint", str(path), "--out", str(out), "--format", "gguf",
                 "--models-dir", str(shared)])
    assert out.read_bytes() == before
    run_cli(["export", "--checkpoint", str(path), "--out", str(out), "--format", "gguf",
             "--outtype", "q8_0", "--force", "--models-dir", str(shared)])
    assert out.stat().st_size < len(before)
    with pytest.raises(LmlabError, match="--outtype applies to --format gguf"):
        run_cli(["export", "--checkpoint", str(path), "--out", str(tmp_path / "d"),
                 "--outtype", "q8_0", "--models-dir", str(shared)])

    # a LoRA checkpoint whose base has left the registry
    lora_path, _ = _checkpoint(shared, tmp_path, "qwen2", lora=True)
    other = tmp_path / "other-models"
    with pytest.raises(LmlabError, match="LoRA checkpoint.*base model 'tiny-qwen2'"):
        export_gguf(lora_path, tmp_path / "b.gguf", root=other)
    assert not (tmp_path / "b.gguf").exists()


def test_a_family_gguf_export_does_not_write_is_refused(tmp_path, bpe_tokenizer_dir,
                                                        models_root) -> None:
    from .conftest import make_hf_folder

    (tmp_path / "g").mkdir()
    folder = make_hf_folder(tmp_path / "g", "gemma3_text", bpe_tokenizer_dir, vocab_size=320)
    import_model(str(folder), name="g", root=models_root)
    adapter = adapter_class("gemma3_text").from_registry(catalog.resolve("g", models_root))
    path = save_checkpoint(tmp_path / "ckpt_0000001.pt", adapter, step=1, config={})
    with pytest.raises(LmlabError, match="'gemma3_text'.*--format hf"):
        export_gguf(path, tmp_path / "g.gguf", root=models_root)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".g.gguf*"))
    assert load_adapter(path, models_root=models_root)[0] is not None
