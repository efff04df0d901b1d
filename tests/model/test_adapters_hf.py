"""Hugging Face adapters: lmlab's logits equal transformers' own, and hooks see and replace.

Each tiny random model (of every family an adapter covers, from the adapter's own
`tiny_config`) is saved as a Hugging Face folder and imported through
import-model, so the whole path (folder -> registry -> adapter) is what is checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmlab.model import catalog
from lmlab.model.adapters import adapter_class, supported_architectures
from lmlab.model.adapters.gemma3 import Gemma3Adapter
from lmlab.model.adapters.llama import LlamaAdapter
from lmlab.model.adapters.qwen import QwenAdapter
from lmlab.model.attention import KVCache, visible
from lmlab.model.importer import import_model
from lmlab.model.points import collect_hook_points
from lmlab.model.transformer import Transformer, TransformerConfig

from .conftest import make_hf_folder

KINDS = sorted(supported_architectures())


pytestmark = pytest.mark.usefixtures("one_thread")


def load(name: str, root: Path):
    entry = catalog.resolve(name, root)
    return adapter_class(entry["architecture_type"]).from_registry(entry, None)


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory, qwen_tokenizer_dir):
    """One registry with the three tiny models, imported once for the whole module."""
    root = tmp_path_factory.mktemp("shared") / "models"
    folders = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp("src") / f"tiny-{kind}"
        folder.mkdir()
        folders[kind] = make_hf_folder(folder, kind, qwen_tokenizer_dir, norm_noise=0.3)
        import_model(str(folder), name=f"tiny-{kind}", root=root)
    return root, folders


@pytest.fixture(params=KINDS)
def imported(request, shared_root):
    """A fresh adapter per test (hooks never leak between tests), from the shared catalog."""
    root, folders = shared_root
    kind = request.param
    return kind, folders[kind], load(f"tiny-{kind}", root).eval()


def hf_logits(folder: Path, idx: torch.Tensor, attn: str = "sdpa") -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                             attn_implementation=attn).eval()
    with torch.no_grad():
        return m(idx).logits.float()


IDX = torch.tensor([[9707, 1879, 11, 30686, 6760, 25, 1380, 1324, 1947, 33123, 5267, 220],
                    [151643, 3, 50000, 7, 88, 999, 12345, 100, 101, 102, 103, 104]])


def test_adapter_is_found_by_architecture_type() -> None:
    assert adapter_class("qwen2") is QwenAdapter and adapter_class("qwen3") is QwenAdapter
    assert adapter_class("llama") is LlamaAdapter
    assert adapter_class("gemma3_text") is Gemma3Adapter
    assert set(KINDS) == {"gemma3_text", "llama", "qwen2", "qwen3"}


def test_identity_hooked_logits_equal_transformers(imported) -> None:
    kind, folder, adapter = imported
    ref = hf_logits(folder, IDX)
    handles = [p.register_forward_hook(lambda m, i, o: o) for n, p in
               adapter.hook_points().items() if "attn_scores" not in n and "pattern" not in n]
    with torch.no_grad():
        out = adapter(IDX)
    assert out.dtype == torch.float32 and out.shape == (2, 12, 151680)
    assert torch.equal(out, ref)  # read-only hooks leave transformers' very computation
    assert not adapter.uses_eager_attention(0)
    for h in handles:
        h.remove()


def test_replacing_hook_changes_output_and_removal_restores(imported) -> None:
    _, _, adapter = imported
    with torch.no_grad():
        base = adapter(IDX)
        h = adapter.hook_points()["blocks.0.hook_attn_out"].register_forward_hook(
            lambda m, i, o: torch.zeros_like(o))
        zeroed = adapter(IDX)
        h.remove()
        again = adapter(IDX)
    assert (zeroed - base).abs().max() > 1e-3
    assert torch.equal(again, base)


def test_zeroing_attention_makes_first_block_context_free(imported) -> None:
    """With block 0's attention zeroed, its residual after the block depends on the token only."""
    _, _, adapter = imported
    seen = {}
    pts = adapter.hook_points()
    pts["blocks.0.hook_attn_out"].register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    pts["blocks.0.hook_resid_post"].register_forward_hook(lambda m, i, o: seen.setdefault("r", o))
    with torch.no_grad():
        adapter(torch.tensor([[5, 6, 7, 8]]))
        a = seen.pop("r")
        adapter(torch.tensor([[9, 1, 2, 8]]))
        b = seen.pop("r")
    torch.testing.assert_close(a[0, 3], b[0, 3])
    assert not torch.allclose(a[0, 0], b[0, 0])


