"""`lmlab sweep run | resume | status | report | repair`.

Exit status of run and resume: 0 every run finished, 1 the sweep is incomplete
(the last line names the runs, why, and the resume command), 2 bad input or
another driver holds the sweep, 130 stopped by Ctrl-C.
"""

from __future__ import annotations

import argparse
from typing import Any


def cmd_sweep(args: argparse.Namespace) -> None:
    from lmlab.sweeps import run as sweep_run
    from lmlab.sweeps.folder import status_report
    from lmlab.sweeps.report import report

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        if args.sweep_command == "run":
            sweep_run.start(args.file, args.out, args.jobs, args.threads_per_job, args.backend,
                            args.address, args.retries, args.yes, say, args.max_attempts)
        elif args.sweep_command == "resume":
            sweep_run.resume(args.dir, args.jobs, args.threads_per_job, args.backend,
                             args.address, args.retries, say, args.max_attempts)
    except sweep_run.SweepInterrupted as e:
        print(f"lmlab: {e}", flush=True)
        raise SystemExit(130) from None
    except sweep_run.SweepIncomplete as e:  # the run went as asked, but not every run finished
        print(f"lmlab: {e}", flush=True)
        raise SystemExit(1) from None
    if args.sweep_command == "status":
        print(status_report(args.dir))
    elif args.sweep_command == "report":
        print(report(args.dir, args.metric, args.plot, args.json, args.allow_missing))
    elif args.sweep_command == "repair":
        from lmlab.sweeps.repair import repair

        print(repair(args.dir))


DIR_HELP = "a sweep folder, sweeps/<sweep_id> (printed by `lmlab sweep run`)"


def _execution(p: argparse.ArgumentParser, defaults: bool) -> None:
    from lmlab.sweeps.run import DEFAULT_JOBS, DEFAULT_THREADS

    p.add_argument("--jobs", type=int, default=DEFAULT_JOBS if defaults else None,
                   help=f"runs at once (default {DEFAULT_JOBS}"
                        + ("" if defaults else ", or what the sweep last ran with") + ")")
    p.add_argument("--threads-per-job", type=int, default=DEFAULT_THREADS if defaults else None,
                   help=f"torch threads per run, and Ray num_cpus per task (default "
                        f"{DEFAULT_THREADS})")
    p.add_argument("--backend", choices=["local", "ray"], default="local" if defaults else None,
                   help="local processes (default) or tasks on a Ray cluster")
    p.add_argument("--address", metavar="HOST:PORT",
                   help="the Ray head to join (default with --backend ray: a local Ray)")
    p.add_argument("--retries", type=int, default=1,
                   help="times a failed run is retried by this driver (default 1)")
    p.add_argument("--max-attempts", type=int,
                   help="attempts a run gets over every driver, before it stays failed "
                        "(default 3, recorded in the index)")


def add_commands(sub: Any) -> None:
    s = sub.add_parser(
        "sweep", help="experiments: variants x grid x seeds, run, resumed and reported",
        description="Run a sweep file (base config, variants, optional grid or random search, "
                    "seeds) as many runs, locally or on Ray; report each variant against the "
                    "baseline with intervals and p-values.")
    ss = s.add_subparsers(dest="sweep_command", required=True, metavar="ACTION")
    r = ss.add_parser("run", help="validate, expand and run a sweep file",
                      description="Every run's config is built and validated, and the set-ups "
                      "checked, before any run starts. Ctrl-C stops every run cleanly.")
    r.add_argument("file", metavar="FILE", help="the sweep file (YAML): name, base, set, "
                   "seeds, baseline, variants, and optionally grid (or method: random)")
    r.add_argument("--out", default="sweeps", help="where sweep folders go (default: sweeps)")
    r.add_argument("--yes", action="store_true", help="allow a sweep of more than 500 runs")
    _execution(r, defaults=True)
    r = ss.add_parser("resume", help="finish a stopped sweep",
                      description="Finished runs are kept, interrupted ones continue from their "
                      "checkpoint, failed ones are retried.")
    r.add_argument("dir", metavar="SWEEP_DIR", help=DIR_HELP)
    _execution(r, defaults=False)
    r = ss.add_parser("status", help="runs done / running / failed, and the ETA",
                      description="Count the sweep's runs by status, estimate the time left "
                      "from the finished runs, and list each run with its progress.")
    r.add_argument("dir", metavar="SWEEP_DIR", help=DIR_HELP)
    r = ss.add_parser("report", help="per variant: n, mean ± sd, 95 percent interval; "
                      "tests vs baseline",
                      description="Per variant and grid point: n, mean ± sd and a 95% t "
                      "interval of the val loss over seeds; each variant against the baseline "
                      "with Welch's t-test and a bootstrap interval, and a plain verdict. "
                      "Unfinished runs are left out with a warning; a sweep that mixes set-ups "
                      "is refused.")
    r.add_argument("dir", metavar="SWEEP_DIR", help=DIR_HELP)
    r.add_argument("--metric", choices=["final_val", "best_val"], default="final_val",
                   help="final or best validation loss of each run (default final_val)")
    r.add_argument("--plot", metavar="FILE.png",
                   help="mean val loss per variant with its 95%% band, vs step and tokens")
    r.add_argument("--json", action="store_true",
                   help="print the report as strict JSON (null for a value there is not)")
    r.add_argument("--allow-missing", action="store_true",
                   help="report even when finished runs' folders are gone (n per variant "
                        "shows what is left)")
    r = ss.add_parser("repair", help="rebuild a damaged index.json from the run folders",
                      description="Rebuild the sweep's index from its sweep.yaml and the "
                      "manifests of the run folders it made; the damaged index is kept "
                      "beside it. Runs without a usable folder become pending.")
    r.add_argument("dir", metavar="SWEEP_DIR", help=DIR_HELP)
    s.set_defaults(func=cmd_sweep)
