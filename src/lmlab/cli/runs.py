"""`lmlab runs compare|plot|rebuild-tb`: argparse for runs.compare, runs.plot, runs.verify."""

from __future__ import annotations

import argparse
from typing import Any

from lmlab.runs.compare import compare
from lmlab.runs.plot import X_AXES, plot
from lmlab.runs.verify import rebuild_tb


def cmd_compare(args: argparse.Namespace) -> None:
    print(compare(args.runs, getattr(args, "root", "runs"), args.plot,
                  getattr(args, "group_by", None)))


def add_compare(runs_subparsers: Any) -> None:
    """Add `compare` to the subparsers of `lmlab runs` (it uses that parser's --root)."""
    r = runs_subparsers.add_parser(
        "compare", help="final/best val loss, tokens/s, config differences and loss curves",
        description="Compare runs: the first line says whether they share base config and "
                    "data (and shouts when not); then their figures, what differs in their "
                    "configs and set-up, and with --plot their train and val loss curves.")
    r.add_argument("runs", nargs="+", metavar="RUN", help="run folders or ids (2 or more); the "
                                                         "first is the reference")
    r.add_argument("--plot", metavar="FILE.png", help="draw the loss curves into this PNG")
    r.add_argument("--group-by", choices=["variant"],
                   help="aggregate replicates: runs of one sweep variant (or, outside a "
                        "sweep, of one run name) are a group; n, mean ± sd, 95%% interval, "
                        "and each group against the first run's with Welch's t-test")
    r.set_defaults(func=cmd_compare)


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


def add_rebuild_tb(runs_subparsers: Any) -> None:
    """Add `rebuild-tb` to the subparsers of `lmlab runs`."""
    r = runs_subparsers.add_parser(
        "rebuild-tb", help="rewrite a run's TensorBoard event files from metrics.jsonl",
        description="TensorBoard event files are derived from metrics.jsonl; when `runs "
                    "verify` says they disagree, this rewrites their scalars from it.")
    r.add_argument("run", help="run folder or run id")
    r.set_defaults(func=_cmd_rebuild_tb)


def _cmd_rebuild_tb(args: argparse.Namespace) -> None:
    from lmlab.runs.listing import resolve_run

    print(rebuild_tb(resolve_run(args.run, getattr(args, "root", "runs"))))
