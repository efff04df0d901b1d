"""Fault injection on sweeps: what a user's scripts and accidents do, and what lmlab promises.

Real processes and real files: workers and drivers are SIGKILLed mid-run, two
drivers race for one sweep, the index, claims and manifests are damaged byte by
byte, run folders are deleted, variant names collide, a variant diverges. Each
case checks the exit status, the one line that says what happened and what to
do, and, where the sweep can finish, that its report equals that of a sweep
that was never interrupted (the same losses to the last bit: runs use one
thread and resume exactly from their checkpoints).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml

from lmlab.cli import main
from lmlab.records import read_metrics
from lmlab.sweeps import folder
from lmlab.sweeps.report import report
from tests.sweeps.conftest import TINY

SRC = str(Path(folder.__file__).resolve().parents[2])

PAUSE = '''
import time

from lmlab.hooks.registry import register


@register("update")
def pause(named_params, *, step, lr, seconds: float = 0.03):
    time.sleep(seconds)
'''


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`lmlab ARGV` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, out + err
    return rc, out, err


def error(err: str) -> str:
    """The one `lmlab: error:` line."""
    lines = [line for line in err.splitlines() if line.startswith("lmlab: error:")]
    assert len(lines) == 1, err
    return lines[0]


def driver(cwd: Path, *argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmlab.cli", "sweep", *argv], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": SRC})


def write_sweep(where: Path, corpus: Path, **top) -> Path:
    raw = {"name": "t", "base": "char-tiny", "set": {**TINY, "data.path": str(corpus)},
           "seeds": 2, "baseline": "a", "variants": {"a": {}, "b": {"train.lr": 0.01}}}
    raw.update(top)
    path = where / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def body(text: str) -> list[str]:
    """A report without its first line (which names the sweep folder)."""
    return text.splitlines()[1:]


def losses(d: Path) -> dict[str, float]:
    return {r["key"]: read_metrics(Path(r["run_dir"]))[-1]["val_loss"]
            for r in folder.load(d)["runs"]}


def sweep_dir(cwd: Path) -> Path:
    (d,) = (cwd / "sweeps").iterdir()
    return d


def finish_sweep(cwd: Path, path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """Run a sweep to the end in `cwd` (in this process; its runs are processes of their own);
    its folder and report."""
    from lmlab.sweeps.run import start

    with monkeypatch.context() as m:
        m.chdir(cwd)
        d = start(path, Path("sweeps"), jobs=2, out=lambda line: None).resolve()
    return d, report(d)


def copy_sweep(src: Path, dst: Path) -> Path:
    """A copy of a finished sweep and its runs, the index pointing at the copied runs."""
    shutil.copytree(src, dst)
    d = sweep_dir(dst)
    for f in (d / folder.INDEX, *(d / "claims").glob("*.json")):
        f.write_text(f.read_text().replace(str(src), str(dst)))
    return d


@pytest.fixture(scope="module")
def module_monkeypatch():
    with pytest.MonkeyPatch.context() as m:
        yield m


@pytest.fixture(scope="module")
def finished(corpus_dir, tmp_path_factory, module_monkeypatch):
    """A sweep of 2 variants x 2 seeds run to the end: (its working folder, its report)."""
    cwd = tmp_path_factory.mktemp("finished")
    d, text = finish_sweep(cwd, write_sweep(cwd, corpus_dir), module_monkeypatch)
    return cwd, text


@pytest.fixture
def damaged(finished, tmp_path, monkeypatch):
    """A copy of the finished sweep to damage, as the current folder; its sweep folder."""
    cwd, _ = finished
    d = copy_sweep(cwd, tmp_path / "w")
    monkeypatch.chdir(tmp_path / "w")
    return d


# --- damaged sweep files -----------------------------------------------------------------


def _no_status(d: Path) -> None:
    index = json.loads((d / folder.INDEX).read_text())
    del index["runs"][1]["status"]
    (d / folder.INDEX).write_text(json.dumps(index))


def _one_folder_for_two(d: Path) -> None:
    index = json.loads((d / folder.INDEX).read_text())
    index["runs"][1]["run_dir"] = index["runs"][0]["run_dir"]
    (d / folder.INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("damage, what", [
    (lambda d: (d / folder.INDEX).write_bytes(b'{"sweep_id": "\xff\xfe"}'), "not UTF-8 text"),
    (lambda d: (d / folder.INDEX).write_text("[]"), "a JSON list, not an object"),
    (lambda d: (d / folder.INDEX).write_text("{}"), "no valid 'sweep_id'"),
    (lambda d: (d / folder.INDEX).write_text('{"sweep_id": "x", "ru'), "not JSON"),
    (_no_status, "run entry 1 (b-s1) has no valid 'status'"),
    (_one_folder_for_two, "runs a-s1 and b-s1 share the folder "),
], ids=["non-utf8", "list", "empty", "truncated", "no-status", "shared-folder"])
def test_a_damaged_index_is_named_with_its_fix_and_repair_rebuilds_it(
        damaged, finished, capsys, damage, what):
    damage(damaged)
    for action in ("status", "report", "resume"):
        rc, _, err = cli(capsys, "sweep", action, str(damaged))
        line = error(err)
        assert rc == 2 and f"{damaged / folder.INDEX} is damaged ({what}" in line, line
        assert f"`lmlab sweep repair {damaged}`" in line and f"or delete {damaged}" in line
    rc, out, _ = cli(capsys, "sweep", "repair", str(damaged))
    assert rc == 0 and "all 4 runs finished" in out
    assert list(damaged.glob("index.json.damaged-*"))  # the damaged one is kept
    assert body(report(damaged)) == body(finished[1])
    rc, out, _ = cli(capsys, "sweep", "resume", str(damaged))
    assert rc == 0 and "All 4 runs are finished." in out


def test_a_finished_runs_deleted_folder_is_missing_refused_then_run_again(damaged, finished,
                                                                          capsys):
    gone = next(r for r in folder.load(damaged)["runs"] if r["key"] == "a-s1")
    shutil.rmtree(gone["run_dir"])
    rc, out, _ = cli(capsys, "sweep", "status", str(damaged))
    assert rc == 0 and "3/4 done, 0 running, 0 failed, 0 interrupted, 0 pending, 1 missing" in out
    assert any(line.split()[:2] == ["a-s1", "missing"] for line in out.splitlines())
    rc, _, err = cli(capsys, "sweep", "report", str(damaged))
    assert rc == 2 and "missing, their folders gone: a-s1" in error(err)
    assert "--allow-missing" in error(err)
    rc, out, _ = cli(capsys, "sweep", "report", str(damaged), "--allow-missing")
    assert rc == 0 and "warning: left out a-s1: MISSING" in out
    assert any(line.startswith("a  1 ") for line in out.splitlines())  # n = 1 for a
    rc, out, _ = cli(capsys, "sweep", "resume", str(damaged))
    assert rc == 0 and "a-s1: finished, but its folder" in out and "a-s1 started" in out, out
    assert body(report(damaged)) == body(finished[1])


def test_a_truncated_claim_is_ignored_and_its_run_done(damaged, finished, capsys):
    index = folder.load(damaged)
    r = index["runs"][0]
    shutil.rmtree(r["run_dir"])
    r.update(status="interrupted", run_id=None, run_dir=None)
    folder.save(damaged, index)
    (damaged / "claims" / f"{r['key']}.json").write_text('{"run_id": "20')
    rc, out, _ = cli(capsys, "sweep", "resume", str(damaged))
    assert rc == 0 and f"{r['key']}: ignoring" in out and "(damaged)" in out
    assert body(report(damaged)) == body(finished[1])


def test_one_unreadable_manifest_is_named_and_the_rest_reported(damaged, capsys):
    r = folder.load(damaged)["runs"][3]
    manifest = Path(r["run_dir"]) / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])
    rc, out, _ = cli(capsys, "sweep", "status", str(damaged))
    assert rc == 0 and f"{manifest} is not readable JSON" in out
    rc, out, _ = cli(capsys, "sweep", "report", str(damaged))
    assert rc == 0 and f"warning: left out {r['key']}: {manifest} is not readable JSON" in out
    assert any(line.startswith(f"{r['variant']}  1 ") for line in out.splitlines())


def test_a_damaged_metrics_line_is_skipped_and_the_report_says_so(damaged, capsys):
    r = folder.load(damaged)["runs"][0]
    path = Path(r["run_dir"]) / "metrics.jsonl"
    lines = path.read_text().splitlines()
    last = lines[-1]
    at = last.index('"val_loss": ') + len('"val_loss": ') + 2  # a digit after "4."
    lines[-1] = last[:at] + str((int(last[at]) + 1) % 10) + last[at + 1:]
    path.write_text("\n".join(lines) + "\n")
    rc, out, err = cli(capsys, "sweep", "report", str(damaged))
    assert rc == 0 and f"has 1 damaged record(s) in metrics.jsonl (line {len(lines)})" in out
    assert f"lmlab runs verify {r['run_dir']}" in out
    assert f"skipped line {len(lines)} of {path} (its crc32 does not match" in err


# --- names and sweep files -------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("variants:\n  a/b: {}\n  a_b: {train.lr: 0.01}\n",
     "Variants 'a/b' and 'a_b' both become the run name 'a_b'"),
    ("variants:\n  1: {}\n  '1': {train.lr: 0.01}\n",
     "Variants 1 and '1' both become the run name '1'"),
    ("variants:\n  a: {}\n  b: {}\n  a: {train.lr: 0.01}\n",
     "key 'a' is given twice (lines 5 and 7)"),
    ("variants:\n  a: {}\nbaseline: {a: 1}\n", "baseline = {'a': 1} must be the name of one"),
    ("variants:\n  a: {}\n  b: {train.lr: 1e-2, train.lr: 1e-3}\n",
     "key 'train.lr' is given twice"),
])
def test_colliding_names_and_bad_sweep_files_are_refused_naming_both(
        corpus_dir, tmp_path, monkeypatch, capsys, text, message):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "s.yaml"
    path.write_text(f"name: t\nseeds: 1\nset: {{data.path: {corpus_dir}}}\n{text}")
    rc, _, err = cli(capsys, "sweep", "run", str(path))
    assert rc == 2 and message in error(err)
    assert not (tmp_path / "sweeps").exists()  # refused before anything was written


def test_non_utf8_sweep_file_is_named(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_bytes(b"name: t\nvariants: {a\xff: {}}\n")
    rc, _, err = cli(capsys, "sweep", "run", str(path))
    assert rc == 2 and f"{path} is not UTF-8 text (byte 20)" in error(err)


def test_the_readmes_log_uniform_example_is_accepted(corpus_dir, tmp_path):
    from lmlab.sweeps.spec import load_sweep

    path = tmp_path / "s.yaml"
    path.write_text(f"name: t\nset: {{data.path: {corpus_dir}}}\nvariants: {{a: {{}}}}\n"
                    "method: random\nsamples: 3\ngrid:\n  train.lr: {log_uniform: [1e-4, 1e-2]}\n")
    lrs = [p["train.lr"] for p in load_sweep(path).points]
    assert len(lrs) == 3 and all(1e-4 <= lr <= 1e-2 for lr in lrs)


# --- diverged variants -----------------------------------------------------------------


def test_a_diverged_variant_is_reported_as_diverged_never_averaged(corpus_dir, tmp_path,
                                                                    capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_sweep(tmp_path, corpus_dir, variants={
        "a": {}, "b": {"train.lr": 1e6, "train.on_nonfinite": "skip"}})
    rc, out, _ = cli(capsys, "sweep", "run", str(path))
    assert rc == 0, out  # diverged runs finished: a result, not a failure
    d = sweep_dir(tmp_path)
    assert all(math.isnan(v) for k, v in losses(d).items() if k.startswith("b-"))
    assert folder.status_report(d).count("finished     100%") == 4
    assert folder.status_report(d).count("(diverged: final val loss nan)") == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. scipy's over NaN
        rc, out, err = cli(capsys, "sweep", "report", str(d))
    assert rc == 0 and err == "", err
    assert "b  2           -        -  2/2 diverged" in out
    assert "b: 2/2 diverged (" in out and "b vs a: no test: b has diverged runs" in out
    assert "nan" not in out.lower()

    def strict(constant: str):
        raise AssertionError(f"{constant} in --json output")

    data = json.loads(report(d, as_json=True), parse_constant=strict)
    b = data["blocks"][""]["b"]
    assert b["status"] == "diverged" and b["values"] == [None, None] and b["mean"] is None
    assert data["blocks"][""]["a"]["status"] == "ok" and data["blocks"][""]["a"]["n"] == 2


# --- killed workers and drivers, concurrent drivers -------------------------------------


@pytest.fixture(scope="module")
def paused_file(corpus_dir, tmp_path_factory) -> Path:
    """A sweep of 2 runs slow enough to be caught mid-way (each step sleeps 30 ms)."""
    where = tmp_path_factory.mktemp("paused")
    (where / "pause.py").write_text(PAUSE)
    hooks = {"hooks": {"plugins": [str(where / "pause.py")], "update": [{"name": "pause"}]}}
    return write_sweep(where, corpus_dir, seeds=[1], variants={
        "a": hooks, "b": {**hooks, "train.lr": 0.01}},
        set={**TINY, "data.path": str(corpus_dir), "train.max_steps": 40,
             "train.checkpoint_every": 10, "train.eval_every": 10})


@pytest.fixture(scope="module")
def paused_reference(paused_file, tmp_path_factory, module_monkeypatch
                     ) -> tuple[dict[str, float], str]:
    """The uninterrupted sweep of `paused_file`: its final losses and report."""
    cwd = tmp_path_factory.mktemp("reference")
    d, text = finish_sweep(cwd, paused_file, module_monkeypatch)
    return losses(d), text


def wait_for(cwd: Path, ready, timeout: float = 120) -> dict:
    """Poll the sweep index until `ready(index)`; returns the index."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for f in (cwd / "sweeps").glob("*/index.json"):
            try:
                index = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if ready(index):
                return index
        time.sleep(0.05)
    raise AssertionError("the sweep never reached the expected state")


