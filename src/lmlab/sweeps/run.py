"""Running a sweep: start it, resume it, retry what failed, stop it cleanly.

The driver owns the index; runs own their folders. Every run's config was
validated and the set-ups checked before the first run starts. One driver runs
a sweep at a time (folder.driver_lock). A resume keeps finished runs, continues
interrupted ones from their newest checkpoint, runs missing ones again and
retries failed ones (a run whose process died, SIGKILL or out of memory, is
failed) up to the sweep's recorded `max_attempts`; it first waits for any run a
killed driver left behind to save and stop (each run holds a lock while it lives).

A sweep that ends with any run not finished raises SweepIncomplete: its one
line names the runs, why, and the resume command, and the CLI exits 1.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.model.checkpoint import list_checkpoints
from lmlab.records import effective_status, read_manifest
from lmlab.sweeps import folder
from lmlab.sweeps.executors import LocalExecutor, RayExecutor, check_reachable
from lmlab.sweeps.spec import check_setups, load_sweep
from lmlab.sweeps.worker import EXIT_INTERRUPTED

DEFAULT_JOBS, DEFAULT_THREADS = 2, 1  # measured by benchmarks/bench_sweep.py on 2 cores


class SweepInterrupted(LmlabError):
    pass


class SweepIncomplete(LmlabError):
    """The driver ended with runs failed, died, interrupted, missing or pending."""


def start(file: str | Path, root: str | Path = "sweeps", jobs: int = DEFAULT_JOBS,
          threads: int = DEFAULT_THREADS, backend: str = "local", address: str | None = None,
          retries: int = 1, yes: bool = False, out: Callable[[str], None] = print,
          max_attempts: int | None = None) -> Path:
    """Validate and expand the sweep file, write its folder, run every run; returns the folder."""
    _check_counts(jobs, threads, retries, max_attempts)
    sweep = load_sweep(file, yes)
    check_setups(sweep)
    if backend == "ray" and address:
        check_reachable(address)
    d = folder.create(sweep, root, file)
    out(f"Sweep {d.name}: {len(sweep.runs)} runs ({len(sweep.variants)} variants x "
        f"{len(sweep.points)} points x {len(sweep.seeds)} seeds) in {d}")
    execute(d, jobs, threads, backend, address, retries, out, max_attempts)
    return d


def resume(sweep_dir: str | Path, jobs: int | None = None, threads: int | None = None,
           backend: str | None = None, address: str | None = None, retries: int = 1,
           out: Callable[[str], None] = print, max_attempts: int | None = None) -> Path:
    """Continue a sweep: the settings it last ran with unless others are given."""
    d = Path(sweep_dir)
    index = folder.load(d)
    jobs = jobs or index.get("jobs", DEFAULT_JOBS)
    threads = threads or index.get("threads_per_job", DEFAULT_THREADS)
    backend = backend or index.get("backend", "local")
    address = address or (index.get("address") if backend == "ray" else None)
    _check_counts(jobs, threads, retries, max_attempts)
    execute(d, jobs, threads, backend, address, retries, out, max_attempts)
    return d


def _check_counts(jobs: int, threads: int, retries: int, max_attempts: int | None) -> None:
    for name, v, low in (("--jobs", jobs, 1), ("--threads-per-job", threads, 1),
                         ("--retries", retries, 0), ("--max-attempts", max_attempts or 1, 1)):
        if v < low:
            raise LmlabError(f"{name} = {v} must be at least {low}.")


def _wait_for_leftover(d: Path, key: str, out: Callable[[str], None]) -> None:
    """Block until a run started by an earlier (killed) driver has saved and exited."""
    lock_path = d / "claims" / f"{key}.lock"
    if not lock_path.exists():
        return
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            out(f"{key}: waiting for the run left by the earlier driver to save and stop...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_UN)


def reconcile(d: Path, index: dict[str, Any], out: Callable[[str], None]) -> None:
    """Bring the index up to date with the run folders (after a kill, runs may have moved on)."""
    for r in index["runs"]:
        if folder.is_missing(r):
            out(f"{r['key']}: finished, but its folder {r['run_dir']} is gone (missing); "
                "running it again")
            r.update(status=folder.PENDING, run_id=None, run_dir=None,
                     reason=f"missing: {r['run_dir']} was gone")
            (d / "claims" / f"{r['key']}.json").unlink(missing_ok=True)  # names the gone folder
        if r["status"] == folder.FINISHED:
            continue
        _wait_for_leftover(d, r["key"], out)
        claim = folder.read_claim(d, r["key"])
        if claim is not None:
            r["run_id"], r["run_dir"] = claim["run_id"], claim["run_dir"]
        elif (d / "claims" / f"{r['key']}.json").is_file():
            out(f"{r['key']}: ignoring {d / 'claims' / (r['key'] + '.json')} (damaged); the "
                "index's run folder stands")
        said = _manifest_status(r)
        if said == folder.FINISHED:
            r["status"] = folder.FINISHED
            continue
        if r["status"] == folder.RUNNING:
            r["status"] = folder.INTERRUPTED
            if said == folder.DIED:
                r["reason"] = "died while its driver was gone; continues from its checkpoint"


def _manifest_status(r: dict[str, Any]) -> str | None:
    """What the run's own manifest says (`died` for a dead process), None if unreadable."""
    if not (r["run_dir"] and (Path(r["run_dir"]) / "manifest.json").is_file()):
        return None
    try:
        return effective_status(read_manifest(Path(r["run_dir"])))
    except LmlabError:
        return None


