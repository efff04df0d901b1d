"""LoRA through PEFT on the imported models: what trains, hooks, checkpoints, resume, export.

Every model is a tiny random Qwen2 or Llama saved as a Hugging Face folder and
imported through import-model; training runs the real loop on a prepared corpus.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lmlab.config import from_dict
from lmlab.errors import LmlabError
from lmlab.eval.metrics import cross_entropy
from lmlab.hooks.manager import ExperimentHooks
from lmlab.model import catalog
from lmlab.model.adapters import adapter_class, load_adapter
from lmlab.model.checkpoint import list_checkpoints, load_checkpoint
from lmlab.model.finetune import apply_lora, lora_spec, use_activation_checkpointing
from lmlab.model.importer import import_model, register_checkpoint
from lmlab.records import read_manifest, read_metrics

from ..conftest import play_text
from .conftest import make_hf_folder

IDX = torch.tensor([[9707, 1879, 11, 30686, 6760, 25, 1380, 1324, 1947, 33123, 5267, 220],
                    [151643, 3, 50000, 7, 88, 999, 12345, 100, 101, 102, 103, 104]])
LORA = {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj",
                                                                  "down_proj"]}


def lora_adapter(root: Path, name: str = "tiny", r: int = 4, targets: list[str] | None = None):
    entry = catalog.resolve(name, root)
    adapter = adapter_class(entry["architecture_type"]).from_registry(entry)
    ft = from_dict({"model": {"model_name": name},
                    "train": {"finetune": {**LORA, "r": r,
                                           **({"target_modules": targets} if targets else {})}}})
    apply_lora(adapter, lora_spec(ft.train.finetune, entry["weights_sha256"]))
    return adapter


def randomise_lora(adapter, seed: int = 0) -> None:
    """LoRA's B starts at zero (the update is 0); give it values so the update shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in adapter.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    """One registry with a tiny Qwen2 ('tiny') and Llama, read by the tests that only load."""
    root = tmp_path_factory.mktemp("lora") / "models"
    for kind, name in (("qwen2", "tiny"), ("llama", "tiny-llama")):
        folder = tmp_path_factory.mktemp("src") / name
        folder.mkdir()
        import_model(str(make_hf_folder(folder, kind, qwen_tokenizer_dir)), name=name, root=root)
    return root


@pytest.fixture
def tiny(hf_folder_factory, models_root) -> Path:
    """A registry of its own (the end-to-end tests register into it or replace its base)."""
    import_model(str(hf_folder_factory("qwen2")), name="tiny", root=models_root)
    return models_root


@pytest.fixture
def setup(tiny, tmp_path, monkeypatch):
    """A registered tiny Qwen2, its corpus prepared with its tokenizer, and a config maker."""
    from lmlab.data.prepare import prepare

    monkeypatch.chdir(tmp_path)
    (tmp_path / "play.txt").write_text(play_text(12_000))
    prepare([str(tmp_path / "play.txt")], tmp_path / "data",
            tokenizer=catalog.load_tokenizer("tiny", tiny), val_fraction=0.2)

    def make(**train):
        return from_dict({
            "run": {"name": "lora", "seed": 3, "out_dir": str(tmp_path / "runs")},
            "data": {"path": str(tmp_path / "data"), "block_size": 32},
            "model": {"model_name": "tiny"},
            "train": {"batch_size": 2, "max_steps": 4, "lr": 1e-2, "warmup_steps": 1,
                      "eval_every": 4, "eval_batches": 1, "checkpoint_every": 2,
                      "log_every": 1, "device": "cpu", "dtype": "float32",
                      "finetune": dict(LORA), **train}})

    return tiny, make


def test_only_lora_weights_train_and_the_optimizer_sees_only_them(shared) -> None:
    from lmlab.train.optim import build_optimizer

    adapter = lora_adapter(shared)
    trainable = [n for n, p in adapter.network.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 4 * 2  # A and B, 4 targets, 2 layers
    cfg = from_dict({"model": {"model_name": "tiny"}, "train": {"optimizer": "adamw"}})
    opt = build_optimizer(adapter, cfg.train, torch.device("cpu"))
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in adapter.parameters() if p.requires_grad}

    # an update hook acts on the trained parameters only: the frozen base has no gradient
    seen = []
    hooks = ExperimentHooks(from_dict({"hooks": {"update": [{"name": "sign"}]}}).hooks, adapter)
    hooks.update_fns.append(lambda named, step, lr: seen.extend(n for n, _ in named))
    cross_entropy(adapter(IDX[:, :-1]), IDX[:, 1:]).backward()
    hooks.transform_grads(0, 1e-3)
    assert sorted(seen) == sorted(trainable)
    grads = [p.grad for n, p in adapter.named_parameters() if "lora_A" in n]
    assert all(set(g.unique().tolist()) <= {-1.0, 0.0, 1.0} for g in grads)
    assert all(p.grad is None for p in adapter.parameters() if not p.requires_grad)


