"""Running sweeps locally: runs, a crash isolated in its run, the report; stopping and resuming.

Real processes and real faults: a plugin that raises mid-run, SIGINT and SIGKILL
sent to a real driver process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlab.errors import LmlabError
from lmlab.records import read_manifest, read_metrics, write_manifest
from lmlab.runs.compare import compare
from lmlab.sweeps import folder
from lmlab.sweeps import run as sweep_run
from lmlab.sweeps.report import report
from tests.sweeps.conftest import FA, TINY

CRASH = '''
from lmlab.hooks.registry import register


@register("update")
def crash_at(named_params, *, step, lr, at: int = 3):
    if step >= at:
        raise RuntimeError("deliberate crash")
'''

# Tiny runs finish 300 steps in about a second on an idle machine, faster than a test can
# catch one mid-way: this plugin makes each step last at least 10 ms, whatever the load.
PAUSE = '''
import time

from lmlab.hooks.registry import register


@register("update")
def pause(named_params, *, step, lr, seconds: float = 0.01):
    time.sleep(seconds)
'''


def paused(tmp_path: Path) -> dict:
    plugin = tmp_path / "pause.py"
    plugin.write_text(PAUSE)
    return {"hooks": {"plugins": [str(plugin)], "update": [{"name": "pause"}]}}


def final_losses(index: dict) -> dict[str, float]:
    return {r["key"]: read_metrics(Path(r["run_dir"]))[-1]["val_loss"] for r in index["runs"]
            if r["status"] == "finished"}


def test_local_sweep_runs_reports_and_isolates_a_crash(sweep_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plugin = tmp_path / "crash.py"
    plugin.write_text(CRASH)
    crash = {"hooks": {"plugins": [str(plugin)], "update": [{"name": "crash_at"}]}}
    path = sweep_file(variants={"backprop": {}, "fa": FA, "crash": crash})
    lines = []
    with pytest.raises(sweep_run.SweepIncomplete, match=r"incomplete: 4/6 done, 0 running, "
                       r"2 failed.*Not finished: crash-s1 \(failed: exit 2\), crash-s2 "
                       r"\(failed: exit 2\) \(logs in .*Resume with: lmlab sweep resume "):
        sweep_run.start(path, tmp_path / "sweeps", jobs=2, threads=1, retries=0,
                        out=lines.append)
    d = next((tmp_path / "sweeps").iterdir())
    index = folder.load(d)
    assert [r["status"] for r in index["runs"]].count("finished") == 4
    assert {r["key"] for r in index["runs"] if r["status"] == "failed"} == {"crash-s1",
                                                                            "crash-s2"}
    assert any("crash-s1 failed" in line and "deliberate crash" in line for line in lines)
    for r in index["runs"]:
        if r["status"] == "finished":
            m = read_manifest(Path(r["run_dir"]))
            assert m["sweep"] == {"id": d.name, "key": r["key"], "variant": r["variant"],
                                  "point_id": 0, "point": {}, "seed": r["seed"]}
            assert m["seed"] == r["seed"] and Path(r["run_dir"]).parent == tmp_path / "runs"
    losses = final_losses(index)
    assert losses["backprop-s1"] != losses["backprop-s2"] != losses["fa-s1"]

    text = report(d, plot=tmp_path / "bands.png")
    assert "warning: left out crash-s1 (" in text and ", variant crash: status failed" in text
    assert "fa vs backprop: " in text and "crash vs backprop: no test: n = 0 vs 2" in text
    assert "crash     0" in text and "no interval: n = 0" in text
    assert (tmp_path / "bands.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads(report(d, metric="best_val", as_json=True))
    bp = data["blocks"][""]["backprop"]
    assert data["metric"] == "best_val" and bp["n"] == 2 and len(bp["ci"]) == 2
    assert "verdict" in data["blocks"][""]["fa"]["vs_baseline"]
    seeds = [r["run_dir"] for r in index["runs"] if r["variant"] == "backprop"]
    assert compare(seeds).startswith("Replicates: ")
    assert "4/6 done, 0 running, 2 failed" in folder.status_report(d)
    again = []
    with pytest.raises(sweep_run.SweepIncomplete):
        sweep_run.resume(d, retries=0, out=again.append)  # the failed runs are retried
    manifest = Path(index["runs"][1]["run_dir"]) / "manifest.json"  # as if run elsewhere
    m = json.loads(manifest.read_text())
    write_manifest(manifest, {**m, "dtype": "bfloat16"})
    with pytest.raises(LmlabError, match="Refusing to compare a mixed set-up.*dtype differs"):
        report(d)
    assert sum("crash-s" in line and "started" in line for line in again) == 2
    assert [r["run_dir"] for r in folder.load(d)["runs"] if r["status"] == "finished"] == [
        r["run_dir"] for r in index["runs"] if r["status"] == "finished"]


def _driver(path: Path, cwd: Path) -> subprocess.Popen:
    # SIGINT as a terminal delivers it: a suite started in the background (`make test &`)
    # would otherwise hand the driver an ignored SIGINT, as a shell does to background jobs
    return subprocess.Popen([sys.executable, "-m", "lmlab.cli", "sweep", "run", str(path),
                             "--jobs", "1", "--out", "sweeps"], cwd=cwd,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(sweep_run.__file__)
                                                                 .resolve().parents[2])})


def _wait_for(cwd: Path, ready, timeout: float = 120) -> Path:
    """Poll the sweep index until `ready(index)`; returns the sweep folder."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list((cwd / "sweeps").glob("*/index.json"))
        if found:
            try:
                index = json.loads(found[0].read_text())
            except json.JSONDecodeError:
                index = None
            if index and ready(index):
                return found[0].parent
        time.sleep(0.1)
    found = list((cwd / "sweeps").glob("*/index.json"))
    logs = "".join(f"\n--- {f.name}\n{f.read_text()[-1500:]}"
                   for f in sorted((cwd / "sweeps").glob("*/logs/*.log")))
    raise AssertionError("the sweep never reached the expected state: "
                         f"{found[0].read_text() if found else 'no index'}{logs}")


