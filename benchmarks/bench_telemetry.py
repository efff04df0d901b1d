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
step (its last). Two estimates are printed. Interleaved: the median over
rounds of each round's paired ratio of mean step times, (off)/(base) and
(on)/(base); on a loaded machine the round-to-round noise can exceed the
effect. Direct, the verdict: for (on), how much longer the telemetry step took
than the median step of its own round, spread over `every` steps; for (off),
the time of the no-op probe calls of a step plus one train record mirrored to
TensorBoard per `log_every` steps. Targets (issue 12): (off) within 1%, (on)
within 5% of a step.

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
    runners, trainers = {}, {}
    for key, overrides in variants.items():
        cfg = load_config("char-tiny", overrides + [f"run.name=telemetry-{key}"])
        runners[key] = Trainer(cfg, progress=False)
        tr = trainers[key] = runners[key].state
        tr.run_dir.mkdir(parents=True)
        tr.model.train()
    cfg = trainers["base"].cfg

    def run(key: str, steps: int) -> list[float]:
        """Seconds of each of `steps` training steps, logged as the loop logs them."""
        tr, out = trainers[key], []
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = runners[key].step(cfg.train.lr).loss
            tr.step += 1
            if tr.step % cfg.train.log_every == 0:
                tr.metrics.write(kind="train", step=tr.step, loss=loss, lr=cfg.train.lr,
                                 tokens_per_s=0, time=0.0)
            out.append(time.perf_counter() - t0)
        return out

    for key in trainers:  # warm-up: allocator, kernels, optimizer state
        run(key, 2)
    for tr in trainers.values():  # realign so every round of (on) holds one telemetry step
        tr.step = 0
    keys = list(trainers)
    times: dict[str, list[list[float]]] = {k: [] for k in keys}
    t_start = time.perf_counter()
    for r in range(args.rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]  # rotate who goes first
        for key in order:
            times[key].append(run(key, args.every))
    wall = time.perf_counter() - t_start
    recorded = sum(1 for line in (trainers["on"].run_dir / "metrics.jsonl").open()
                   if '"telemetry"' in line)
    step = statistics.median(t for rnd in times["base"] for t in rnd)

    # direct costs, which the machine's load cannot drown: the no-op probe of a step without
    # telemetry, and one record mirrored to TensorBoard (one per log_every steps)
    tr = trainers["on"]
    x = tr.batcher.next()[0]
    n, t0 = 20000, time.perf_counter()
    for i in range(n):
        probe = tr.telemetry.probe(i * args.every + 1)
        probe.before_update(x)
        probe.after_update()
    noop = (time.perf_counter() - t0) / n
    record = {"kind": "train", "step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 1, "time": 0}
    n, t0 = 2000, time.perf_counter()
    for _ in range(n):
        tr.tb(record)
    mirror = (time.perf_counter() - t0) / n
    for t in trainers.values():
        t.tb.close()

    print(describe())
    print(f"model: char-tiny ({trainers['base'].adapter.num_params():,} parameters), batch "
          f"{cfg.train.batch_size} x {cfg.data.block_size}, {trainers['base'].dtype}; "
          f"{args.rounds} rounds x {args.every} steps per variant, interleaved, {wall:.0f} s; "
          f"(on) recorded {recorded} telemetry steps")
    labels = {"base": "(base) no TensorBoard, no telemetry",
              "off": "(off)  TensorBoard on, telemetry off (the default)",
              "on": f"(on)   TensorBoard on, telemetry every {args.every}, everything on"}
    means = {k: [statistics.fmean(rnd) for rnd in v] for k, v in times.items()}
    for k in keys:
        print(f"{labels[k]:<58} median {statistics.median(means[k]) * 1000:8.1f} ms/step "
              f"(round means {', '.join(f'{t * 1000:.1f}' for t in means[k])})")
    for k in ("off", "on"):
        paired = statistics.median(a / b for a, b in zip(means[k], means["base"], strict=True))
        print(f"interleaved ({k})/(base) step time = {paired:.4f} ({(paired - 1) * 100:+.2f}%; "
              "at this load, round-to-round noise can exceed the effect)")
    # the telemetry step against the other steps of its own round: neighbours in time
    extra = []
    for rnd in times["on"]:
        *normal, telemetry_step = rnd  # the round's last step is the telemetry step
        extra.append(telemetry_step - statistics.median(normal))
    on_cost = statistics.median(extra) / (args.every * step)
    off_cost = (noop + mirror / cfg.train.log_every) / step
    print(f"a telemetry step takes {statistics.median(extra) * 1000:.0f} ms more than its round's "
          f"median step ({', '.join(f'{e * 1000:.0f}' for e in extra)} ms); the no-op probe "
          f"{noop * 1e6:.2f} us/step; one record mirrored to TensorBoard {mirror * 1e6:.0f} us")
    for name, cost, target in (("off", off_cost, 0.01), ("on", on_cost, 0.05)):
        verdict = "PASS" if cost <= target else "FAIL"
        print(f"({name}) cost per step, direct: {cost * 100:+.3f}% of a {step * 1000:.0f} ms "
              f"step (target within {round(target * 100)}%: {verdict})")
    print(f"load avg after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
