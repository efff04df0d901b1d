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

from lmlab.model import registry
from lmlab.model.importer import import_model, register_checkpoint

TEXT = ("ROMEO: But soft, what light through yonder window breaks?\n"
        "It is the east, and Juliet is the sun.\n") * 400


@pytest.mark.slow
def test_finetune_resume_register(hf_folder_factory, models_root, tmp_path, monkeypatch) -> None:
    from lmlab.config import from_dict
    from lmlab.data.prepare import prepare
    from lmlab.train.checkpoint import list_checkpoints, load_checkpoint
    from lmlab.train.loop import config_for_resume, train

    monkeypatch.chdir(tmp_path)
    import_model(str(hf_folder_factory("qwen2")), name="tiny-qwen", root=models_root)
    (tmp_path / "play.txt").write_text(TEXT)
    meta = prepare([str(tmp_path / "play.txt")], tmp_path / "data", tokenizer="tiny-qwen",
                   val_fraction=0.3)
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
    base = registry.resolve("tiny-qwen", models_root)
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
    assert [x["model_name"] for x in registry.lineage("tiny-qwen-romeo")] == [
        "tiny-qwen-romeo", "tiny-qwen"]