def job_for(r: dict[str, Any], index: dict[str, Any]) -> dict[str, Any]:
    """What the worker needs: the config, the checkpoint to resume from, the manifest labels."""
    resume = None
    run_dir = Path(r["run_dir"]) if r.get("run_dir") else None
    if run_dir is not None and list_checkpoints(run_dir / "checkpoints"):
        resume = str(run_dir)
    elif run_dir is not None and run_dir.is_dir():
        # a run stopped before its first checkpoint: nothing to keep, start it afresh
        m = run_dir / "manifest.json"
        if not m.is_file() or _ours(run_dir, index["sweep_id"]):
            shutil.rmtree(run_dir)
        r["run_id"] = r["run_dir"] = None
    label = {k: r[k] for k in ("key", "variant", "point_id", "point", "seed")}
    return {"config": r["config"], "resume": resume,
            "sweep": {"id": index["sweep_id"], **label}}


def _ours(run_dir: Path, sweep_id: str) -> bool:
    """Whether the run folder was made by this sweep (a damaged manifest counts as ours)."""
    try:
        return (read_manifest(run_dir).get("sweep") or {}).get("id") == sweep_id
    except LmlabError:
        return True


def _executor(backend: str, threads: int, address: str | None, d: Path):
    if backend == "local":
        return LocalExecutor(threads, d)
    if backend == "ray":
        return RayExecutor(threads, address)
    raise LmlabError(f"Unknown backend '{backend}'; use local or ray.")


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def execute(d: Path, jobs: int, threads: int, backend: str, address: str | None,
            retries: int, out: Callable[[str], None] = print,
            max_attempts: int | None = None) -> dict[str, Any]:
    """Run every unfinished run of the sweep in `d`, holding its driver lock."""
    with folder.driver_lock(d):
        index = _drive(d, jobs, threads, backend, address, retries, out, max_attempts)
    left = folder.unfinished(index)
    if left:
        logs = f" (logs in {d / 'logs'})" if folder.counts(index)[folder.FAILED] else ""
        raise SweepIncomplete(f"Sweep {index['sweep_id']} is incomplete: "
                              f"{folder.status_line(index, jobs, eta=False)}. Not finished: "
                              f"{left}{logs}. Resume with: lmlab sweep resume {d}")
    out(f"Sweep {index['sweep_id']}: {folder.status_line(index, jobs)}. "
        f"Report: lmlab sweep report {d}")
    return index


def _queue(index: dict[str, Any], out: Callable[[str], None]) -> list[str]:
    """The runs to start, in order; failed runs past the attempt limit stay failed."""
    limit, queue = index["max_attempts"], []
    for r in index["runs"]:
        if r["status"] == folder.FINISHED:
            continue
        if r["status"] == folder.FAILED and r["attempts"] >= limit:
            out(f"{r['key']}: not retried, it failed {r['attempts']} times (max_attempts "
                f"{limit}, recorded in the index; raise it with --max-attempts)")
            continue
        queue.append(r["key"])
    return queue


