"""`lmlab sweep repair`: rebuild a damaged index.json from what the sweep left on disk.

The index is the driver's summary; the record is the resolved sweep file
(sweep.yaml, which expands to the same runs and keys) and each run folder's
manifest, which names its sweep id and key. So a lost or damaged index can be
rebuilt: every key gets the folder whose manifest claims it (a finished one
before others), its status from that manifest, and pending when no folder
does. The damaged index is kept beside the new one.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from lmlab.config import read_yaml
from lmlab.errors import LmlabError
from lmlab.records import effective_status, read_manifest
from lmlab.sweeps import folder
from lmlab.sweeps.spec import expand

# a run folder's status -> the index's (a run that stopped mid-way continues on resume)
FROM_MANIFEST = {"finished": folder.FINISHED, "failed": folder.FAILED}


def _claimed_folders(sweep_id: str, roots: set[Path], notes: list[str]
                     ) -> dict[str, list[tuple[Path, dict[str, Any]]]]:
    """Sweep key -> (run folder, manifest) of every run folder this sweep made."""
    found: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for root in sorted(roots):
        for run_dir in sorted(root.iterdir()) if root.is_dir() else []:
            if not (run_dir / "manifest.json").is_file():
                continue
            try:
                m = read_manifest(run_dir)
            except LmlabError as e:
                notes.append(f"skipped {run_dir}: {e}")
                continue
            sweep = m.get("sweep") if isinstance(m.get("sweep"), dict) else {}
            if sweep.get("id") == sweep_id and isinstance(sweep.get("key"), str):
                found.setdefault(sweep["key"], []).append((run_dir.resolve(), m))
    return found


def repair(sweep_dir: str | Path) -> str:
    """Rebuild `sweep_dir`/index.json; returns what was found, one line per note."""
    d = Path(sweep_dir)
    source = d / "sweep.yaml"
    if not source.is_file():
        raise LmlabError(f"{d} has no sweep.yaml, so its runs cannot be rebuilt; delete {d} "
                         "and run the sweep again.")
    with folder.driver_lock(d):
        try:
            sweep = expand(read_yaml(source))
        except LmlabError as e:
            raise LmlabError(f"{source} cannot be expanded again ({e}); delete {d} and run the "
                             "sweep again.") from None
        notes: list[str] = []
        roots = {Path(r.config["run"]["out_dir"]) for r in sweep.runs}
        found = _claimed_folders(d.name, roots, notes)
        index = {"sweep_id": d.name, "name": sweep.name, "source": str(source),
                 "created_at": folder.now(), "baseline": sweep.baseline,
                 "variants": sweep.variants, "points": sweep.points, "seeds": sweep.seeds,
                 "max_attempts": folder.MAX_ATTEMPTS, "repaired_at": folder.now(),
                 "runs": [folder.new_entry(r) for r in sweep.runs]}
        for r in index["runs"]:
            folders = sorted(found.pop(r["key"], []), key=lambda f: (
                f[1].get("status") == "finished", str(f[1].get("updated_at"))))
            if not folders:
                continue
            run_dir, m = folders[-1]
            status = effective_status(m)
            r.update(run_id=m.get("run_id", run_dir.name), run_dir=str(run_dir), attempts=1,
                     status=FROM_MANIFEST.get(status, folder.INTERRUPTED))
            if len(folders) > 1:
                notes.append(f"{r['key']}: {len(folders)} folders claim it; kept {run_dir} "
                             f"({status}), not {', '.join(str(f[0]) for f in folders[:-1])}")
        notes += [f"ignored folders of unknown key {k}" for k in found]
        old = d / folder.INDEX
        if old.exists():
            old.rename(d / f"{folder.INDEX}.damaged-{dt.datetime.now():%Y%m%d-%H%M%S}")
        (d / "claims").mkdir(exist_ok=True)
        folder.save(d, index)
    c = folder.counts(index)
    return "\n".join([*notes, f"Rebuilt {old} from {source} and the run folders: "
                      f"{folder.status_line(index, 1, eta=False)}. Continue with: lmlab sweep "
                      f"resume {d}" if folder.unfinished(index) else
                      f"Rebuilt {old}: all {c[folder.FINISHED]} runs finished."])
