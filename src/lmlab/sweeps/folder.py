"""A sweep's folder: `sweeps/<sweep_id>/` with the resolved sweep file and the run index.

The index (index.json) maps each run key to its variant, grid point, seed,
config, status and run folder. Only the sweep driver writes it, atomically,
so a killed driver leaves the last consistent index for `sweep resume`.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.fileio import atomic_write_json, atomic_write_text
from lmlab.records import read_manifest, read_metrics
from lmlab.sweeps.spec import Sweep, dump_resolved

INDEX = "index.json"
FINISHED, RUNNING, PENDING, FAILED, INTERRUPTED = (
    "finished", "running", "pending", "failed", "interrupted")


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
             "runs": [{**r.label(), "config": r.config, "status": PENDING, "run_id": None,
                       "run_dir": None, "attempts": 0, "wall_s": None} for r in sweep.runs]}
    save(d, index)
    return d


def load(sweep_dir: str | Path) -> dict[str, Any]:
    d = Path(sweep_dir)
    path = d / INDEX
    if not path.is_file():
        raise LmlabError(f"{d} is not a sweep folder (it has no {INDEX}). Sweep folders are "
                         "made by `lmlab sweep run FILE`, under sweeps/ by default.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LmlabError(f"{path} cannot be read ({e}).") from None


def save(sweep_dir: Path, index: dict[str, Any]) -> None:
    atomic_write_json(Path(sweep_dir) / INDEX, index)


def counts(index: dict[str, Any]) -> dict[str, int]:
    out = {s: 0 for s in (FINISHED, RUNNING, FAILED, INTERRUPTED, PENDING)}
    for r in index["runs"]:
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out


def progress(run: dict[str, Any]) -> float:
    """Fraction of a run's steps done, from its metrics log."""
    if run["status"] == FINISHED:
        return 1.0
    if not run.get("run_dir"):
        return 0.0
    steps = [r.get("step", 0) for r in read_metrics(Path(run["run_dir"]))]
    return min(1.0, max(steps, default=0) / max(1, run["config"]["train"]["max_steps"]))


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


def status_line(index: dict[str, Any], jobs: int) -> str:
    c = counts(index)
    total = len(index["runs"])
    line = (f"{c[FINISHED]}/{total} done, {c[RUNNING]} running, {c[FAILED]} failed, "
            f"{c[INTERRUPTED]} interrupted, {c[PENDING]} pending")
    if c[FINISHED] < total:
        line += f"; {fmt_eta(eta_seconds(index, jobs))}"
    return line


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status_report(sweep_dir: str | Path) -> str:
    """`lmlab sweep status`: counts, ETA, and a line per run."""
    index = load(sweep_dir)
    jobs = index.get("jobs", 1)
    lines = [f"Sweep {index['sweep_id']}: {status_line(index, jobs)}"]
    for r in index["runs"]:
        manifest_status = ""
        if r.get("run_dir") and (Path(r["run_dir"]) / "manifest.json").is_file():
            manifest_status = read_manifest(Path(r["run_dir"])).get("status", "")
        pct = f"{progress(r) * 100:3.0f}%"
        lines.append(f"  {r['key']:<28} {r['status']:<12} {pct}  {r.get('run_id') or '-'}"
                     + (f"  (run says {manifest_status})" if manifest_status not in
                        ("", r["status"]) else ""))
    c = counts(index)
    alive = _alive(index.get("driver_pid"))
    if c[RUNNING] and not alive:
        lines.append("Its driver is no longer running (killed?): the runs marked running "
                     "saved a checkpoint and stopped.")
    if c[FINISHED] < len(index["runs"]) and not (c[RUNNING] and alive):
        lines.append(f"Not running. Continue with: lmlab sweep resume {sweep_dir}")
    return "\n".join(lines)
