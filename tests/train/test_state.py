"""The run's typed state: checkpoints as dataclasses, a resume that loads once, a step's result."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lmlab.model.checkpoint import load_checkpoint
from lmlab.train import state as state_module
from lmlab.train.loop import train
from lmlab.train.state import Checkpoint, build
from lmlab.train.step import micro_batches, train_step

pytestmark = pytest.mark.usefixtures("one_thread")

OLD = Path(__file__).resolve().parent / "pinned_ckpt" / "checkpoints" / "ckpt_0000004.pt"


def test_a_checkpoint_written_before_the_dataclass_reads_and_writes_the_same_keys():
    raw = load_checkpoint(OLD)  # 17 string keys (+ sha256 and the path it was loaded from)
    ckpt = Checkpoint.from_dict(raw)
    assert ckpt.step == 4 and ckpt.run_id == raw["run_id"] and ckpt.extra == {}
    again = ckpt.to_dict()
    assert set(again) == set(raw) and all(again[k] is raw[k] for k in raw)
    assert set(ckpt.loop_state()) == set(raw) - {"format", "version", "model_config",
                                                  "model_meta", "path", "sha256"}


def test_keys_an_older_file_lacks_read_as_their_defaults_and_newer_ones_are_kept():
    raw = {k: v for k, v in load_checkpoint(OLD).items()
           if k not in ("hooks", "best_val", "plugins", "elapsed_s", "data_hash", "saved_at")}
    ckpt = Checkpoint.from_dict({**raw, "alignment": {"b": 1}})
    assert (ckpt.hooks, ckpt.best_val, ckpt.plugins, ckpt.elapsed_s) == ([{}], math.inf, {}, 0.0)
    assert ckpt.extra == {"alignment": {"b": 1}} and ckpt.to_dict()["alignment"] == {"b": 1}


def test_a_resume_from_the_cli_loads_the_checkpoint_once(make_config, monkeypatch):
    from lmlab.cli import main

    run = train(make_config(), progress=False)
    calls = []
    real = state_module.load_checkpoint
    monkeypatch.setattr(state_module, "load_checkpoint",
                        lambda path: calls.append(path) or real(path))
    mid = run / "checkpoints" / "ckpt_0000004.pt"
    assert main(["train", "--resume", str(mid), "--quiet"]) == 0
    assert calls == [str(mid)]


def test_a_nonfinite_loss_is_a_value_and_the_weights_are_not_touched(make_config):
    cfg = make_config(hooks={"forward": [{"name": "scale", "at": "hook_embed",
                                          "factor": float("nan")}]})
    s = build(cfg)
    s.hooks.attach()
    before = {k: v.clone() for k, v in s.adapter.state_dict().items()}
    result = train_step(s, micro_batches(s), lr=1e-3)
    s.hooks.detach()
    assert result.skipped and result.nonfinite[0] == "loss" and math.isnan(result.loss)
    assert all(torch.equal(v, s.adapter.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in s.adapter.parameters())