def test_forward_hook_at_attn_out_sees_the_adapted_output(shared) -> None:
    adapter = lora_adapter(shared).eval()
    randomise_lora(adapter)
    seen = {}
    points = adapter.hook_points()
    points["blocks.0.attn.hook_z"].register_forward_hook(
        lambda m, i, o: seen.__setitem__("z", o))
    points["blocks.0.hook_attn_out"].register_forward_hook(
        lambda m, i, o: seen.__setitem__("out", o))
    with torch.no_grad():
        adapter(IDX)
    o = adapter.model.model.layers[0].self_attn.o_proj  # a peft LoRA Linear now
    z = seen["z"].reshape(*seen["z"].shape[:2], -1)
    base = z @ o.base_layer.weight.T
    update = (z @ o.lora_A["default"].weight.T @ o.lora_B["default"].weight.T) * (8 / 4)
    torch.testing.assert_close(seen["out"], base + update)
    assert (update.abs() > 1e-3).any()  # the update is not negligible: the check has teeth


def test_unknown_target_module_lists_the_ones_the_model_has(shared) -> None:
    with pytest.raises(LmlabError, match=r"c_attn.*does not have.*down_proj, gate_proj, "
                                         r"k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"):
        lora_adapter(shared, targets=["q_proj", "c_attn"])


@pytest.mark.parametrize("raw, match", [
    ({"train": {"finetune": {"method": "lora"}}}, "from-scratch model"),
    ({"model": {"model_name": "x"}, "train": {"finetune": {"method": "lora", "r": 0}}},
     "r = 0 must be a positive rank"),
    ({"model": {"model_name": "x"}, "train": {"finetune": {"method": "lora", "r": -2}}},
     "must be a positive rank"),
    ({"model": {"model_name": "x"}, "train": {"finetune": {"method": "dora"}}}, "'full'"),
    ({"model": {"model_name": "x"}, "train": {"finetune": {"rank": 8}}},
     "Valid keys in train.finetune: method, r, alpha"),
    ({"model": {"model_name": "x"}, "train": {"finetune": {"method": "lora"},
                                              "parallel": "fsdp"}}, "use train.parallel=ddp"),
    ({"train": {"activation_checkpointing": True}}, "imported models"),
    ({"model": {"model_name": "x"}, "train": {"activation_checkpointing": True},
      "hooks": {"forward": [{"name": "record", "at": "hook_embed"}]}}, "record twice"),
])
def test_bad_finetune_configs_are_refused(raw, match) -> None:
    with pytest.raises(LmlabError, match=match):
        from_dict(raw)


def test_defaults_keep_every_existing_config_hash() -> None:
    # the hash of the default config before train.finetune existed (main at 0cf60dc)
    assert from_dict({}).hash() == "5470deafca8af650"
    lora = from_dict({"model": {"model_name": "x"}, "train": {"finetune": {"method": "lora"}}})
    full = from_dict({"model": {"model_name": "x"}})
    assert lora.base_hash() != full.base_hash()  # LoRA and full runs never compare as one
    ckpt = from_dict({"model": {"model_name": "x"}, "train": {"activation_checkpointing": True}})
    assert ckpt.base_hash() == full.base_hash()  # the same maths, less memory


def test_activation_checkpointing_gives_the_same_loss_and_grads(shared) -> None:
    def loss_and_grads(checkpointing: bool):
        adapter = lora_adapter(shared).train()
        randomise_lora(adapter)
        if checkpointing:
            use_activation_checkpointing(adapter)
        hooks = ExperimentHooks(from_dict({"hooks": {"forward": [
            {"name": "scale", "at": "blocks.*.hook_attn_out", "factor": 0.7}]}}).hooks, adapter)
        with hooks:
            loss = cross_entropy(adapter(IDX[:, :-1]), IDX[:, 1:])
            loss.backward()
        return loss.item(), {n: p.grad for n, p in adapter.named_parameters() if p.requires_grad}

    torch.manual_seed(0)
    loss_a, grads_a = loss_and_grads(False)
    torch.manual_seed(0)
    loss_b, grads_b = loss_and_grads(True)
    assert loss_a == loss_b
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-6, atol=1e-7)


def test_bf16_autocast_loss_matches_fp32_within_noise(shared) -> None:
    from lmlab.device import autocast

    adapter = lora_adapter(shared).eval()
    randomise_lora(adapter)
    with torch.no_grad():
        fp32 = cross_entropy(adapter(IDX[:, :-1]), IDX[:, 1:]).item()
        with autocast(torch.device("cpu"), "bfloat16"):
            bf16 = cross_entropy(adapter(IDX[:, :-1]).float(), IDX[:, 1:]).item()
    assert abs(bf16 - fp32) < 0.02 * fp32, (bf16, fp32)  # bf16 keeps ~3 significant digits


