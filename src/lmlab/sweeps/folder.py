"""A sweep's folder: `sweeps/<sweep_id>/` with the resolved sweep file and the run index.

The index (index.json) maps each run key to its variant, grid point, seed,
config, status and run folder. Only the sweep driver writes it, atomically,
so a killed driver leaves the last consistent index for `sweep resume`; one
driver at a time, as it holds an exclusive lock on `driver.lock` while it runs
(the kernel releases it when the driver dies, however it dies).

Every file read here is checked against its schema: a damaged one is named in
one line with the fix (`lmlab sweep repair`, which rebuilds the index from the
run folders' manifests), never a traceback. A finished run whose folder is gone
is *missing*: `status` says so, `report` refuses, `resume` runs it again.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import fcntl
import json
import math
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.fileio import atomic_write_json, atomic_write_text, pid_alive
from lmlab.records import effective_status, read_manifest, read_metrics
from lmlab.sweeps.spec import Sweep, dump_resolved

INDEX, LOCK = "index.json", "driver.lock"
FINISHED, RUNNING, PENDING, FAILED, INTERRUPTED = (
    "finished", "running", "pending", "failed", "interrupted")
STATUSES = (FINISHED, RUNNING, PENDING, FAILED, INTERRUPTED)
MISSING, DIED = "missing", "died"  # shown by `status`, never stored
MAX_ATTEMPTS = 3  # a run that failed or died this often is not retried (recorded per sweep)


def now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


def create(sweep: Sweep, root: str | Path, source: str | Path) -> Path:
    """Write sweeps/<sweep_id>/ with sweep.yaml (as resolved) and index.json (all pending)."""
    root = Path(root)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    sweep_id, n = f"{stamp}-{sweep.name}", 1
    while (root / sweep_id).exists():
        n += 1
        sweep_id = f"{stamp}-{sweep.name}-{n}"
    d = root / sweep_id
    (d / "claims").mkdir(parents=True)
    atomic_write_text(d / "sweep.yaml", dump_resolved(sweep))
    index = {"sweep_id": sweep_id, "name": sweep.name, "source": str(source),
             "created_at": now(), "baseline": sweep.baseline, "variants": sweep.variants,
             "points": sweep.points, "seeds": sweep.seeds,
             "max_attempts": MAX_ATTEMPTS, "runs": [new_entry(r) for r in sweep.runs]}
    save(d, index)
    return d


def new_entry(run: Any) -> dict[str, Any]:
    """The index entry of a SweepRun that has not started."""
    return {**run.label(), "config": run.config, "status": PENDING, "run_id": None,
            "run_dir": None, "attempts": 0, "wall_s": None, "reason": None}


# the index's schema: field -> accepted types (checked on every load)
_STR, _INT, _OPT_STR = (str,), (int,), (str, type(None))
INDEX_FIELDS = {"sweep_id": _STR, "baseline": _STR, "variants": (list,), "points": (list,),
                "seeds": (list,), "runs": (list,)}
RUN_FIELDS = {"key": _STR, "variant": _STR, "point_id": _INT, "point": (dict,),
              "seed": _INT, "config": (dict,), "status": _STR, "run_id": _OPT_STR,
              "run_dir": _OPT_STR, "attempts": _INT}


def damaged(path: Path, what: str) -> LmlabError:
    """The one line for a damaged sweep file: which file, what is wrong, how to fix it."""
    d = path.parent if path.name == INDEX else path.parent.parent
    return LmlabError(f"{path} is damaged ({what}). Rebuild the index from the run folders' "
                      f"manifests with `lmlab sweep repair {d}`, or delete {d} and run the "
                      "sweep again.")


def read_json(path: Path) -> Any:
    """A JSON file's content; `damaged` naming it when it is not UTF-8 JSON."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise damaged(path, f"not UTF-8 text: byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise damaged(path, f"not JSON: {e}") from None


def _shape_problem(index: Any) -> str | None:
    """Why a parsed index does not fit the schema, or None."""
    if not isinstance(index, dict):
        return f"a JSON {type(index).__name__}, not an object"
    for key, types in INDEX_FIELDS.items():
        if not isinstance(index.get(key), types):
            return f"no valid '{key}'"
    if not index["runs"]:
        return "no runs"
    for n, r in enumerate(index["runs"]):
        problem = _run_problem(n, r)
        if problem:
            return problem
    return _shared_problem(index["runs"])


