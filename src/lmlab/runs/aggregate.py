"""Groups of replicate runs: honesty checks, statistics per group and against a baseline, bands.

Used by `lmlab runs compare --group-by variant` and by `lmlab sweep report`.
A block is the set of groups that may be compared (a sweep's grid point): in it,
the groups must share the set-up (resolved device and dtype, data, world size,
token budget), and the runs of one group must share their base config, else
the block is refused with the reason; so is a group that holds one seed twice
(one seed trained twice is one replicate, not two). Runs that did not finish
are left out with a warning naming them. A run that finished with a non-finite
loss diverged: its group is reported as "k/n diverged", never averaged or
tested, so no mean, interval or p-value is computed over NaN.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.records import metrics_problems, read_manifest
from lmlab.runs.stats import adjust, difference, summarize

METRICS = ("final_val", "best_val")
SETUP = (("device", "device"), ("dtype", "dtype"), ("data_hash", "data"),
         ("world_size", "world size"), ("token_budget", "token budget"))


def token_budget(m: dict[str, Any]) -> int | None:
    """Tokens a run was given: steps x batch x accumulation x block x processes."""
    c = m.get("config", {})
    try:
        t = c["train"]
        return (t["max_steps"] * t["batch_size"] * t.get("grad_accum", 1) *
                c["data"]["block_size"] * m.get("world_size", 1))
    except (KeyError, TypeError):
        return None


def load_run(run_dir: Path) -> dict[str, Any]:
    """A run's set-up, its final and best val loss and its val curve against step and tokens."""
    m = read_manifest(run_dir)
    records, damaged = metrics_problems(run_dir, quiet=False)
    evals = [r for r in records if r.get("kind") == "eval"]
    c = m.get("config", {})
    t = c.get("train", {})
    per_step = (t.get("batch_size", 0) * t.get("grad_accum", 1) *
                c.get("data", {}).get("block_size", 0) * m.get("world_size", 1))
    run_id, key = m.get("run_id", run_dir.name), (m.get("sweep") or {}).get("key")
    return {"run_id": run_id, "label": f"{key} ({run_id})" if key else run_id,
            "dir": str(run_dir),
            "status": m.get("status"), "base_hash": m.get("base_hash"),
            "device": m.get("device"), "dtype": m.get("dtype"),
            "data_hash": m.get("data_hash"), "world_size": m.get("world_size", 1),
            "token_budget": token_budget(m), "seed": m.get("seed"), "damaged": damaged,
            "final_val": evals[-1]["val_loss"] if evals else None,
            "best_val": min((r["val_loss"] for r in evals), default=None),
            "curve": [(r["step"], r["step"] * per_step, r["val_loss"]) for r in evals]}


def setup_problems(groups: dict[str, list[dict[str, Any]]], where: str = "") -> list[str]:
    """Why these groups may not be compared: set-ups that differ, or mixed replicates."""
    problems = []
    at = f" at {where}" if where else ""
    runs = [r for rs in groups.values() for r in rs]
    for key, what in SETUP:
        values = {str(r[key]) for r in runs}
        if len(values) > 1:
            seen = {}
            for name, rs in groups.items():
                for r in rs:
                    seen.setdefault(str(r[key]), f"{name} ({r['run_id']})")
            problems.append(f"{what} differs{at}: " +
                            ", ".join(f"{v} in {n}" for v, n in seen.items()))
    for name, rs in groups.items():
        if len({r["base_hash"] for r in rs}) > 1:
            problems.append(f"the runs of {name}{at} are not replicates: their base configs "
                            f"differ ({', '.join(r['run_id'] for r in rs)})")
    return problems


def aggregate(blocks: dict[str, dict[str, list[dict[str, Any]]]], baseline: str,
              metric: str = "final_val") -> dict[str, Any]:
    """Per block and group: the summary of `metric`, and the difference against `baseline`.

    Refuses (LmlabError) when a block mixes set-ups; leaves out unfinished runs
    with a warning.
    """
    if metric not in METRICS:
        raise LmlabError(f"Unknown metric '{metric}'; use one of {', '.join(METRICS)}.")
    warnings, out_blocks = [], {}
    for where, groups in blocks.items():
        kept = {}
        for name, rs in groups.items():
            bad = [r for r in rs if r["status"] != "finished" or r[metric] is None]
            for r in bad:
                warnings.append(f"left out {r['label']}, variant {name}"
                                f"{', ' + where if where else ''}: status {r['status']}")
            kept[name] = [r for r in rs if r not in bad]
            for r in rs:
                if r.get("damaged"):
                    lines = ", ".join(str(n) for n, *_ in r["damaged"][:5])
                    warnings.append(f"{r['label']} has {len(r['damaged'])} damaged record(s) "
                                    f"in metrics.jsonl (line {lines}), skipped; check it with "
                                    f"`lmlab runs verify {r['dir']}`")
        repeated = repeated_seeds(kept, where)
        if repeated:
            raise LmlabError("Refusing to count one seed twice as two replicates: "
                             + "; ".join(repeated) + ". Keep one run per seed.")
        problems = setup_problems({n: rs for n, rs in kept.items() if rs}, where)
        if problems:
            raise LmlabError("Refusing to compare a mixed set-up: variants must differ only in "
                             "what the sweep says. " + "; ".join(problems) + ".")
        out_blocks[where] = _rows(kept, baseline, metric)
    return {"metric": metric, "baseline": baseline, "warnings": warnings, "blocks": out_blocks}


