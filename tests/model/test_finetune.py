"""The seed's fine-tuning workflow end to end on a tiny Qwen2: import, prepare, train, resume.

Checks what the issue promises: every checkpoint records model_name, model_id,
model_source and fine_tuned_from; `train --resume` rebuilds the architecture
from the checkpoint alone; hooks with the shared names act on the imported model;
a registered fine-tune's lineage reaches the imported base.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmlab.model import catalog
from lmlab.model.importer import import_model, register_checkpoint

TEXT = ("ROMEO: But soft, what light through yonder window breaks?\n"
        "It is the east, and Juliet is the sun.\n") * 400


@pytest.mark.slow
def test_finetune_resume_register(hf_folder_factory, models_root, tmp_path, monkeypatch) -> None:
    from lmlab.config import from_dict
    from lmlab.data.prepare import prepare
    from lmlab.model.checkpoint import list_checkpoints, load_checkpoint
    from lmlab.train.loop import config_for_resume, train

    monkeypatch.chdir(tmp_path)
    import_model(str(hf_folder_factory("qwen2")), name="tiny-qwen", root=models_root)
    (tmp_path / "play.txt").write_text(TEXT)
    meta = prepare([str(tmp_path / "play.txt")], tmp_path / "data",
                   tokenizer=catalog.load_tokenizer("tiny-qwen", models_root), val_fraction=0.3)
    assert meta["tokenizer"] == {"kind": "hf", "model_name": "tiny-qwen"}

    raw = {"run": {"name": "ft", "seed": 1, "out_dir": str(tmp_path / "runs")},
           "data": {"path": str(tmp_path / "data"), "block_size": 32},
           "model": {"model_name": "tiny-qwen"},
           "train": {"batch_size": 2, "max_steps": 6, "lr": 3e-3, "warmup_steps": 1,
                     "eval_every": 3, "eval_batches": 2, "checkpoint_every": 3,
                     "log_every": 1, "device": "cpu", "dtype": "float32"},
           "hooks": {"forward": [{"name": "scale", "at": "blocks.*.hook_attn_out",
                                  "factor": 0.9}]}}
    run_dir = train(from_dict(raw), progress=False)
    ckpts = list_checkpoints(run_dir / "checkpoints")
    ckpt = load_checkpoint(ckpts[-1])
    assert ckpt["step"] == 6
    assert ckpt["model_meta"] == {"model_name": "tiny-qwen",
                                  "model_id": str((tmp_path / "src" / "tiny-qwen2").resolve()),
                                  "model_source": "folder", "fine_tuned_from": "tiny-qwen",
                                  "architecture_type": "qwen2"}
    assert ckpt["model_config"]["hf_config"]["model_type"] == "qwen2"
    base = catalog.resolve("tiny-qwen", models_root)
    from safetensors.torch import load_file

    before = load_file(Path(base["path"]) / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(before[key], ckpt["model"][key])  # it trained

    # resume from the checkpoint alone (no config): 6 -> 9 steps
    cfg = config_for_resume(str(ckpts[0]), None, ["train.max_steps=9"])
    run_dir2 = train(cfg, resume=str(ckpts[0]), allow_config_change=True, progress=False)
    assert run_dir2 == run_dir
    assert load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])["step"] == 9
    losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses

    e = register_checkpoint(run_dir, "tiny-qwen-romeo", models_root)
    assert e["fine_tuned_from"] == "tiny-qwen"
    assert [x["model_name"] for x in catalog.lineage("tiny-qwen-romeo")] == [
        "tiny-qwen-romeo", "tiny-qwen"]


@pytest.mark.slow
def test_fsdp_finetune_step_matches_one_process(hf_folder_factory, models_root, tmp_path,
                                                monkeypatch) -> None:
    """An imported Qwen3 under `train.parallel=fsdp` on 2 real torchrun ranks.

    The adapter runs each decoder layer's parts itself (hook points between
    them), so FSDP must be told which method runs a layer; if it were not, the
    layer's weights would stay sharded and the forward would fail. One SGD step
    with batch B per rank must equal one process with batch 2B on the same
    windows, with a forward hook in force on both.
    """
    from lmlab.data.prepare import prepare
    from lmlab.model.checkpoint import list_checkpoints, load_checkpoint
    from tests.train.test_distributed import B, T, _max_rel_diff, _params, _single, _torchrun

    monkeypatch.chdir(tmp_path)
    import_model(str(hf_folder_factory("qwen3")), name="tiny-qwen3", root=models_root)
    (tmp_path / "play.txt").write_text(TEXT)
    prepare([str(tmp_path / "play.txt")], tmp_path / "data",
            tokenizer=catalog.load_tokenizer("tiny-qwen3", models_root), val_fraction=0.3)
    raw = {"run": {"name": "fsdp", "seed": 3, "out_dir": str(tmp_path / "runs")},
           "data": {"path": str(tmp_path / "data"), "block_size": T},
           "model": {"model_name": "tiny-qwen3"},
           "train": {"batch_size": B, "max_steps": 1, "lr": 0.5, "warmup_steps": 0,
                     "optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0,
                     "grad_clip": 1.0, "eval_every": 1, "eval_batches": 1, "log_every": 1,
                     "device": "cpu", "dtype": "float32", "parallel": "fsdp"},
           "hooks": {"forward": [{"name": "scale", "at": "blocks.*.hook_attn_out",
                                  "factor": 0.5}]}}
    cfg_path = tmp_path / "fsdp.yaml"
    cfg_path.write_text(json.dumps(raw))  # JSON is YAML
    _torchrun(["--config", str(cfg_path)], tmp_path)
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    (ckpt_path,) = list_checkpoints(run_dir / "checkpoints")
    sharded = load_checkpoint(ckpt_path)["model"]
    assert all(type(v) is torch.Tensor for v in sharded.values()), "whole tensors, no DTensors"

    base = catalog.resolve("tiny-qwen3", models_root)
    from safetensors.torch import load_file

    init = load_file(Path(base["path"]) / "model.safetensors")
    init = {k: init.get(k, init.get("model.embed_tokens.weight")) for k in sharded}
    single = _params(_single(raw, ranks=2))
    rel = _max_rel_diff(sharded, single, init)
    assert rel < 1e-4, f"FSDP step differs from the single-process 2B step by {rel:.2e}"
    assert _max_rel_diff(sharded, _params(_single(raw, ranks=1)), init) > 1e-2  # control
