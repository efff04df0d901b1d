"""`lmlab sweep report`: per variant and grid point, n, mean ± sd, a 95% interval; each
variant against the baseline with Welch's t-test and a bootstrap interval; bands as a PNG.

The statistics and the mixed-set-up refusal are the ones `runs compare
--group-by variant` uses (lmlab.runs.aggregate); here the groups come from the
sweep's index and each grid point is a block of its own. A finished run whose
folder is gone is missing: the report refuses (or, with allow_missing, says so
and reports the n that is left). A run whose manifest is unreadable is named
and left out; the rest is reported. Diverged runs are listed, never averaged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.runs.aggregate import aggregate, format_aggregate, load_run, plot_bands
from lmlab.sweeps import folder


def _blocks(index: dict[str, Any]) -> tuple[dict[str, dict[str, list]], list[str]]:
    """Grid point -> variant -> loaded runs; runs without a readable folder are noted."""
    notes, blocks = [], {}
    for pid, point in enumerate(index["points"]):
        where = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in point.items())
        groups: dict[str, list] = {v: [] for v in index["variants"]}
        for r in index["runs"]:
            if r["point_id"] != pid:
                continue
            run_dir = Path(r["run_dir"]) if r.get("run_dir") else None
            if folder.is_missing(r):
                notes.append(f"left out {r['key']}: MISSING, it finished but its folder "
                             f"{r['run_dir']} is gone (`lmlab sweep resume` runs it again)")
                continue
            if run_dir is None or not (run_dir / "manifest.json").is_file():
                notes.append(f"left out {r['key']}: status {r['status']}, no run folder")
                continue
            try:
                run = load_run(run_dir)
            except LmlabError as e:
                notes.append(f"left out {r['key']}: {e}")
                continue
            if r["status"] != folder.FINISHED:
                run["status"] = r["status"]
            groups.setdefault(r["variant"], []).append(run)
        blocks[where] = groups
    return blocks, notes


def report(sweep_dir: str | Path, metric: str = "final_val", plot: str | Path | None = None,
           as_json: bool = False, allow_missing: bool = False) -> str:
    index = folder.load(sweep_dir)
    missing = [r["key"] for r in index["runs"] if folder.is_missing(r)]
    if missing and not allow_missing:
        raise LmlabError(f"{len(missing)} finished run(s) of sweep {index['sweep_id']} are "
                         f"missing, their folders gone: {', '.join(missing)}. Run them again "
                         f"with `lmlab sweep resume {sweep_dir}`, or report what is left with "
                         "--allow-missing.")
    blocks, notes = _blocks(index)
    result = aggregate(blocks, index["baseline"], metric)
    result["warnings"] = notes + result["warnings"]
    result |= {"sweep_id": index["sweep_id"], "status": folder.counts(index)}
    if plot is not None:
        result["plot"] = str(plot_bands(blocks, plot, f"sweep {index['sweep_id']}: val loss, "
                                                      "mean and 95% interval over seeds"))
    if as_json:
        return json.dumps(result, indent=2, allow_nan=False)
    c = folder.counts(index)
    head = (f"Sweep {index['sweep_id']}: {c['finished']}/{len(index['runs'])} runs finished; "
            f"metric {metric} (val loss, nats/token; lower is better); baseline "
            f"{index['baseline']}.")
    lines = [head, format_aggregate(result)]
    if plot is not None:
        lines.append(f"Plot: {result['plot']}")
    return "\n".join(lines)
