"""`lmlab runs compare`: side by side figures, config differences and loss curves of runs.

A comparison is only worth something when the runs differ where they say they
do. So the first line of the report always states whether they share a base
config (the config without hooks) and data; when they do not, it says so in
capitals before any number can be read, and the lines under it name what
differs. The first run given is the reference the others are diffed against.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmlab.config import diff_configs
from lmlab.errors import LmlabError
from lmlab.records import effective_status, read_manifest, read_metrics
from lmlab.runs.aggregate import aggregate, format_aggregate, load_run, plot_bands, token_budget
from lmlab.runs.listing import format_table, resolve_run


def _short(h: Any) -> str:
    return str(h)[:10] if h else "<none>"


def comparability(manifests: list[dict[str, Any]]) -> list[str]:
    """The headline: line 1 says whether the set-ups match; more lines say how not.

    The set-up is the base config, the data, the world size, the token budget and
    the *resolved* device and dtype (`dtype: auto` may resolve differently on two
    machines). Runs that match and differ only in their seeds are replicates.
    """
    names = [m.get("run_id", "?") for m in manifests]
    problems, details = [], []
    for key, what, missing_ok in (("base_hash", "BASE CONFIGS", False),
                                  ("data_hash", "DATA", False),
                                  ("device", "DEVICES", True), ("dtype", "DTYPES", True),
                                  ("world_size", "WORLD SIZES", True),  # scales the batch
                                  ("token_budget", "TOKEN BUDGETS", True)):
        values = [token_budget(m) if key == "token_budget" else
                  m.get(key, 1 if key == "world_size" else None) for m in manifests]
        if len(set(map(str, values))) > 1 or (None in values and not missing_ok):
            problems.append(what)
            details.append(f"  {key}: " + ", ".join(f"{n}={_short(v)}"
                                                     for n, v in zip(names, values, strict=True)))
    if not problems:
        same = (f"same base config ({_short(manifests[0].get('base_hash'))}), same "
                f"data ({_short(manifests[0].get('data_hash'))}), device "
                f"{manifests[0].get('device')}, dtype {manifests[0].get('dtype')}, world size "
                "and token budget")
        hooks = {json.dumps(m.get("config", {}).get("hooks"), sort_keys=True)
                 for m in manifests}
        seeds = [m.get("seed") for m in manifests]
        if len(hooks) == 1 and len(set(seeds)) == len(seeds):
            return [f"Replicates: {same}; the runs differ only in their seeds "
                    f"({', '.join(map(str, seeds))})."]
        if len(hooks) == 1:  # one set-up, one seed: the same run twice, not two replicates
            keys = {(m.get("sweep") or {}).get("key") for m in manifests} - {None}
            return [f"Repeats, not replicates: {same}, and seeds repeat "
                    f"({', '.join(map(str, seeds))})"
                    + (f" (sweep key {', '.join(sorted(keys))})" if keys else "")
                    + "; a repeated seed adds no evidence."]
        return [f"Comparable: {same}; the runs differ only in their hooks."]
    head = (f"!!! NOT COMPARABLE: {' AND '.join(problems)} DIFFER - these runs differ in more "
            "than their hooks, so their losses are not a like-for-like comparison !!!")
    base = manifests[0].get("config", {})
    for m in manifests[1:]:
        other = m.get("config", {})
        lines = diff_configs({k: v for k, v in base.items() if k != "hooks"},
                             {k: v for k, v in other.items() if k != "hooks"})
        if lines:
            details.append(f"  outside hooks, {m.get('run_id')} differs in: " + "; ".join(lines))
    return [head, *details]


def _row(run_dir: Path, m: dict[str, Any]) -> dict[str, Any]:
    records = read_metrics(run_dir)
    evals = [r for r in records if r.get("kind") == "eval"]
    trains = [r for r in records if r.get("kind") == "train"]
    final = m.get("final") if isinstance(m.get("final"), dict) else {}
    tps = final.get("tokens_per_s")
    if tps is None and trains:
        tps = round(sum(r.get("tokens_per_s", 0) for r in trains) / len(trains))
    return {
        "run_id": m.get("run_id", run_dir.name), "status": effective_status(m),
        "step": final.get("step", trains[-1]["step"] if trains else None),
        "final_val": evals[-1]["val_loss"] if evals else None,
        "best_val": min((r["val_loss"] for r in evals), default=None),
        "final_train": trains[-1]["loss"] if trains else None,
        "tokens_per_s": tps, "hooks": len(m.get("hooks", [])),
    }


def _other_differences(manifests: list[dict[str, Any]]) -> list[str]:
    """What else may explain a difference: plugin sources, code, libraries, device, dtype."""
    ref, lines = manifests[0], []
    for m in manifests[1:]:
        run = m.get("run_id")
        diffs = diff_configs(ref.get("config", {}), m.get("config", {}))
        lines.append(f"Config differences, {ref.get('run_id')} -> {run}:")
        lines += [f"  {d}" for d in diffs] or ["  (none)"]
        extra = diff_configs({"plugins": ref.get("plugins", {}), "code": ref.get("code", {}),
                              "libraries": ref.get("libraries", {}),
                              "device": ref.get("device"), "dtype": ref.get("dtype")},
                             {"plugins": m.get("plugins", {}), "code": m.get("code", {}),
                              "libraries": m.get("libraries", {}),
                              "device": m.get("device"), "dtype": m.get("dtype")})
        lines += [f"  also: {d}" for d in extra]
    return lines


def variant_of(m: dict[str, Any]) -> str:
    """A sweep run's variant; otherwise the run's name (replicates share a name)."""
    return (m.get("sweep") or {}).get("variant") or m.get("config", {}).get("run", {}).get(
        "name") or m.get("run_id", "?")


def compare_groups(dirs: list[Path], manifests: list[dict[str, Any]],
                   plot: str | Path | None = None, metric: str = "final_val") -> str:
    """Runs grouped by variant: n, mean ± sd, 95% interval, and each group against the first."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for d, m in zip(dirs, manifests, strict=True):
        groups.setdefault(variant_of(m), []).append(load_run(d))
    baseline = variant_of(manifests[0])
    result = aggregate({"": groups}, baseline, metric)
    lines = [f"{len(groups)} group(s) by variant, baseline {baseline}: same set-up in every "
             "group (device, dtype, data, world size, token budget); replicates share a base "
             "config.", format_aggregate(result)]
    if plot is not None:
        lines.append(f"Val loss bands: {plot_bands({'': groups}, plot)}")
    return "\n".join(lines)


