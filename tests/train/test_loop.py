"""End-to-end runs of the real loop on a tiny generated corpus."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmlab.config import dump_yaml
from lmlab.errors import LmlabError
from lmlab.model.checkpoint import list_checkpoints, load_checkpoint
from lmlab.records import read_manifest, read_metrics
from lmlab.train.loop import config_for_resume, train

ROOT = Path(__file__).resolve().parents[2]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def test_run_folder_holds_config_manifest_metrics_checkpoints(make_config):
    cfg = make_config()
    run = train(cfg, progress=False)
    assert (run / "config.yaml").read_text() == dump_yaml(cfg)
    m = read_manifest(run)
    assert m["status"] == "finished" and m["run_id"] == run.name
    assert m["config_hash"] == cfg.hash() and m["base_hash"] == cfg.base_hash()
    assert m["data_hash"] and m["seed"] == 7 and m["device"] == "cpu"
    assert {"torch", "numpy", "python"} <= set(m["libraries"])
    assert "git_commit" in m["code"] and "git_dirty" in m["code"]
    records = read_metrics(run)
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 4, 8]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert all({"val_loss", "val_ppl", "val_bpc"} <= set(r) for r in evals)
    assert losses(run)[8] < losses(run)[1]  # it learns
    ckpt = load_checkpoint(run)
    assert ckpt["step"] == 8 and ckpt["config"] == cfg.to_dict()
    assert {"model_name", "model_id", "model_source", "fine_tuned_from"} <= set(ckpt["model_meta"])
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [
        "ckpt_0000004.pt", "ckpt_0000008.pt"]


def test_same_config_and_seed_give_the_same_curve(make_config):
    a = train(make_config(run={"name": "a"}), progress=False)
    b = train(make_config(run={"name": "b"}), progress=False)
    assert losses(a) == losses(b)
    c = train(make_config(run={"name": "c", "seed": 8}), progress=False)
    assert losses(a) != losses(c)


def test_resume_is_exact_step_for_step(make_config):
    cfg = make_config(model={"dropout": 0.1}, train={"grad_accum": 2})  # RNG and accumulation
    run = train(cfg, progress=False)
    straight = losses(run)
    mid = run / "checkpoints" / "ckpt_0000004.pt"
    train(config_for_resume(str(mid), None, []), resume=str(mid), progress=False)
    assert losses(run) == straight  # steps 5..8 recomputed from the step-4 checkpoint
    resumes = read_manifest(run)["resumes"]
    assert resumes[0]["at_step"] == 4 and resumes[0]["config_changes"] == []


def test_resume_with_changed_config_is_refused_then_recorded(make_config):
    run = train(make_config(), progress=False)
    mid = str(run / "checkpoints" / "ckpt_0000004.pt")
    with pytest.raises(LmlabError, match=r"train.lr: 0.003 -> 0.001"):
        train(config_for_resume(mid, None, ["train.lr=0.001"]), resume=mid, progress=False)
    train(config_for_resume(mid, None, ["train.lr=0.001"]), resume=mid,
          allow_config_change=True, progress=False)
    assert read_manifest(run)["resumes"][-1]["config_changes"] == ["train.lr: 0.003 -> 0.001"]


def test_resume_on_a_re_prepared_corpus_is_refused(make_config, tmp_path, corpus_dir):
    import shutil

    from lmlab.data.prepare import prepare
    from tests.conftest import play_text

    data = tmp_path / "data"
    shutil.copytree(corpus_dir, data)
    run = train(make_config(data={"path": str(data)}), progress=False)
    (tmp_path / "other.txt").write_text(play_text(40_000, seed=1))
    prepare([str(tmp_path / "other.txt")], data)  # same path, other text
    with pytest.raises(LmlabError, match="data hash"):
        train(config_for_resume(str(run), None, []), resume=str(run), progress=False)


def _plugin(tmp_path: Path, after_calls: int) -> Path:
    """A forward hook that poisons the activation after `after_calls` training forwards."""
    p = tmp_path / "poison.py"
    p.write_text(
        "import torch\n"
        "from lmlab.hooks.registry import register\n"
        "calls = [0]\n"
        "@register('forward')\n"
        "def poison(x, point):\n"
        "    calls[0] += torch.is_grad_enabled()  # evaluation runs without grad\n"
        f"    return x * float('nan') if calls[0] > {after_calls} else x\n")
    return p


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(make_config, tmp_path):
    plugin = _plugin(tmp_path, after_calls=5)  # 5 forward passes pass, the 6th is poisoned
    cfg = make_config(train={"checkpoint_every": 2, "eval_every": 100},
                      hooks={"plugins": [str(plugin)],
                             "forward": [{"name": "poison", "at": "hook_embed"}]})
    with pytest.raises(LmlabError, match="loss became nan at step 6.*last good checkpoint"):
        train(cfg, progress=False)
    run = next((tmp_path / "runs").iterdir())
    assert read_manifest(run)["status"] == "failed"
    ckpt = load_checkpoint(run)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def _cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args, "--quiet"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_resume_matches_a_straight_run(make_config, tmp_path):
    """Every run is a fresh CLI process, as a user runs them (and as bit-exactness needs:
    the same process settings on both sides of the comparison)."""
    cfg = make_config(train={"max_steps": 400, "eval_every": 1000, "checkpoint_every": 1000})
    config = tmp_path / "cfg.yaml"
    config.write_text(dump_yaml(cfg))
    runs = tmp_path / "runs"
    straight_proc = _cli("train", "--config", str(config), cwd=tmp_path)
    assert straight_proc.wait(timeout=300) == 0, straight_proc.communicate()
    (straight_run,) = runs.iterdir()
    proc = _cli("train", "--config", str(config), cwd=tmp_path)
    deadline = time.time() + 60
    run = None
    while time.time() < deadline:
        new = set(runs.iterdir()) - {straight_run}
        if new and len(read_metrics(next(iter(new)))) >= 5:
            run = next(iter(new))
            break
        time.sleep(0.05)
    assert run is not None, proc.communicate()
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert read_manifest(run)["status"] == "interrupted"
    stopped = load_checkpoint(run)["step"]
    assert 5 <= stopped < 400
    resumed = _cli("train", "--resume", str(run), cwd=tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"Resuming run {run.name} at step {stopped}" in out
    assert losses(run) == losses(straight_run)
    assert json.loads((run / "manifest.json").read_text())["status"] == "finished"
