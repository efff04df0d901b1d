"""The LoRA demo in bf16 and in float32: wall time, final val loss, and the two loss curves.

Runs `lmlab train --config smollm2-lora` as a user does (the CLI, `dtype: auto`, which is
bf16 where the CPU has it), then the same config with `train.dtype=float32`, one after the
other, and compares the curves at equal steps: every logged training loss (the same
batches in both runs, so the difference is the dtype's) and every validation loss. The
target is |bf16 - fp32| <= 0.02 nats, and val <= 3.33 within 5 minutes of wall time.

Needs the demo's model and data (`--models-dir` holding smollm2-135m-instruct, `--data`
the prepared corpus; see configs/smollm2-lora.yaml), or `--runs BF16_DIR FP32_DIR` to
compare two finished runs without training.

    python benchmarks/bench_lora_demo.py --models-dir models --data data/shakespeare-smollm2
    python benchmarks/bench_lora_demo.py --runs runs/<bf16 run> runs/<fp32 run>
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe

ROOT = Path(__file__).resolve().parents[1]


def run_demo(out: Path, models: str, data: str, dtype: str | None) -> tuple[Path, float]:
    """One `lmlab train --config smollm2-lora`; its run folder and wall seconds."""
    cmd = [sys.executable, str(ROOT / "main.py"), "train", "--config", "smollm2-lora",
           "--set", f"data.path={data}", "--set", f"run.out_dir={out}"]
    if dtype:
        cmd += ["--set", f"train.dtype={dtype}"]
    before = set(out.glob("*")) if out.exists() else set()
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "LMLAB_MODELS_DIR": models})
    wall = time.perf_counter() - t
    (run,) = set(out.glob("*")) - before
    return run, wall


def curves(run: Path) -> tuple[dict[int, float], dict[int, float]]:
    from lmlab.records import read_metrics

    train, val = {}, {}
    for r in read_metrics(run):
        if "loss" in r:
            train[r["step"]] = r["loss"]
        if "val_loss" in r:
            val[r["step"]] = r["val_loss"]
    return train, val


def compare(bf16: Path, fp32: Path) -> None:
    (tb, vb), (tf, vf) = curves(bf16), curves(fp32)
    print(f"bf16 run {bf16.name}, fp32 run {fp32.name}")
    print("step | val bf16 | val fp32 | bf16 - fp32")
    for step in sorted(vb.keys() & vf.keys()):
        print(f"{step:4d} | {vb[step]:.4f} | {vf[step]:.4f} | {vb[step] - vf[step]:+.4f}")
    dv = max(abs(vb[s] - vf[s]) for s in vb.keys() & vf.keys())
    steps = sorted(tb.keys() & tf.keys())
    dt = [abs(tb[s] - tf[s]) for s in steps]
    print(f"largest |bf16 - fp32|: val {dv:.4f} nats over {len(vb.keys() & vf.keys())} evals; "
          f"training loss {max(dt):.4f} nats over {len(steps)} logged steps (mean "
          f"{sum(dt) / len(dt):.4f}); target <= 0.02")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", default="models")
    ap.add_argument("--data", default="data/shakespeare-smollm2")
    ap.add_argument("--runs", nargs=2, metavar=("BF16_RUN", "FP32_RUN"))
    args = ap.parse_args()
    print(describe())
    if args.runs:
        compare(Path(args.runs[0]), Path(args.runs[1]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        bf16, wall_b = run_demo(out, args.models_dir, args.data, None)
        fp32, wall_f = run_demo(out, args.models_dir, args.data, "float32")
        print(f"wall time: dtype auto (bf16 here) {wall_b:.0f} s, float32 {wall_f:.0f} s "
              f"(target: val <= 3.33 within 300 s)")
        compare(bf16, fp32)


if __name__ == "__main__":
    main()