def _mid_second_run(index: dict) -> bool:
    runs = index["runs"]
    if runs[0]["status"] != "finished" or runs[1]["status"] != "running":
        return False
    run_dir = runs[1].get("run_dir")
    return bool(run_dir) and any(r.get("kind") == "eval" and r["step"] > 0
                                 for r in read_metrics(Path(run_dir)))


LONGER = {"set": {**TINY, "train.max_steps": 300, "train.checkpoint_every": 20,
                  "train.eval_every": 20}}


@pytest.mark.slow
def test_resume_after_the_driver_is_killed(sweep_file, corpus_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = sweep_file(seeds=3, variants={"backprop": paused(tmp_path)},
                      set={**LONGER["set"], "data.path": str(corpus_dir)})
    driver = _driver(path, tmp_path)
    d = _wait_for(tmp_path, _mid_second_run)
    before = folder.load(d)["runs"]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    lines = []
    sweep_run.resume(d, out=lines.append)  # waits for the orphaned run to save and stop
    after = folder.load(d)["runs"]
    assert [r["status"] for r in after] == ["finished"] * 3
    assert after[0]["run_dir"] == before[0]["run_dir"]  # the finished run was kept
    assert after[1]["run_dir"] == before[1]["run_dir"]  # the killed one continued...
    resumes = read_manifest(Path(after[1]["run_dir"])).get("resumes")
    assert resumes and resumes[0]["at_step"] > 0  # ...from its checkpoint
    assert any("backprop-s2 started (resuming)" in line for line in lines)
    assert len(list((tmp_path / "runs").iterdir())) == 3
    steps = [r["step"] for r in read_metrics(Path(after[1]["run_dir"])) if r["kind"] == "eval"]
    assert steps == sorted(set(steps)) and steps[-1] == 300  # one consistent curve


@pytest.mark.slow
def test_ctrl_c_stops_every_run_with_a_checkpoint(sweep_file, corpus_dir, tmp_path):
    path = sweep_file(seeds=3, variants={"backprop": paused(tmp_path)},
                      set={**LONGER["set"], "data.path": str(corpus_dir)})
    driver = _driver(path, tmp_path)
    d = _wait_for(tmp_path, _mid_second_run)
    driver.send_signal(signal.SIGINT)
    out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 130, out
    assert f"Resume with: lmlab sweep resume {Path('sweeps') / d.name}" in out
    runs = folder.load(d)["runs"]
    assert [r["status"] for r in runs] == ["finished", "interrupted", "pending"]
    assert read_manifest(Path(runs[1]["run_dir"]))["status"] == "interrupted"
    assert list((Path(runs[1]["run_dir"]) / "checkpoints").glob("ckpt_*.pt"))
