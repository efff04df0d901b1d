"""`lmlab runs plot`: any recorded metric of any runs, as a PNG, without a server.

Metric names are the ones `records.scalars` gives every metrics.jsonl record
(and TensorBoard shows as tags): `train/loss`, `eval/val_loss`, `aux/z_loss`,
`grad_norm/blocks.0.mlp.fc.weight`, `attn_entropy/blocks.1.head3`, ... A
glob picks several; each gets its own panel, each run its own colour (the same
in every panel), and a panel whose values span decades gets a log scale.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.errors import LmlabError
from lmlab.records import read_manifest, read_metrics, scalars
from lmlab.runs.store import find_runs, resolve_run

X_AXES = ("step", "tokens", "time")
LOG_SPAN = 20.0  # max/min ratio from which a panel is drawn on a log scale (over a decade)


def series(run_dir: Path, x: str = "step") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metric -> (x values, y values) of one run, in step order.

    `tokens` is steps times the tokens of one step (batch x accumulation x
    window x processes, from the manifest); `time` is seconds since the run started, read
    from the train and eval records and interpolated for records without it.
    """
    records = read_metrics(run_dir)
    if x == "tokens":
        m = read_manifest(run_dir)
        t, d = m["config"]["train"], m["config"]["data"]
        per_step = t["batch_size"] * t.get("grad_accum", 1) * d["block_size"] * m.get(
            "world_size", 1)
    elif x == "time":
        timed = sorted({r["step"]: r["time"] for r in records
                        if r.get("kind") == "train" and "time" in r}.items())
        if not timed:
            raise LmlabError(f"Run {run_dir.name} records no training times; use --x step or "
                             "--x tokens.")
        steps, times = np.array(timed, dtype=float).T
    points: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        step = r.get("step", 0)
        if x == "tokens":
            at = step * per_step
        elif x == "time":  # a record's own time, else the training time at its step
            at = r["time"] if "time" in r else float(np.interp(step, steps, times))
        else:
            at = step
        for name, value in scalars(r).items():
            points.setdefault(name, []).append((at, value))
    return {name: tuple(np.array(sorted(pairs), dtype=float).reshape(-1, 2).T)
            for name, pairs in points.items()}


def log_scale(values: list[np.ndarray]) -> bool:
    """Whether values (all positive) span at least LOG_SPAN: then a log axis reads better."""
    v = np.concatenate(values) if values else np.array([])
    v = v[np.isfinite(v)]
    return bool(v.size) and v.min() > 0 and v.max() / v.min() >= LOG_SPAN


def select(available: list[str], patterns: list[str]) -> list[str]:
    """The metrics the globs pick, in recorded order; a glob that picks none lists them all."""
    chosen = []
    for pattern in patterns:
        hits = [m for m in available if fnmatch.fnmatchcase(m, pattern)]
        if not hits:
            raise LmlabError(f"No recorded metric matches '{pattern}'. Recorded metrics: "
                             f"{', '.join(_summarise(available)) or 'none'}.")
        chosen += [m for m in hits if m not in chosen]
    return chosen


def _summarise(names: list[str]) -> list[str]:
    """`grad_norm/*` (N) for families with many members, so the list stays readable."""
    families: dict[str, list[str]] = {}
    for n in names:
        families.setdefault(n.split("/", 1)[0] if "/" in n else n, []).append(n)
    out = []
    for head, members in families.items():
        out += members if len(members) <= 3 else [f"{head}/* ({len(members)}, e.g. "
                                                   f"{members[0]})"]
    return out


def draw(runs: list[str | Path], metrics: list[str], x: str = "step",
         root: str | Path = "runs") -> Any:
    """A matplotlib Figure: one panel per metric the globs pick, one colour per run."""
    if x not in X_AXES:
        raise LmlabError(f"--x {x!r}: choose one of {', '.join(X_AXES)}.")
    if not runs:
        known = ", ".join(r.name for r in find_runs(root)[-10:]) or "none yet"
        raise LmlabError(f"runs plot needs at least one run (a folder or id). Runs in {root}/: "
                         f"{known}.")
    dirs = [resolve_run(r, root) for r in runs]
    data = {d: series(d, x) for d in dirs}
    available = list(dict.fromkeys(m for s in data.values() for m in s))
    chosen = select(available, metrics)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(4, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows + 0.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, metric in zip(axes, chosen, strict=False):
        ys = []
        for i, d in enumerate(dirs):
            if metric not in data[d]:
                continue
            xs, y = data[d][metric]
            ys.append(y)
            ax.plot(xs, y, color=f"C{i % 10}", lw=1.3, marker="o" if len(y) < 30 else None,
                    ms=2.5, label=d.name)
        if log_scale(ys):
            ax.set_yscale("log")
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel({"step": "step", "tokens": "tokens", "time": "seconds since the start"}[x],
                      fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(chosen):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:len(chosen)]:  # a run missing from the first panel still gets a label
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)),
               fontsize=8)
    return fig


def plot(runs: list[str | Path], metrics: list[str], x: str = "step",
         out: str | Path = "plot.png", root: str | Path = "runs") -> Path:
    """Draw the metrics the globs pick into the PNG `out`; returns its path."""
    fig = draw(runs, metrics, x, root)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def cmd_plot(args: argparse.Namespace) -> None:
    path = plot(args.runs, args.metric, args.x, args.out, getattr(args, "root", "runs"))
    print(f"Plot: {path}")


def add_plot(runs_subparsers: Any) -> None:
    """Add `plot` to the subparsers of `lmlab runs` (it uses that parser's --root)."""
    r = runs_subparsers.add_parser(
        "plot", help="draw any recorded metric of one or more runs into a PNG",
        description="Draw recorded metrics: one panel per metric (a glob picks several, e.g. "
                    "'grad_norm/blocks.*.mlp.fc.weight'), one colour per run, a log scale "
                    "where values span decades. Names: train/loss, train/lr, "
                    "train/tokens_per_s, eval/val_loss, eval/val_bpc, aux/<name>, and "
                    "telemetry's grad_norm/, weight_norm/, update_ratio/, act_rms/, act_mean/, "
                    "act_max/, act_frac_nonpos/, attn_entropy/, logits_max, logits_lse_mean, "
                    "and with a learning rule grad_angle/ and b_w_angle/ (degrees).")
    r.add_argument("runs", nargs="*", metavar="RUN", help="run folders or ids")
    r.add_argument("--metric", action="append", required=True, metavar="GLOB",
                   help="a metric name or glob (repeatable)")
    r.add_argument("--x", choices=X_AXES, default="step",
                   help="x axis: optimizer step (default), tokens seen, or seconds since the start")
    r.add_argument("--out", default="plot.png", metavar="FILE.png",
                   help="the PNG to write (default: plot.png)")
    r.set_defaults(func=cmd_plot)