def test_pattern_hook_switches_only_that_layer_to_eager(imported) -> None:
    _, folder, adapter = imported
    got = {}
    h = adapter.hook_points()["blocks.1.attn.hook_pattern"].register_forward_hook(
        lambda m, i, o: got.setdefault("p", o))
    assert adapter.uses_eager_attention(1) and not adapter.uses_eager_attention(0)
    with torch.no_grad():
        out = adapter(IDX)
    torch.testing.assert_close(out, hf_logits(folder, IDX, attn="eager"), atol=1e-5, rtol=1e-5)
    p = got["p"]
    assert p.shape == (2, 4, 12, 12)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 12))
    assert p.triu(1).abs().max() == 0  # causal
    h.remove()
    assert not adapter.uses_eager_attention(1)


def test_score_hook_can_replace_scores(imported) -> None:
    """Uniform scores make each query average its visible keys: pattern = 1/(visible keys).

    The scores a hook sees are TransformerLens's: masked entries are already -inf,
    and whatever the hook returns is masked again, so zeroing them cannot unmask
    the future (nor, on a sliding-window layer, the keys outside the window).
    """
    _, _, adapter = imported
    pts = adapter.hook_points()
    got = {}
    for i in range(len(adapter.points.blocks)):
        pts[f"blocks.{i}.attn.hook_attn_scores"].register_forward_hook(
            lambda m, i, o, key=i: got.setdefault(f"s{key}", o) * 0)
        pts[f"blocks.{i}.attn.hook_pattern"].register_forward_hook(
            lambda m, i, o, key=i: got.setdefault(f"p{key}", o))
    with torch.no_grad():
        adapter(IDX[:, :6])
    for i, layer in enumerate(adapter.model.model.layers):
        window = getattr(layer.self_attn, "sliding_window", None)
        seen = visible(6, 6, window, torch.device("cpu"))
        assert torch.isneginf(got[f"s{i}"][:, :, ~seen]).all()  # masked as TL masks them
        assert torch.isfinite(got[f"s{i}"][:, :, seen]).all()
        expected = (seen / seen.sum(-1, keepdim=True)).expand_as(got[f"p{i}"])
        torch.testing.assert_close(got[f"p{i}"], expected)


def test_hook_point_names_match_the_from_scratch_model(imported) -> None:
    """Every family has the rotary from-scratch model's points, plus only its own extras."""
    kind, _, adapter = imported
    scratch = set(collect_hook_points(Transformer(TransformerConfig(
        n_layer=2, d_model=32, n_head=4, d_ff=64, pos_encoding="rotary"))))
    names = {n for n in adapter.hook_points() if not n.startswith("blocks.2.")}
    extras = {f"blocks.{i}.{n}" for i in range(2) for n in ["mlp.hook_pre_linear"]}
    if kind in ("qwen3", "gemma3_text"):
        extras |= {f"blocks.{i}.attn.hook_{x}_normed" for i in range(2) for x in "qk"}
    if kind == "gemma3_text":
        extras |= {f"blocks.{i}.{ln}_post.{h}" for i in range(2) for ln in ("ln1", "ln2")
                   for h in ("hook_scale", "hook_normalized")}
    assert names == scratch | extras
    assert all(p.name == n for n, p in adapter.hook_points().items())


def test_kv_cache_continuation_equals_full_forward(imported) -> None:
    _, _, adapter = imported
    cache = adapter.new_cache(2)
    assert isinstance(cache, KVCache)  # the one cache of every model
    assert (cache.pos, cache.capacity, cache.sliding) == (0, adapter.block_size, False)
    with torch.no_grad():
        full = adapter(IDX)
        parts = [adapter(IDX[:, :5], cache), adapter(IDX[:, 5:6], cache),
                 adapter(IDX[:, 6:], cache)]
    assert cache.pos == 12
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    cache.reset()
    assert cache.pos == 0
    with torch.no_grad():
        torch.testing.assert_close(adapter(IDX[:, :3], cache), full[:, :3], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="block_size"):
        adapter(torch.zeros(1, adapter.block_size + 1, dtype=torch.long))


