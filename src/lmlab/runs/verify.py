"""`lmlab runs verify RUN`: is everything this run wrote still what it wrote?

What a conclusion rests on is checked, each against its own checksum:
- the manifest against its recorded `manifest_sha256`;
- every metrics.jsonl line against its `crc32` (and its shape), each damaged
  line named by file and line;
- every checkpoint: its recorded content hash, that every tensor is finite,
  and that the step and run id inside it match its file name and this run (a
  checkpoint copied over another name is caught);
- the TensorBoard event files, which are derived data: whether they agree with
  metrics.jsonl (`lmlab runs rebuild-tb RUN` rewrites them from it).
One line per file or damaged record, then an error (exit status 2) naming what
is damaged and the last good checkpoint.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.fileio import TMP_MARK, temp_path
from lmlab.model.checkpoint import (
    PREFIX,
    content_hash,
    list_checkpoints,
    load_checkpoint,
)
from lmlab.records import CRC, MANIFEST_HASH, metrics_problems, read_manifest, scalars


def _check_manifest(run_dir: Path) -> tuple[str | None, str | None]:
    """(the run id it records, the problem) of the run's manifest."""
    try:
        m = read_manifest(run_dir)
    except LmlabError as e:
        print(f"DAMAGED  manifest.json: {e}")
        return None, f"manifest.json: {e}"
    how = f"{MANIFEST_HASH} {m[MANIFEST_HASH][:16]}..." if MANIFEST_HASH in m else \
        "no recorded hash (older lmlab)"
    print(f"ok       manifest.json  {how}")
    return m.get("run_id"), None


def _check_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The good records, and a problem per damaged line."""
    records, bad = metrics_problems(run_dir)
    path = run_dir / "metrics.jsonl"
    for n, why, text in bad:
        print(f"DAMAGED  {path}:{n}: {why}: {text}")
    if path.exists():
        checked = sum(CRC in r for r in records)
        print(f"{'ok' if not bad else 'read':<8} metrics.jsonl  {len(records)} good records "
              f"({checked} with a crc32, {len(records) - checked} without: older lmlab)"
              + (f", {len(bad)} damaged" if bad else ""))
    return records, [f"metrics.jsonl line {n}" for n, *_ in bad]


def _check_checkpoint(p: Path, run_id: str | None) -> str:
    """The `ok` line of a checkpoint; LmlabError when it is damaged or not this one (its
    run id is checked against the manifest's, when that is readable)."""
    ckpt = load_checkpoint(p)  # checks the recorded hash and finiteness
    step = int(p.stem.removeprefix(PREFIX))
    if ckpt.get("step") != step or (run_id and ckpt.get("run_id", run_id) != run_id):
        raise LmlabError(f"it holds step {ckpt.get('step')} of run {ckpt.get('run_id')}, but "
                         f"its name says step {step} of run {run_id}: a checkpoint copied or "
                         "renamed over another")
    digest = ckpt.get("sha256")
    how = f"sha256 {digest}" if digest else \
        f"no recorded hash (older lmlab), content {content_hash(ckpt)}"
    return f"ok       {p.name}  step {ckpt.get('step')}  {how}"


def tb_scalars(run_dir: Path) -> dict[tuple[str, int], float] | None:
    """(tag, step) -> value of every scalar in the run's event files; None without tb/."""
    folder = run_dir / "tb"
    if not folder.is_dir():
        return None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def tb_disagreement(run_dir: Path, records: list[dict[str, Any]],
                    log_damaged: bool = False) -> str | None:
    """How the event files differ from metrics.jsonl, or None when they agree (or are off,
    or metrics.jsonl is damaged itself: then tb/ may hold what the damaged lines lost)."""
    found = tb_scalars(run_dir)
    if found is None:
        print("note     no tb/ folder (run.tensorboard was off); nothing to compare")
        return None
    want = {(tag, r["step"]): v for r in records for tag, v in scalars(r).items()}
    missing = [k for k in want if k not in found]
    extra = [k for k in found if k not in want]
    wrong = [k for k in want if k in found and not _same(want[k], found[k])]
    if not (missing or extra or wrong):
        print(f"ok       tb/  agrees with metrics.jsonl ({len(want)} scalars)")
        return None
    parts = [f"{len(x)} {what} (first: {x[0][0]} at step {x[0][1]})" for x, what in
             ((missing, "missing"), (wrong, "different"), (extra, "not in metrics.jsonl"))
             if x]
    if log_damaged:
        print(f"note     tb/ differs from the damaged metrics.jsonl ({', '.join(parts)}); it "
              "may hold what the damaged lines lost, so do not rebuild it from them")
        return None
    line = (f"tb/ disagrees with metrics.jsonl: {', '.join(parts)} of {len(want)} scalars; "
            f"rewrite it with `lmlab runs rebuild-tb {run_dir}`")
    print(f"DIFFERS  {line}")
    return line


def _same(a: float, b: float) -> bool:
    """Equal as TensorBoard stores them (float32), NaN equal to NaN."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-30)


def verify_run(run_dir: Path) -> list[Path]:
    """Check a run's records and checkpoints; returns the good checkpoints, oldest first."""
    run_id, problem = _check_manifest(run_dir)
    records, damaged_lines = _check_metrics(run_dir)
    problems = ([problem] if problem else []) + damaged_lines
    ckpts = list_checkpoints(run_dir / "checkpoints")
    good, bad = [], []
    for p in ckpts:
        try:
            line = _check_checkpoint(p, run_id)
        except LmlabError as e:
            bad.append(p)
            print(f"DAMAGED  {p.name}: {e}")
            continue
        good.append(p)
        print(line)
    temps = sorted(q.name for q in (run_dir / "checkpoints").glob(f".*{TMP_MARK}*"))
    if temps:
        print(f"note     {len(temps)} partial file(s) from interrupted writes, never read as "
              f"checkpoints: {', '.join(temps)}")
    if not ckpts:
        print(f"no checkpoints in {run_dir / 'checkpoints'}")
    tb = tb_disagreement(run_dir, records, bool(damaged_lines))
    if bad:
        last = f"the last good one is {good[-1]}" if good else "none is good"
        problems.append(f"{len(bad)} of {len(ckpts)} checkpoints ({', '.join(p.name for p in bad)}"
                        f"; {last})")
    if problems or tb:
        found = "; ".join(p.rstrip(".") for p in problems + ([tb] if tb else []))
        raise LmlabError(f"Run {run_dir.name} is damaged: {found}.")
    return good


def rebuild_tb(run_dir: Path) -> str:
    """Rewrite the run's TensorBoard event files from metrics.jsonl (the record)."""
    from lmlab.train.tensorboard import TensorBoardLog

    records, bad = metrics_problems(run_dir)
    folder, fresh = run_dir / "tb", temp_path(run_dir / "tb")
    shutil.rmtree(fresh, ignore_errors=True)
    log = TensorBoardLog(fresh)
    for r in records:
        log(r)
    log.close()
    fresh.mkdir(exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    fresh.rename(folder)
    skipped = f"; {len(bad)} damaged line(s) of metrics.jsonl left out" if bad else ""
    return (f"Rewrote {folder} from metrics.jsonl: {len(records)} records{skipped}. Text "
            "samples and histograms, which metrics.jsonl does not hold, are not rebuilt.")

