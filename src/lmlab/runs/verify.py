"""`lmlab runs verify RUN`: is everything this run wrote still what it wrote?

Each checkpoint is loaded, its recorded content hash checked and every tensor
checked finite; the manifest and metrics log are read as `runs list` reads
them (damaged lines are named on stderr). One line per checkpoint, then an
error (exit status 2) naming the damaged ones and the last good one.
"""

from __future__ import annotations

from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.fileio import TMP_MARK
from lmlab.model.checkpoint import (
    content_hash,
    list_checkpoints,
    load_checkpoint,
)
from lmlab.records import read_manifest, read_metrics


def verify_run(run_dir: Path) -> list[Path]:
    """Check a run's checkpoints and records; returns the good checkpoints, oldest first."""
    try:
        read_manifest(run_dir)
        manifest_problem = None
    except LmlabError as e:
        manifest_problem = str(e)
        print(f"DAMAGED  manifest.json: {e}")
    read_metrics(run_dir)
    ckpts = list_checkpoints(run_dir / "checkpoints")
    good, bad = [], []
    for p in ckpts:
        try:
            ckpt = load_checkpoint(p)  # checks the recorded hash and finiteness
        except LmlabError as e:
            bad.append(p)
            print(f"DAMAGED  {p.name}: {e}")
            continue
        good.append(p)
        digest = ckpt.get("sha256")
        how = f"sha256 {digest}" if digest else \
            f"no recorded hash (older lmlab), content {content_hash(ckpt)}"
        print(f"ok       {p.name}  step {ckpt.get('step')}  {how}")
    temps = sorted(q.name for q in (run_dir / "checkpoints").glob(f".*{TMP_MARK}*"))
    if temps:
        print(f"note     {len(temps)} partial file(s) from interrupted writes, never read as "
              f"checkpoints: {', '.join(temps)}")
    if not ckpts:
        print(f"no checkpoints in {run_dir / 'checkpoints'}")
    if bad:
        last = f"the last good one is {good[-1]}" if good else "none is good"
        raise LmlabError(f"{len(bad)} of {len(ckpts)} checkpoints of run {run_dir.name} are "
                         f"damaged ({', '.join(p.name for p in bad)}); {last}.")
    if manifest_problem:
        raise LmlabError(f"The checkpoints of run {run_dir.name} are good, but {manifest_problem}")
    return good
