"""The fast fine-tuning step: chunked head + cross-entropy, frozen weights in bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmlab.model import catalog
from lmlab.model.adapters import adapter_class
from lmlab.model.finetune import speed_choices
from lmlab.model.importer import import_model
from lmlab.model.losses import IGNORE_INDEX, linear_cross_entropy

from .test_lora import lora_adapter, randomise_lora


def _plain(h, w, t):
    return F.cross_entropy((h @ w.T).float(), t, ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("chunk", [3, 7, 64])
def test_chunked_loss_and_grads_equal_the_plain_ones(chunk) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(20, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (20,), generator=g)
    t[[2, 11]] = IGNORE_INDEX
    ours = linear_cross_entropy(h, w, t, chunk=chunk)
    gh, gw = torch.autograd.grad(ours, (h, w))
    ref = _plain(h, w, t)
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gh, rh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-6, rtol=1e-5)


def test_chunked_loss_without_grad_is_the_same_loss_and_keeps_no_gradients() -> None:
    g = torch.Generator().manual_seed(2)
    h = torch.randn(30, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (30,), generator=g)
    t[4] = IGNORE_INDEX
    with torch.no_grad():
        ours = linear_cross_entropy(h, w, t, chunk=7)
    assert ours.grad_fn is None
    torch.testing.assert_close(ours, _plain(h, w, t).detach(), atol=1e-6, rtol=1e-6)


def test_chunked_loss_under_bf16_autocast_is_plain_bf16_and_frozen_head_gets_no_grad() -> None:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 8, 32, generator=g, requires_grad=True)
    w = torch.randn(300, 32, generator=g)  # frozen: no gradient computed
    t = torch.randint(0, 300, (4, 8), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, w, t, chunk=5)
        ref = F.cross_entropy((h @ w.T).float().flatten(0, 1), t.flatten())
    (gh,) = torch.autograd.grad(ours, (h,))
    (rh,) = torch.autograd.grad(ref, (h,))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(gh, rh, atol=2e-4, rtol=2e-2)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, bpe_tokenizer_dir):
    from .conftest import make_hf_folder

    root = tmp_path_factory.mktemp("fast") / "models"
    folder = tmp_path_factory.mktemp("src") / "tiny"
    folder.mkdir()
    make_hf_folder(folder, "qwen2", bpe_tokenizer_dir, vocab_size=320)
    import_model(str(folder), name="tiny", root=root)
    return root


IDX = torch.tensor([[5, 9, 200, 17, 3, 250, 1, 77, 90], [4, 4, 4, 100, 101, 102, 0, 2, 299]])


def test_adapter_loss_with_targets_equals_logits_then_cross_entropy(shared) -> None:
    adapter = adapter_class("qwen2").from_registry(catalog.resolve("tiny", shared))
    x, y = IDX[:, :-1], IDX[:, 1:].clone()
    y[0, :3] = IGNORE_INDEX
    fused = adapter(x, targets=y)
    fused.backward()
    g_fused = [p.grad.clone() for p in adapter.parameters()]
    adapter.zero_grad()
    plain = F.cross_entropy(adapter(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    plain.backward()
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
    for a, p in zip(g_fused, adapter.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)

    seen = []  # something hooks hook_logits: it sees the full logits, the loss is the same
    adapter.points.hook_logits.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    torch.testing.assert_close(adapter(x, targets=y), plain, atol=1e-6, rtol=1e-6)
    assert seen == [torch.Size([2, 8, 320])]


def test_bf16_lora_stores_frozen_weights_once_and_trains_fp32_masters(shared) -> None:
    adapter = lora_adapter(shared, "tiny")
    randomise_lora(adapter)
    x, y = IDX[:, :-1], IDX[:, 1:]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = adapter(x, targets=y).item()
    chosen = speed_choices(adapter, "bfloat16", True)
    said = " | ".join(chosen)
    for what in ("frozen weights stored in bf16", "chunked head", "one fused step each",
                 "kept for reuse"):
        assert what in said
    layer = adapter.model.model.layers[0]
    assert layer.self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert layer.self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    assert adapter.model.model.embed_tokens.weight.dtype == torch.float32
    assert layer.input_layernorm.weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = adapter(x, targets=y)
    assert abs(loss.item() - before) < 2e-2  # the weights autocast used, stored once
    loss.backward()
    grads = [p.grad for p in adapter.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)
    # a from-scratch model is not touched
    from lmlab.model.transformer import Transformer

    assert speed_choices(Transformer.__new__(Transformer), "bfloat16", True) == []


@pytest.mark.slow
def test_bf16_lora_run_says_what_it_chose_and_its_checkpoint_loads_in_fp32(
        shared, tmp_path, monkeypatch, capsys) -> None:
    from lmlab.config import from_dict
    from lmlab.data.prepare import prepare
    from lmlab.model.adapters import load_adapter
    from lmlab.records import read_manifest, read_metrics
    from lmlab.train.loop import train

    from ..conftest import play_text
    from .test_lora import LORA

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LMLAB_MODELS_DIR", str(shared))
    (tmp_path / "play.txt").write_text(play_text(6_000))
    prepare([str(tmp_path / "play.txt")], tmp_path / "data",
            tokenizer=catalog.load_tokenizer("tiny", shared), val_fraction=0.2)
    cfg = from_dict({
        "run": {"name": "bf16", "seed": 3, "out_dir": str(tmp_path / "runs")},
        "data": {"path": str(tmp_path / "data"), "block_size": 32},
        "model": {"model_name": "tiny"},
        "train": {"batch_size": 2, "max_steps": 3, "lr": 1e-2, "warmup_steps": 1,
                  "eval_every": 3, "eval_batches": 1, "checkpoint_every": 3, "log_every": 1,
                  "sample_every": 3,
                  "device": "cpu", "dtype": "bfloat16", "finetune": dict(LORA)}})
    run = train(cfg, progress=True)
    assert "frozen weights stored in bf16" in capsys.readouterr().out
    speed = read_manifest(run)["speed"]
    assert speed[0] == "autocast bfloat16" and any("chunked head" in s for s in speed)
    assert "--- step 3" in (run / "samples.txt").read_text()  # sampling runs on bf16 weights
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert len(losses) == 3 and all(0 < v < 10 for v in losses)
    adapter, _ = load_adapter(run, models_root=shared)  # rebuilt on the fp32 base
    layer = adapter.model.model.layers[0]
    assert layer.self_attn.q_proj.base_layer.weight.dtype == torch.float32


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones_and_sampling_stays_eager(shared) -> None:
    from .test_lora import lora_adapter, randomise_lora

    eager, compiled = lora_adapter(shared, "tiny").train(), lora_adapter(shared, "tiny").train()
    randomise_lora(eager)
    compiled.load_state_dict(eager.state_dict())
    speed_choices(eager, "float32", True)
    chosen = speed_choices(compiled, "float32", True, compile=True)
    assert any("torch.compile per decoder block" in c for c in chosen)
    x, y = IDX[:, :-1], IDX[:, 1:]
    losses = []
    for model in (eager, compiled):
        loss = model(x, targets=y)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for (n, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=n)
    from torch._dynamo.utils import counters

    frames = counters["stats"]["unique_graphs"]
    eager.eval()
    compiled.eval()
    with torch.no_grad():  # evaluation and a KV-cache continuation run the eager blocks
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-5)
        cache = compiled.new_cache(2)
        compiled(x[:, :4], cache=cache)
        compiled(x[:, 4:5], cache=cache)
    compiled.train()
    seen = []
    handle = compiled.points.blocks[0].mlp.hook_post.register_forward_hook(
        lambda m, i, o: seen.append(o.shape))
    compiled(x, targets=y).backward()  # a hooked block runs eagerly: the hook fires
    handle.remove()
    assert len(seen) == 1 and seen[0][:2] == (2, 8)
    assert counters["stats"]["unique_graphs"] == frames  # nothing compiled for any of them