def training(index: dict, key: str = "a-s1") -> bool:
    """Whether the run `key` is running and has written a checkpoint-worth of steps."""
    r = next(r for r in index["runs"] if r["key"] == key)
    return r["status"] == "running" and bool(r["run_dir"]) and any(
        m["kind"] == "train" and m["step"] >= 12 for m in read_metrics(Path(r["run_dir"]),
                                                                      quiet=True))


def worker_pid(cwd: Path, key: str = "a-s1") -> int:
    return json.loads(next((cwd / "sweeps").glob(f"*/claims/{key}.json")).read_text())["pid"]


@pytest.mark.slow
def test_a_killed_worker_fails_the_sweep_and_resume_retries_it(paused_file, paused_reference,
                                                               tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = driver(tmp_path, "run", str(paused_file), "--jobs", "1", "--retries", "0")
    wait_for(tmp_path, training)
    os.kill(worker_pid(tmp_path), signal.SIGKILL)
    out, _ = p.communicate(timeout=300)
    d = Path("sweeps") / sweep_dir(tmp_path).name
    assert p.returncode == 1, out
    assert out.splitlines()[-1] == (
        f"lmlab: Sweep {d.name} is incomplete: 1/2 done, 0 running, 1 failed, 0 interrupted, "
        "0 pending. Not finished: a-s1 (failed: died: killed by SIGKILL (out of memory?)) "
        f"(logs in {d / 'logs'}). Resume with: lmlab sweep resume {d}")
    rc, status, _ = cli(capsys, "sweep", "status", str(d))
    assert "failed" in status and "(died: killed by SIGKILL" in status
    rc, out, _ = cli(capsys, "sweep", "resume", str(d))
    assert rc == 0 and "a-s1 started (resuming)" in out
    assert folder.load(d)["runs"][0]["attempts"] == 2
    assert losses(d) == paused_reference[0]
    assert body(report(d)) == body(paused_reference[1])


@pytest.mark.slow
def test_driver_and_worker_killed_together_then_resumed(paused_file, paused_reference,
                                                        tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = driver(tmp_path, "run", str(paused_file), "--jobs", "1")
    wait_for(tmp_path, training)
    p.send_signal(signal.SIGSTOP)  # so that neither can see the other go first
    os.kill(worker_pid(tmp_path), signal.SIGKILL)
    p.kill()
    p.wait()
    d = Path("sweeps") / sweep_dir(tmp_path).name
    rc, status, _ = cli(capsys, "sweep", "status", str(d))
    assert any(line.split()[:2] == ["a-s1", "died"] for line in status.splitlines()), status
    assert f"Not running. Continue with: lmlab sweep resume {d}" in status
    rc, out, _ = cli(capsys, "sweep", "resume", str(d))
    assert rc == 0 and "a-s1 started (resuming)" in out
    assert losses(d) == paused_reference[0]
    assert body(report(d)) == body(paused_reference[1])


@pytest.mark.slow
def test_a_second_driver_is_refused_naming_the_first(paused_file, paused_reference, tmp_path,
                                                     capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = driver(tmp_path, "run", str(paused_file), "--jobs", "1")
    wait_for(tmp_path, training)
    d = Path("sweeps") / sweep_dir(tmp_path).name
    worker = worker_pid(tmp_path)
    os.kill(worker, signal.SIGSTOP)  # the first driver waits for it, however slow the second
    second = driver(tmp_path, "resume", str(d))
    out, _ = second.communicate(timeout=120)
    os.kill(worker, signal.SIGCONT)
    assert second.returncode == 2, out
    assert out.strip().splitlines()[-1] == (
        f"lmlab: error: Sweep {d} is being run by another driver (pid {first.pid} on host "
        f"{socket.gethostname()}, since " + out.split(", since ")[1].split(")")[0] + "). Only "
        "one driver may run a sweep: wait for it, or stop it (Ctrl-C, or kill -INT PID) and "
        "resume.")
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    assert len(list((tmp_path / "runs").iterdir())) == 2  # one folder per key
    assert [r["attempts"] for r in folder.load(d)["runs"]] == [1, 1]
    assert losses(d) == paused_reference[0]
    # one seed trained twice (a copied folder) is not two replicates
    run = Path(folder.load(d)["runs"][0]["run_dir"])
    shutil.copytree(run, run.with_name(run.name + "-copy"))
    rc, _, err = cli(capsys, "runs", "compare", str(run), str(run) + "-copy", "--group-by",
                     "variant")
    assert rc == 2 and "Refusing to count one seed twice as two replicates: a has seed 1 " \
        "2 times (a-s1 (" in error(err)
    rc, out, _ = cli(capsys, "runs", "compare", str(run), str(run) + "-copy")
    assert rc == 0 and out.startswith("Repeats, not replicates: same base config")
    assert "seeds repeat (1, 1) (sweep key a-s1)" in out.splitlines()[0]


def test_a_second_worker_for_one_key_exits_without_training(tmp_path, capsys):
    from lmlab.sweeps.worker import run_job

    (tmp_path / "claims").mkdir()
    claim = tmp_path / "claims" / "a-s1.json"
    with open(claim.with_suffix(".lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert run_job({"claim": str(claim)}) == 2
    assert "a-s1 is being trained by another process" in capsys.readouterr().err
    assert not claim.exists()


CRASH = '''
from lmlab.hooks.registry import register


@register("update")
def crash(named_params, *, step, lr):
    if step >= 2:
        raise RuntimeError("deliberate crash")
'''


def test_a_failing_run_is_retried_up_to_the_recorded_limit(corpus_dir, tmp_path, capsys,
                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "crash.py").write_text(CRASH)
    crash = {"hooks": {"plugins": [str(tmp_path / "crash.py")], "update": [{"name": "crash"}]}}
    path = write_sweep(tmp_path, corpus_dir, seeds=1, variants={"a": {}, "c": crash})
    rc, out, _ = cli(capsys, "sweep", "run", str(path), "--retries", "0", "--max-attempts", "2")
    d = sweep_dir(tmp_path)
    assert rc == 1 and out.splitlines()[-1].startswith(f"lmlab: Sweep {d.name} is incomplete")
    assert "Not finished: c-s1 (failed: exit 2)" in out.splitlines()[-1]
    assert folder.load(d)["max_attempts"] == 2
    rc, out, _ = cli(capsys, "sweep", "resume", str(d))
    assert rc == 1 and "c-s1 started" in out and folder.load(d)["runs"][1]["attempts"] == 2
    rc, out, _ = cli(capsys, "sweep", "resume", str(d))
    assert rc == 1 and "c-s1 started" not in out
    assert "c-s1: not retried, it failed 2 times (max_attempts 2, recorded in the index; " \
        "raise it with --max-attempts)" in out
    rc, out, _ = cli(capsys, "sweep", "resume", str(d), "--max-attempts", "3")
    assert rc == 1 and "c-s1 started" in out and folder.load(d)["runs"][1]["attempts"] == 3
