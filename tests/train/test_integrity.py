"""The small mechanisms behind the fault guarantees, each on its own (fast)."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from lmlab.config import from_dict
from lmlab.errors import LmlabError
from lmlab.fileio import atomic_write_text, clean_stale_temps
from lmlab.hooks.manager import ExperimentHooks
from lmlab.model.adapters.custom import CustomTransformerAdapter
from lmlab.model.checkpoint import (
    NonFiniteCheckpoint,
    content_hash,
    last_good_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from lmlab.model.transformer import TransformerConfig
from lmlab.records import effective_status


def test_new_keys_leave_existing_hashes_and_resumes_alone():
    # the hashes of the default config before train.on_nonfinite existed (lmlab main, 0cf60dc);
    # the base hash is the one after run.seed left it (issue 11: seeds are replicates)
    cfg = from_dict({})
    assert (cfg.hash(), cfg.base_hash()) == ("5470deafca8af650", "af6f088090b1de51")
    skip = from_dict({"train": {"on_nonfinite": "skip"}})
    assert skip.hash() != cfg.hash() and skip.base_hash() != cfg.base_hash()
    from lmlab.train.state import Checkpoint, check_resume

    old = cfg.to_dict()
    del old["train"]["on_nonfinite"], old["train"]["max_nonfinite_skips"]
    ckpt = Checkpoint.from_dict({"config": old, "data_hash": None, "sampler": [None],
                                 "plugins": {}, "model": {}, "optimizer": {}, "step": 4,
                                 "rng": {}, "run_id": "r", "model_config": {},
                                 "model_meta": {}})
    no_hooks = ExperimentHooks(cfg.hooks, tiny_adapter())
    assert check_resume(ckpt, cfg, no_hooks, None, 1, allow=False) == []
    with pytest.raises(LmlabError, match="train.on_nonfinite: 'stop' -> 'skip'"):
        check_resume(ckpt, skip, no_hooks, None, 1, allow=False)


def tiny_adapter() -> CustomTransformerAdapter:
    torch.manual_seed(0)
    return CustomTransformerAdapter(TransformerConfig(n_layer=1, d_model=16, n_head=2, d_ff=32,
                                                      block_size=8, vocab_size=11))


def test_content_hash_covers_values_as_well_as_tensors(tmp_path):
    a = tiny_adapter()
    p = save_checkpoint(tmp_path / "ckpt_0000001.pt", a, step=1, config={})
    ckpt = load_checkpoint(p)
    del ckpt["path"]  # added by the loader
    assert ckpt["sha256"] == content_hash(ckpt)
    assert content_hash({**ckpt, "step": 2}) != ckpt["sha256"]
    model = dict(ckpt["model"])
    name = next(iter(model))
    model[name] = model[name].clone()
    model[name].view(-1)[0] += 1e-6
    assert content_hash({**ckpt, "model": model}) != ckpt["sha256"]


def test_a_non_finite_checkpoint_is_never_written(tmp_path):
    a = tiny_adapter()
    good = save_checkpoint(tmp_path / "ckpt_0000001.pt", a, step=1, config={})
    with torch.no_grad():
        next(a.parameters())[0] = math.inf
    with pytest.raises(NonFiniteCheckpoint, match=f"The last good checkpoint is {good}"):
        save_checkpoint(tmp_path / "ckpt_0000002.pt", a, step=2, config={})
    assert not (tmp_path / "ckpt_0000002.pt").exists()
    assert last_good_checkpoint(tmp_path) == good


def test_stale_temps_of_dead_processes_only_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    host = socket.gethostname()
    stale = tmp_path / f".ckpt_0000001.pt.tmp-{host}-{dead}"
    alive = tmp_path / f".manifest.json.tmp-{host}-{os.getpid()}"
    elsewhere = tmp_path / f".metrics.jsonl.tmp-other-host-{dead}"
    staged = tmp_path / f".my-model.tmp-{host}-{dead}"  # a killed import's staging folder
    (staged / "sub").mkdir(parents=True)
    (staged / "sub" / "model.safetensors").write_text("weights")
    for p in (stale, alive, elsewhere):
        p.write_text("partial")
    assert sorted(clean_stale_temps(tmp_path)) == sorted([stale, staged])
    assert alive.exists() and elsewhere.exists()
    atomic_write_text(tmp_path / "x.txt", "whole")
    assert (tmp_path / "x.txt").read_text() == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [alive.name, elsewhere.name, "x.txt"])


def test_running_run_whose_process_is_gone_is_died():
    host = socket.gethostname()
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)
    assert effective_status({"status": "running", "pid": gone, "host": host}) == "died"
    assert effective_status({"status": "running", "pid": os.getpid(), "host": host}) == "running"
    assert effective_status({"status": "running", "pid": gone, "host": "elsewhere"}) == "running"
    assert effective_status({"status": "running"}) == "running"  # an older manifest
    assert effective_status({"status": "finished", "pid": gone, "host": host}) == "finished"


@pytest.mark.parametrize("entry, message", [
    ({"name": "scale", "at": 3}, "'at' = 3 must be one hook point name or glob as a string"),
    ({"name": "scale", "at": ["a", "b"]}, "'at' = ['a', 'b'] must be"),
    ({"at": "hook_embed"}, "must be a mapping with a 'name'"),
    ({"name": 3, "at": "hook_embed"}, "must be a mapping with a 'name'"),
])
def test_hook_fields_are_type_checked_at_config_load(entry, message):
    with pytest.raises(LmlabError, match=message.replace("[", r"\[").replace("(", r"\(")):
        from_dict({"hooks": {"forward": [entry]}})
    with pytest.raises(LmlabError, match="weight = 'big' must be a number"):
        from_dict({"hooks": {"aux_losses": [{"name": "l1", "weight": "big"}]}})


def test_the_last_good_checkpoint_is_one_whose_recorded_eval_was_finite(make_config):
    from lmlab.records import MetricsLog
    from lmlab.train.faults import last_good
    from lmlab.train.loop import Trainer

    run = Trainer(make_config(), progress=False).run()  # checkpoints at steps 4 and 8
    ckpts = run / "checkpoints"
    assert last_good(ckpts).startswith(f"The last good checkpoint is {ckpts / 'ckpt_0000008.pt'}")
    # weights can be finite and still evaluate to NaN (after repeated skipped updates)
    MetricsLog(run / "metrics.jsonl").write(kind="eval", step=8, val_loss=math.nan)
    assert last_good(ckpts).startswith(f"The last good checkpoint is {ckpts / 'ckpt_0000004.pt'}")