def compare(runs: list[str | Path], root: str | Path = "runs",
            plot: str | Path | None = None, group_by: str | None = None) -> str:
    """The comparison report of `runs` (folders or ids); draws the loss curves if `plot`."""
    if len(runs) < 2:
        raise LmlabError("runs compare needs at least two runs.")
    dirs = [resolve_run(r, root) for r in runs]
    manifests = [read_manifest(d) for d in dirs]
    if group_by == "variant":
        return compare_groups(dirs, manifests, plot)
    lines = comparability(manifests)
    lines.append("")
    lines.append(format_table([_row(d, m) for d, m in zip(dirs, manifests, strict=True)],
                              ["run_id", "status", "step", "final_val", "best_val",
                               "final_train", "tokens_per_s", "hooks"]))
    lines.append("")
    lines += _other_differences(manifests)
    if plot is not None:
        lines.append("")
        lines.append(f"Loss curves: {plot_losses(dirs, manifests, plot)}")
    return "\n".join(lines)


def plot_losses(dirs: list[Path], manifests: list[dict[str, Any]], out: str | Path) -> Path:
    """Train (left) and val (right) loss against step, one colour per run, as a PNG.

    Uses the Agg canvas directly, so it neither needs a display nor changes the
    pyplot backend of a notebook that imports it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax_train, ax_val = fig.subplots(1, 2, sharey=True)
    for i, (d, m) in enumerate(zip(dirs, manifests, strict=True)):
        records = read_metrics(d)
        colour = f"C{i % 10}"
        label = m.get("run_id", d.name)
        train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
        val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
        if train:
            ax_train.plot(*zip(*train, strict=True), color=colour, label=label, lw=1.2)
        if val:
            ax_val.plot(*zip(*val, strict=True), color=colour, label=label, marker="o", ms=3)
    for ax, title in ((ax_train, "train loss"), (ax_val, "val loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax_train.set_ylabel("loss (nats/token)")
    ax_val.legend(fontsize=7, loc="upper right")
    headline = comparability(manifests)[0]
    short = headline.split(" - ")[0] + " !!!" if headline.startswith("!!!") else headline
    fig.suptitle(short if len(short) < 120 else short[:117] + "...", fontsize=9,
                 color="red" if headline.startswith("!!!") else "black")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
