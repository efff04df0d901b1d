"""What a sweep costs beyond its training, and which layout of 2 cores runs more runs per hour.

Runs N char-tiny runs of S steps as a sweep (one variant, N seeds) twice:
`--jobs 1 --threads-per-job 2` and `--jobs 2 --threads-per-job 1`, after one
throwaway run that starts the forkserver (its cost is printed as the one-time
warm-up). For each layout it prints runs/hour and the overhead per run beyond
training: the driver's wall time for the run minus the time the run spent in
its training loop (steps, evaluations, checkpoints), i.e. forking, building the
model and data, writing manifests and the index. Target: <= 2 s per run.

The load average is printed before and after each layout: on a shared machine
other work slows every figure, and the two layouts run one after the other.

    .venv/bin/python benchmarks/bench_sweep.py [--runs 8] [--steps 200] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml
from machine import describe

from lmlab.records import read_manifest
from lmlab.sweeps import folder
from lmlab.sweeps import run as sweep_run

SHARED_TEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"


def prepared_data(tmp: Path, data: str | None) -> str:
    if data:
        return data
    from lmlab.data.prepare import prepare

    source = str(SHARED_TEXT) if SHARED_TEXT.is_file() else "shakespeare"
    prepare([source], tmp / "data")
    return str(tmp / "data")


def sweep_file(tmp: Path, data: str, runs: int, steps: int, name: str) -> Path:
    raw = {"name": name, "base": "char-tiny", "seeds": runs, "variants": {"backprop": {}},
           "set": {"data.path": data, "train.max_steps": steps, "train.eval_every": steps,
                   "train.checkpoint_every": steps, "train.warmup_steps": max(1, steps // 5),
                   "train.eval_batches": 10, "train.log_every": 10, "run.out_dir":
                   str(tmp / "runs")}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def measure(tmp: Path, data: str, runs: int, steps: int, jobs: int, threads: int) -> dict:
    path = sweep_file(tmp, data, runs, steps, f"j{jobs}t{threads}")
    t0 = time.perf_counter()
    d = sweep_run.start(path, tmp / "sweeps", jobs=jobs, threads=threads, out=lambda _: None)
    wall = time.perf_counter() - t0
    index = folder.load(d)
    overheads, train = [], []
    for r in index["runs"]:
        inside = read_manifest(Path(r["run_dir"]))["final"]["wall_s"]
        train.append(inside)
        overheads.append(r["wall_s"] - inside)
    return {"layout": f"--jobs {jobs} --threads-per-job {threads}", "runs": runs,
            "steps": steps, "wall_s": round(wall, 1), "runs_per_hour": round(runs / wall * 3600),
            "train_s_per_run": round(statistics.mean(train), 2),
            "overhead_s_per_run": round(statistics.mean(overheads), 2),
            "overhead_s_max": round(max(overheads), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--data", help="a prepared corpus (default: prepare tinyshakespeare)")
    args = p.parse_args()
    print(describe(), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp_name:
        tmp = Path(tmp_name)
        data = prepared_data(tmp, args.data)
        t0 = time.perf_counter()
        sweep_run.start(sweep_file(tmp, data, 1, 1, "warmup"), tmp / "sweeps", jobs=1,
                        threads=1, out=lambda _: None)
        print(f"one-time warm-up (forkserver imports torch, transformers; then one 1-step "
              f"run): {time.perf_counter() - t0:.1f} s", flush=True)
        results = []
        for jobs, threads in ((2, 1), (1, 2)):
            before = os.getloadavg()[0]
            r = measure(tmp, data, args.runs, args.steps, jobs, threads)
            r["load_before_after"] = [round(before, 2), round(os.getloadavg()[0], 2)]
            results.append(r)
            print(json.dumps(r), flush=True)
    best = max(results, key=lambda r: r["runs_per_hour"])
    print(f"faster here: {best['layout']} ({best['runs_per_hour']} vs "
          f"{min(r['runs_per_hour'] for r in results)} runs/hour)")
    print(describe())


if __name__ == "__main__":
    main()