def _run_problem(n: int, r: Any) -> str | None:
    """Why one run entry does not fit the schema, or None."""
    if not isinstance(r, dict):
        return f"run entry {n} is not an object"
    for key, types in RUN_FIELDS.items():
        if not isinstance(r.get(key), types) or isinstance(r.get(key), bool):
            return f"run entry {n} ({r.get('key', '?')}) has no valid '{key}'"
    if r["status"] not in STATUSES:
        return f"run {r['key']} has status {r['status']!r}, not one of {', '.join(STATUSES)}"
    return None


def _shared_problem(runs: list[dict[str, Any]]) -> str | None:
    """A key given twice, or one folder standing for two runs (compared with itself)."""
    keys = collections.Counter(r["key"] for r in runs)
    twice = [k for k, n in keys.items() if n > 1]
    if twice:
        return f"the run key {twice[0]} appears {keys[twice[0]]} times"
    folders: dict[str, str] = {}
    for r in runs:
        other = folders.setdefault(r["run_dir"], r["key"]) if r["run_dir"] else r["key"]
        if other != r["key"]:
            return f"runs {other} and {r['key']} share the folder {r['run_dir']}"
    return None


def load(sweep_dir: str | Path) -> dict[str, Any]:
    """The index, checked against its schema (a damaged one is named with the fix)."""
    d = Path(sweep_dir)
    path = d / INDEX
    if not path.is_file():
        raise LmlabError(f"{d} is not a sweep folder (it has no {INDEX}). Sweep folders are "
                         "made by `lmlab sweep run FILE`, under sweeps/ by default.")
    index = read_json(path)
    problem = _shape_problem(index)
    if problem:
        raise damaged(path, problem)
    return index


def read_claim(sweep_dir: Path, key: str) -> dict[str, Any] | None:
    """The run id and folder a worker claimed for `key`; None when there is none or it is
    damaged (a claim is a hint: the index and the run's manifest are the record)."""
    path = Path(sweep_dir) / "claims" / f"{key}.json"
    if not path.is_file():
        return None
    try:
        c = read_json(path)
    except LmlabError:
        return None
    ok = isinstance(c, dict) and all(isinstance(c.get(k), str) for k in ("run_id", "run_dir"))
    return c if ok else None


@contextlib.contextmanager
def driver_lock(sweep_dir: str | Path) -> Iterator[None]:
    """Hold the sweep's exclusive driver lock (flock: the kernel frees it when we die).

    A second driver of the same sweep gets one line naming the holder's pid and host.
    """
    path = Path(sweep_dir) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                h = json.loads(os.pread(fd, 4096, 0).decode())
                holder = f"pid {h['pid']} on host {h['host']}, since {h['since']}"
            except (ValueError, KeyError, TypeError):
                holder = "a process that has not yet written its pid"
            raise LmlabError(f"Sweep {sweep_dir} is being run by another driver ({holder}). "
                             "Only one driver may run a sweep: wait for it, or stop it "
                             "(Ctrl-C, or kill -INT PID) and resume.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": now()}).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def save(sweep_dir: Path, index: dict[str, Any]) -> None:
    atomic_write_json(Path(sweep_dir) / INDEX, index)


def is_missing(run: dict[str, Any]) -> bool:
    """A finished run whose folder (or its manifest) is gone."""
    return run["status"] == FINISHED and not (
        run.get("run_dir") and (Path(run["run_dir"]) / "manifest.json").is_file())


def counts(index: dict[str, Any]) -> dict[str, int]:
    """Runs per status; a finished run whose folder is gone counts as missing, not finished."""
    out = {s: 0 for s in (FINISHED, RUNNING, FAILED, INTERRUPTED, PENDING, MISSING)}
    for r in index["runs"]:
        out[MISSING if is_missing(r) else r["status"]] += 1
    return out


def died_reason(rc: int) -> str:
    """Why a worker that exited with a negative status (a signal) stopped."""
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        name = f"signal {-rc}"
    return f"died: killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")


