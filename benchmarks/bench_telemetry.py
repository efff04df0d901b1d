"""What telemetry and TensorBoard cost: training step time on char-tiny, off vs on.

Three real Trainers on the char-tiny config (same weights, same data, the real
`_train_step`, a train record written every `log_every` steps as the loop
does) run in ONE process, interleaved round by round so that load from
anything else on the machine falls on all three alike:

(base) `run.tensorboard: false`, telemetry off: what a run cost before either existed.
(off)  the default: TensorBoard on (mirroring each train record), telemetry off.
(on)   TensorBoard on and `telemetry: {every: 50}` with everything on: per-tensor
       norms and update ratios, rms/mean/max/fraction <= 0 of every MLP output
       and residual stream, attention entropy (an extra no-grad forward pass),
       logits, and weight and gradient histograms.

A round is `every` steps, so each round of (on) holds exactly one telemetry
step: the ratio is the amortised cost. Targets (issue 12): (off)/(base) within
1%, (on)/(base) within 5%. The verdict is the median over rounds of each
round's paired ratio of step times.

    .venv/bin/python benchmarks/bench_telemetry.py [--rounds 3] [--every 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import describe

from lmlab.config import load_config
from lmlab.train.loop import Trainer

TELEMETRY_ON = ["telemetry.params=true", "telemetry.attention=true", "telemetry.logits=true",
                "telemetry.histograms=true",
                'telemetry.activations=["blocks.*.mlp.hook_post", "blocks.*.hook_resid_post"]']


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--every", type=int, default=50, help="telemetry.every of (on); steps/round")
    ap.add_argument("--data", default="data/shakespeare",
                    help="prepared data (lmlab prepare shakespeare --out data/shakespeare)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 on a shared machine: two spin-wait on each other)")
    ap.add_argument("--dtype", default="auto",
                    help="train.dtype (char-tiny's auto: bf16 where the CPU has it, else fp32)")
    args = ap.parse_args()
    if not (Path(args.data) / "meta.json").is_file():
        raise SystemExit(f"No prepared data in {args.data}: run `lmlab prepare shakespeare "
                         f"--out {args.data}` first.")
    torch.set_num_threads(args.threads)
    out = tempfile.mkdtemp(prefix="bench_telemetry_")
    common = [f"run.out_dir={out}", f"data.path={args.data}", "train.device=cpu",
              f"train.dtype={args.dtype}", f"train.threads={args.threads}"]
    variants = {
        "base": common + ["run.tensorboard=false"],
        "off": common,
        "on": common + [f"telemetry.every={args.every}", *TELEMETRY_ON],
    }
    trainers = {}
    for key, overrides in variants.items():
        cfg = load_config("char-tiny", overrides + [f"run.name=telemetry-{key}"])
        tr = Trainer(cfg, progress=False)
        tr.run_dir.mkdir(parents=True)
        tr.model.train()
        trainers[key] = tr
    cfg = trainers["base"].cfg

    def run(key: str, steps: int) -> float:
        """Mean seconds per training step over `steps` steps, logged as the loop logs them."""
        tr = trainers[key]
        t0 = time.perf_counter()
        for _ in range(steps):
            loss, _ = tr._train_step()
            tr.step += 1
            if tr.step % cfg.train.log_every == 0:
                tr.metrics.write(kind="train", step=tr.step, loss=loss, lr=cfg.train.lr,
                                 tokens_per_s=0, time=0.0)
        return (time.perf_counter() - t0) / steps

    for key in trainers:  # warm-up: allocator, kernels, optimizer state
        run(key, 2)
    for tr in trainers.values():  # realign so every round of (on) holds one telemetry step
        tr.step = 0
    keys = list(trainers)
    times: dict[str, list[float]] = {k: [] for k in keys}
    t_start = time.perf_counter()
    for r in range(args.rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]  # rotate who goes first
        for key in order:
            times[key].append(run(key, args.every))
    wall = time.perf_counter() - t_start
    for tr in trainers.values():
        tr.tb.close()
    recorded = sum(1 for line in (trainers["on"].run_dir / "metrics.jsonl").open()
                   if '"telemetry"' in line)

    print(describe())
    print(f"model: char-tiny ({trainers['base'].adapter.num_params():,} parameters), batch "
          f"{cfg.train.batch_size} x {cfg.data.block_size}, {trainers['base'].dtype}; "
          f"{args.rounds} rounds x {args.every} steps per variant, interleaved, {wall:.0f} s; "
          f"(on) recorded {recorded} telemetry steps")
    labels = {"base": "(base) no TensorBoard, no telemetry",
              "off": "(off)  TensorBoard on, telemetry off (the default)",
              "on": f"(on)   TensorBoard on, telemetry every {args.every}, everything on"}
    for k in keys:
        print(f"{labels[k]:<58} median {statistics.median(times[k]) * 1000:8.1f} ms/step "
              f"(rounds {', '.join(f'{t * 1000:.1f}' for t in times[k])})")
    for k, target in (("off", 1.01), ("on", 1.05)):
        paired = statistics.median(a / b for a, b in zip(times[k], times["base"], strict=True))
        verdict = "PASS" if paired <= target else "FAIL"
        print(f"({k})/(base) step time = {paired:.4f} median paired ({(paired - 1) * 100:+.2f}%;"
              f" target within {round((target - 1) * 100)}%: {verdict})")
    print(f"load avg after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