@pytest.mark.slow
def test_lora_run_checkpoints_trained_weights_and_resumes_exactly(setup) -> None:
    from lmlab.train.loop import config_for_resume, train

    root, make = setup
    cfg = make(finetune={**LORA, "dropout": 0.1}, grad_accum=2)  # RNG in LoRA's dropout
    run = train(cfg, progress=False)
    straight = {r["step"]: r["loss"] for r in read_metrics(run) if r["kind"] == "train"}
    ckpt = load_checkpoint(run)
    assert ckpt["model"] and all(".lora_A." in k or ".lora_B." in k for k in ckpt["model"])
    spec = ckpt["model_meta"]["finetune"]
    assert spec["method"] == "lora" and spec["r"] == 4
    assert spec["base_weights_sha256"] == catalog.resolve("tiny", root)["weights_sha256"]
    m = read_manifest(run)["model"]
    assert m["finetune"]["method"] == "lora" and 0 < m["trainable_params"] < m["params"] / 10

    mid = str(run / "checkpoints" / "ckpt_0000002.pt")
    train(config_for_resume(mid, None, []), resume=mid, progress=False)
    again = {r["step"]: r["loss"] for r in read_metrics(run) if r["kind"] == "train"}
    assert again == straight

    with pytest.raises(LmlabError, match=r"lora fine-tune.*method=full.*cannot be honoured"):
        train(config_for_resume(mid, None, ["train.finetune.method=full"]), resume=mid,
              allow_config_change=True, progress=False)
    with pytest.raises(LmlabError, match=r"r: 4 -> 8"):
        train(config_for_resume(mid, None, ["train.finetune.r=8"]), resume=mid,
              allow_config_change=True, progress=False)


@pytest.mark.slow
def test_base_reimported_with_other_weights_is_refused(setup, hf_folder_factory) -> None:
    from lmlab.train.loop import config_for_resume, train

    root, make = setup
    run = train(make(max_steps=2), progress=False)
    path = list_checkpoints(run / "checkpoints")[-1]
    old = catalog.resolve("tiny", root)["weights_sha256"]
    shutil.rmtree(root)
    import_model(str(hf_folder_factory("qwen2", name="other", seed=1)), name="tiny", root=root)
    new = catalog.resolve("tiny", root)["weights_sha256"]
    assert new != old
    with pytest.raises(LmlabError, match=rf"{old}.*{new}.*re-imported"):
        load_adapter(path)
    with pytest.raises(LmlabError, match=rf"{old}.*{new}"):
        train(config_for_resume(str(path), None, ["train.max_steps=3"]), resume=str(path),
              progress=False)


@pytest.mark.slow
def test_export_adapter_and_merge_load_outside_lmlab(setup, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmlab.model.export import export_checkpoint
    from lmlab.train.loop import train

    root, make = setup
    run = train(make(), progress=False)
    adapter, _ = load_adapter(run)
    adapter.eval()
    with torch.no_grad():
        ours = adapter(IDX)
        base = AutoModelForCausalLM.from_pretrained(str(root / "tiny"), dtype=torch.float32)
        assert not torch.allclose(base(IDX).logits, ours, atol=1e-4)  # LoRA changed something

    out = export_checkpoint(run, tmp_path / "adapter", root=root)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    assert "library_name: peft" in (out / "README.md").read_text()
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDX).logits, ours, atol=1e-5, rtol=1e-5)

    merged_dir = export_checkpoint(run, tmp_path / "merged", root=root, merge=True)
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(IDX).logits, ours, atol=1e-5, rtol=1e-5)

    # register: a merged whole model, with the method and rank recorded; lineage reaches the base
    e = register_checkpoint(run, "tiny-lora", root)
    assert e["finetune"] == {"method": "lora", "r": 4, "alpha": 8.0, "dropout": 0.0,
                             "target_modules": LORA["target_modules"]}
    assert [x["model_name"] for x in catalog.lineage("tiny-lora", root)] == ["tiny-lora", "tiny"]
    again = adapter_class("qwen2").from_registry(catalog.resolve("tiny-lora", root)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDX), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_merge_export_of_a_full_finetune_is_the_model(setup, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from lmlab.model.export import export_checkpoint
    from lmlab.train.loop import train

    root, make = setup
    run = train(make(max_steps=1, finetune={"method": "full"}), progress=False)
    out = export_checkpoint(run, tmp_path / "full", root=root, merge=True)
    adapter, _ = load_adapter(run)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDX).logits, adapter.eval()(IDX), atol=1e-5, rtol=1e-5)
    assert "Fine-tuning: full" in (out / "README.md").read_text()


def test_lora_on_llama_targets_the_same_names(shared) -> None:
    adapter = lora_adapter(shared, "tiny-llama")
    assert type(adapter.model.model.layers[1].mlp.down_proj).__module__.startswith("peft.")
    randomise_lora(adapter)
    cross_entropy(adapter(IDX[:, :-1]), IDX[:, 1:]).backward()
    assert all(p.grad is not None for p in adapter.parameters() if p.requires_grad)