def test_config_alone_rebuilds_the_architecture(imported, monkeypatch, tmp_path) -> None:
    _, _, adapter = imported
    cfg, meta, state = adapter.get_config(), dict(adapter.meta), adapter.network.state_dict()
    monkeypatch.setenv("LMLAB_MODELS_DIR", str(tmp_path / "empty"))  # no registry at all
    rebuilt = type(adapter).from_config(cfg, meta)
    rebuilt.network.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(IDX), adapter(IDX))
    assert rebuilt.meta == meta and rebuilt.block_size == adapter.block_size
    # same parameters, tied as before: an optimizer state saved for one fits the other
    assert [n for n, _ in rebuilt.named_parameters()] == [n for n, _ in adapter.named_parameters()]


def test_meta_names_the_registry_model_as_parent(imported) -> None:
    kind, folder, adapter = imported
    assert adapter.meta == {"model_name": f"tiny-{kind}", "model_id": str(folder.resolve()),
                            "model_source": "folder", "fine_tuned_from": f"tiny-{kind}",
                            "architecture_type": kind}


def test_training_step_reduces_loss(imported) -> None:
    _, _, adapter = imported
    adapter.train()
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    x, y = IDX[:, :-1], IDX[:, 1:]
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(adapter(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bf16_weights_load_as_float32_by_default(hf_folder_factory, models_root) -> None:
    folder = hf_folder_factory("qwen2", dtype=torch.bfloat16)
    e = import_model(str(folder), name="bf", root=models_root)
    assert e["dtype"] == "bfloat16"  # stored as it came
    adapter = load("bf", models_root)
    assert {p.dtype for p in adapter.parameters()} == {torch.float32}

    class Cfg:
        dtype = "bfloat16"

    entry = catalog.resolve("bf", models_root)
    assert {p.dtype for p in QwenAdapter.from_registry(entry, Cfg()).parameters()} == {
        torch.bfloat16}


def test_qwen_tokenizer_is_the_real_one(shared_root, monkeypatch) -> None:
    from lmlab.model.catalog import load_tokenizer

    root, _ = shared_root
    monkeypatch.setenv("LMLAB_MODELS_DIR", str(root))
    tok = load_tokenizer("tiny-qwen2")  # the prepare path
    assert tok.encode("Hello world") == [9707, 1879]  # Qwen's ids
    text = "ROMEO: But soft, what light through yonder window breaks?\n\tünï"
    assert tok.decode(tok.encode(text)) == text
    assert tok.spec() == {"kind": "hf", "model_name": "tiny-qwen2"}
    assert tok.vocab_size == 151643 + 22 and tok.eos_token_id == 151643
    assert tok.encode_batch(["Hello world", text]) == [[9707, 1879], tok.encode(text)]


def test_generation_with_cache_equals_without(imported) -> None:
    """The loop's sampler, through a window restart (block 8, 20 new tokens), cache or not."""
    from lmlab.eval.sampling import generate

    _, _, adapter = imported
    adapter.block_size = 8  # as build_adapter sets it from data.block_size
    with_cache = generate(adapter, [9707, 1879, 11], 20, greedy=True)
    without = generate(adapter, [9707, 1879, 11], 20, greedy=True, use_cache=False)
    assert len(with_cache) == 20
    # after a window restart the cached sampler re-reads half a window, the uncached one a
    # full window, so they agree exactly up to the first restart (8 - 3 = 5 new tokens)
    assert with_cache[:6] == without[:6]


def test_a_checkpoint_loaded_with_a_models_root_finds_its_tokenizer_there(
        hf_folder_factory, models_root, tmp_path, monkeypatch) -> None:
    from lmlab.model.adapters import load_adapter
    from lmlab.model.checkpoint import save_checkpoint

    import_model(str(hf_folder_factory("qwen2")), name="tok", root=models_root)
    adapter = load("tok", models_root)
    ckpt = save_checkpoint(tmp_path / "run" / "ckpt_0000001.pt", adapter, step=1, config={})
    monkeypatch.setenv("LMLAB_MODELS_DIR", str(tmp_path / "elsewhere"))  # not the default
    loaded, _ = load_adapter(ckpt, models_root=models_root)
    assert loaded.tokenizer.encode("Hello") == adapter.tokenizer.encode("Hello")