def _launch(d: Path, index: dict[str, Any], r: dict[str, Any], executor: Any, jobs: int,
            out: Callable[[str], None]) -> None:
    """Start run `r` (resuming from its checkpoint when it has one) and record the attempt."""
    job = job_for(r, index)
    r["status"], r["attempts"] = folder.RUNNING, r["attempts"] + 1
    executor.start(r["key"], job)
    folder.save(d, index)
    out(f"{r['key']} started" + (" (resuming)" if job["resume"] else "") +
        f" [{folder.status_line(index, jobs)}]")


def _follow_claims(d: Path, index: dict[str, Any], by_key: dict[str, dict[str, Any]],
                   started: dict[str, float], executor: Any) -> None:
    """Record the run folder each running worker has claimed, once it has claimed one."""
    changed = False
    for key in started:
        c = executor.claimed(key)
        if c and by_key[key]["run_id"] != c["run_id"]:
            by_key[key]["run_id"], by_key[key]["run_dir"] = c["run_id"], c["run_dir"]
            changed = True
    if changed:
        folder.save(d, index)


def _record(d: Path, index: dict[str, Any], r: dict[str, Any], o: Any, wall_s: float,
            tries: int, stopping: bool, out: Callable[[str], None]) -> bool:
    """Record run `r`'s outcome `o` in the index; True when it is to be retried."""
    retry = False
    r["run_id"], r["run_dir"] = o.run_id or r["run_id"], o.run_dir or r["run_dir"]
    if o.rc == 0:
        r["status"], r["wall_s"], r["reason"] = folder.FINISHED, round(wall_s, 2), None
    elif o.rc == EXIT_INTERRUPTED or stopping:
        r["status"], r["reason"] = folder.INTERRUPTED, None
    else:
        r["status"] = folder.FAILED
        r["reason"] = folder.died_reason(o.rc) if o.rc < 0 else f"exit {o.rc}"
        out(f"{o.key} failed ({r['reason']}); its log ends:\n{o.log_tail.rstrip()[-800:]}")
        if tries <= index["retries"] and r["attempts"] < index["max_attempts"]:
            r["status"], retry = folder.PENDING, True
            out(f"{o.key}: retry {tries} of {index['retries']}")
    folder.save(d, index)
    out(f"{o.key} {r['status']} [{folder.status_line(index, index['jobs'])}]")
    return retry


def _drive(d: Path, jobs: int, threads: int, backend: str, address: str | None,
           retries: int, out: Callable[[str], None], max_attempts: int | None
           ) -> dict[str, Any]:
    index = folder.load(d)
    index.update(jobs=jobs, threads_per_job=threads, backend=backend, address=address,
                 driver_pid=os.getpid(), retries=retries,
                 max_attempts=max_attempts or index.get("max_attempts", folder.MAX_ATTEMPTS))
    reconcile(d, index, out)
    folder.save(d, index)
    by_key = {r["key"]: r for r in index["runs"]}
    queue = _queue(index, out)
    if not queue:
        if not folder.unfinished(index):
            out(f"All {len(index['runs'])} runs are finished.")
        return index
    executor = _executor(backend, threads, address, d)
    tries: dict[str, int] = {}
    started: dict[str, float] = {}
    stopping = False
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)

    def finish(o) -> None:
        wall_s = time.monotonic() - started.pop(o.key)
        if _record(d, index, by_key[o.key], o, wall_s, tries[o.key], stopping, out):
            queue.append(o.key)

    try:
        while queue or started:
            while queue and len(started) < jobs:
                key = queue.pop(0)
                tries[key] = tries.get(key, 0) + 1
                started[key] = time.monotonic()
                _launch(d, index, by_key[key], executor, jobs, out)
            for o in executor.poll(1.0):
                finish(o)
            _follow_claims(d, index, by_key, started, executor)
    except KeyboardInterrupt:
        out(f"Interrupted: asking {len(started)} running run(s) to save a checkpoint and stop "
            "(Ctrl-C again to kill them)...")
        queue.clear()
        stopping = True
        executor.interrupt()
        try:
            while started:
                for o in executor.poll(1.0):
                    finish(o)
        except KeyboardInterrupt:
            executor.kill()
            for key in list(started):
                by_key[key]["status"] = folder.INTERRUPTED
        folder.save(d, index)
        raise SweepInterrupted(f"Sweep stopped: {folder.status_line(index, jobs)}. "
                               f"Resume with: lmlab sweep resume {d}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        executor.close()
    return index