def unfinished(index: dict[str, Any], limit: int = 8) -> str:
    """`a-s3 (failed: died: killed by SIGKILL), b-s1 (pending)`: the runs not done, and why."""
    items = []
    for r in index["runs"]:
        if r["status"] == FINISHED and not is_missing(r):
            continue
        why = MISSING if is_missing(r) else r["status"]
        if r.get("reason") and r["status"] != FINISHED:
            why += f": {r['reason']}"
        items.append(f"{r['key']} ({why})")
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def progress(run: dict[str, Any]) -> float:
    """Fraction of a run's steps done, from its metrics log."""
    if run["status"] == FINISHED:
        return 1.0
    if not run.get("run_dir"):
        return 0.0
    steps = [r.get("step", 0) for r in read_metrics(Path(run["run_dir"]), quiet=True)]
    total = (run["config"].get("train") or {}).get("max_steps")
    return min(1.0, max(steps, default=0) / total) if isinstance(total, int) and total > 0 \
        else 0.0


def eta_seconds(index: dict[str, Any], jobs: int) -> float | None:
    """Time left for the whole sweep: the mean finished run's wall time x work left / jobs."""
    walls = [r["wall_s"] for r in index["runs"] if r["status"] == FINISHED and r.get("wall_s")]
    if not walls:
        return None
    left = sum(1.0 - progress(r) for r in index["runs"] if r["status"] != FINISHED)
    return sum(walls) / len(walls) * left / max(1, jobs)


def fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA after the first run"
    if seconds < 60:
        return f"ETA {math.ceil(seconds)} s"
    return f"ETA {seconds // 3600:.0f}h{seconds % 3600 / 60:02.0f}m" if seconds >= 3600 else \
        f"ETA {seconds / 60:.1f} min"


def status_line(index: dict[str, Any], jobs: int, eta: bool = True) -> str:
    c = counts(index)
    total = len(index["runs"])
    line = (f"{c[FINISHED]}/{total} done, {c[RUNNING]} running, {c[FAILED]} failed, "
            f"{c[INTERRUPTED]} interrupted, {c[PENDING]} pending"
            + (f", {c[MISSING]} missing" if c[MISSING] else ""))
    if eta and c[FINISHED] < total:
        line += f"; {fmt_eta(eta_seconds(index, jobs))}"
    return line


def driver_alive(sweep_dir: str | Path) -> bool:
    """Whether the driver named in the sweep's lock file is a live process on this host."""
    try:
        h = json.loads((Path(sweep_dir) / LOCK).read_text())
        return h["host"] == socket.gethostname() and pid_alive(int(h["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def shown_status(r: dict[str, Any], driver_alive: bool) -> tuple[str, str]:
    """What `status` says of a run: its status (or missing, died) and a note."""
    if is_missing(r):
        return MISSING, f"its folder {r.get('run_dir')} is gone; resume runs it again"
    note = r.get("reason") or "" if r["status"] != FINISHED else ""
    if not r.get("run_dir") or not (Path(r["run_dir"]) / "manifest.json").is_file():
        return r["status"], note
    try:
        said = effective_status(read_manifest(Path(r["run_dir"])))
    except LmlabError as e:
        return r["status"], str(e)
    if r["status"] == RUNNING and said in (DIED, INTERRUPTED, FAILED):
        return (DIED if said == DIED else said), "resume continues it from its checkpoint"
    if r["status"] == RUNNING and not driver_alive:
        return RUNNING, "its driver is gone (killed?); the run saves a checkpoint and stops"
    if r["status"] == FINISHED:
        evals = [m["val_loss"] for m in read_metrics(Path(r["run_dir"]), quiet=True)
                 if m["kind"] == "eval"]
        if evals and not math.isfinite(evals[-1]):
            note = f"diverged: final val loss {evals[-1]}"
    if said not in (None, r["status"]) and not (r["status"] == FAILED and said == DIED):
        note = f"run says {said}" + (f"; {note}" if note else "")
    return r["status"], note


def status_report(sweep_dir: str | Path) -> str:
    """`lmlab sweep status`: counts, ETA, and a line per run (died, failed, missing, why)."""
    index = load(sweep_dir)
    jobs = index.get("jobs", 1)
    alive = driver_alive(sweep_dir)
    lines = [f"Sweep {index['sweep_id']}: {status_line(index, jobs)}"]
    for r in index["runs"]:
        status, note = shown_status(r, alive)
        pct = f"{progress(r) * 100:3.0f}%"
        lines.append(f"  {r['key']:<28} {status:<12} {pct}  {r.get('run_id') or '-'}"
                     + (f"  ({note})" if note else ""))
    if unfinished(index):
        lines.append(f"A driver is running it (see {Path(sweep_dir) / LOCK})." if alive else
                     f"Not running. Continue with: lmlab sweep resume {sweep_dir}")
    return "\n".join(lines)