def repeated_seeds(groups: dict[str, list[dict[str, Any]]], where: str = "") -> list[str]:
    """Groups that hold two runs of one seed (e.g. one sweep key trained twice)."""
    out = []
    for name, rs in groups.items():
        by_seed: dict[Any, list[str]] = {}
        for r in rs:
            by_seed.setdefault(r["seed"], []).append(r["label"])
        out += [f"{name}{' at ' + where if where else ''} has seed {seed} {len(labels)} times "
                f"({', '.join(labels)})" for seed, labels in by_seed.items() if seed is not None
                and len(labels) > 1]
    return out


def diverged(r: dict[str, Any], metric: str) -> bool:
    return not math.isfinite(r[metric])


def _rows(kept: dict[str, list[dict[str, Any]]], baseline: str,
          metric: str) -> dict[str, dict[str, Any]]:
    """Per group: its summary and its test against the baseline; diverged groups listed."""
    rows = {}
    base = kept.get(baseline, [])
    base_diverged = any(diverged(r, metric) for r in base)
    for name, rs in kept.items():
        gone = [r["run_id"] for r in rs if diverged(r, metric)]
        values = [r[metric] if not diverged(r, metric) else None for r in rs]
        row: dict[str, Any] = {"runs": [r["run_id"] for r in rs], "values": values,
                               "status": "diverged" if gone else "ok", "diverged": gone}
        if gone:
            row |= {"n": len(rs), "mean": None, "sd": None, "ci": None,
                    "note": f"{len(gone)}/{len(rs)} diverged"}
        else:
            row |= summarize(values)
        if name != baseline and baseline in kept:
            if gone or base_diverged:
                who = name if gone else f"the baseline {baseline}"
                row["vs_baseline"] = {"diff": None, "n": [len(rs), len(base)], "p": None,
                                      "ci": None, "bootstrap_ci": None,
                                      "verdict": f"no test: {who} has diverged runs"}
            else:
                row["vs_baseline"] = difference(values, [r[metric] for r in base])
        rows[name] = row
    adjust([r["vs_baseline"] for r in rows.values() if "vs_baseline" in r])  # k tests: Holm
    return rows


def format_aggregate(result: dict[str, Any]) -> str:
    """The report as text: a table per block, then one verdict line per variant."""
    lines = [f"warning: {w}" for w in result["warnings"]]
    metric, baseline = result["metric"], result["baseline"]
    for where, rows in result["blocks"].items():
        if where:
            lines.append(f"\n{where}")
        width = max(len(n) for n in rows) if rows else 8
        lines.append(f"{'variant'.ljust(width)}  n  {metric:>10}  {'sd':>7}  95% CI")
        for name, r in rows.items():
            mean = "-" if r["mean"] is None else f"{r['mean']:.4f}"
            sd = "-" if r["sd"] is None else f"{r['sd']:.4f}"
            ci = r["note"] or f"[{r['ci'][0]:.4f}, {r['ci'][1]:.4f}]"
            lines.append(f"{name.ljust(width)}  {r['n']}  {mean:>10}  {sd:>7}  {ci}")
        for name, r in rows.items():
            if r.get("diverged"):
                lines.append(f"{name}: {r['note']} ({', '.join(r['diverged'])}): a non-finite "
                             f"{metric}; no mean, interval or test over a diverged run")
        for name, r in rows.items():
            if "vs_baseline" in r:
                d = r["vs_baseline"]
                boot = (f"; bootstrap 95% CI [{d['bootstrap_ci'][0]:+.3f}, "
                        f"{d['bootstrap_ci'][1]:+.3f}]" if d["bootstrap_ci"] else "")
                lines.append(f"{name} vs {baseline}: {d['verdict']}{boot}")
    return "\n".join(lines).lstrip("\n")


def mean_curve(runs: list[dict[str, Any]], axis: int) -> tuple[list, list, list, list]:
    """x, mean, low, high of the val curves at the x values every run has (t interval)."""
    common = None
    for r in runs:
        xs = {p[axis] for p in r["curve"]}
        common = xs if common is None else common & xs
    xs = sorted(common or [])
    means, lows, highs = [], [], []
    for x in xs:
        s = summarize([next(p[2] for p in r["curve"] if p[axis] == x) for r in runs])
        means.append(s["mean"])
        lo, hi = s["ci"] or (s["mean"], s["mean"])
        lows.append(lo)
        highs.append(hi)
    return xs, means, lows, highs


def plot_bands(blocks: dict[str, dict[str, list[dict[str, Any]]]], out: str | Path,
               title: str = "") -> Path:
    """Mean val loss per group with its 95% band, against step (left) and tokens (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4 * len(blocks)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(blocks), 2, squeeze=False)
    for row, (where, groups) in zip(axes, blocks.items(), strict=True):
        for i, (name, rs) in enumerate(groups.items()):
            rs = [r for r in rs if r["status"] == "finished" and r["curve"]
                  and all(math.isfinite(p[2]) for p in r["curve"])]
            if not rs:
                continue
            for ax, axis in ((row[0], 0), (row[1], 1)):
                xs, mean, lo, hi = mean_curve(rs, axis)
                ax.plot(xs, mean, color=f"C{i % 10}", label=f"{name} (n={len(rs)})", lw=1.5)
                ax.fill_between(xs, lo, hi, color=f"C{i % 10}", alpha=0.2, lw=0)
        for ax, xlabel in ((row[0], "step"), (row[1], "tokens")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel("val loss (nats/token)")
            ax.grid(alpha=0.3)
            ax.set_title(where or "val loss, mean and 95% interval", fontsize=9)
        row[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
