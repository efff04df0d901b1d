"""Time to quality: how soon nanoGPT, char-fast and char-speedrun reach a val loss.

Why: on a CPU without bf16 matrix hardware lmlab's step does nanoGPT's
arithmetic (tokens/s 1.0x), so what a recipe can win is loss per second.
Issue 13 asks for the time to reach 2.0 / 1.8 / 1.7 / 1.6 / 1.5 nats/char on
Tiny Shakespeare (90/10 split) for three recipes given the same wall budget,
in one invocation on one machine, and the ratio of time-to-1.7 against
nanoGPT's recipe.

- nanoGPT: `benchmarks/nanogpt_reference.py` at 4x4x128, context 256, batch
  16, with its own AdamW and schedule (lr 1e-3, 100 warm-up steps, cosine to
  1e-4, fp32, no autocast on CPU). Its cosine ends where the budget does: the
  number of steps is estimated from 10 timed steps first.
- char-fast and char-speedrun: lmlab's real training loop with
  `train.time_budget_s` = the budget and `train.max_steps` out of the way, so
  their schedules, too, end with the budget.

Every recipe is evaluated on the first ~41k val tokens (its own context
length) about 20 times over the budget, the evaluations counting in its wall
time; the time to a loss is the first evaluation at or below it. The loss at
the budget is then taken on the WHOLE val split. The recipes run one after the
other, so each line prints the load average before and after it: on a shared
machine compare them with that in mind.

    .venv/bin/python benchmarks/bench_time_to_loss.py                  # 3 x 600 s
    .venv/bin/python benchmarks/bench_time_to_loss.py --budget-s 150   # 3 x 150 s
    .venv/bin/python benchmarks/bench_time_to_loss.py --dtype float32  # fp32 where auto is bf16
    .venv/bin/python benchmarks/bench_time_to_loss.py --dtype float32,bfloat16  # both tables
    .venv/bin/python benchmarks/bench_time_to_loss.py --only char-speedrun --budget-s 160
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import describe  # noqa: E402
from nanogpt_reference import GPTConfig, NanoGPTTrainer  # noqa: E402

from lmlab.config import load_config  # noqa: E402
from lmlab.data.dataset import load_prepared  # noqa: E402
from lmlab.data.prepare import prepare  # noqa: E402
from lmlab.device import resolve_dtype  # noqa: E402
from lmlab.eval.metrics import evaluate  # noqa: E402
from lmlab.records import read_metrics  # noqa: E402
from lmlab.train.loop import Trainer  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"  # from /work/main
THRESHOLDS = (2.0, 1.8, 1.7, 1.6, 1.5)
EVAL_TOKENS = 40_960  # the val subset scored during training, per recipe
EVALS = 20  # evaluations per budget
RECIPES = ("nanogpt", "char-fast", "char-speedrun")
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16"}


class _Logits(nn.Module):
    """nanoGPT's GPT returns (logits, loss) and, without targets, the last position only."""

    def __init__(self, gpt: nn.Module) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.gpt(idx, torch.zeros_like(idx))[0]


def run_nanogpt(data: Path, budget: float, threads: int | None) -> dict:
    """nanoGPT's train.py loop on CPU, its cosine stretched over the steps the budget allows."""
    L, H, d, T, B = 4, 4, 128, 256, 16
    lr, min_lr, warmup = 1e-3, 1e-4, 100
    prepared = load_prepared(str(data))
    cfg = GPTConfig(T, prepared.meta["vocab_size"], L, H, d, 0.0, False)
    probe = NanoGPTTrainer(prepared.train, cfg, B, lr=lr)
    probe.step()
    t0 = time.perf_counter()
    for _ in range(10):
        probe.step()
    per_step = (time.perf_counter() - t0) / 10
    horizon = max(warmup + 1, int(budget / per_step * 0.95))  # ~5% of the time goes to evals
    del probe

    def get_lr(it: int) -> float:  # nanoGPT's train.py
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        if it > horizon:
            return min_lr
        ratio = (it - warmup) / (horizon - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    ref = NanoGPTTrainer(prepared.train, cfg, B, lr=lr)
    model = _Logits(ref.model)
    device = torch.device("cpu")

    def val(windows: int | None) -> float:
        return evaluate(model, prepared.val, T, B, device, "float32", windows)["val_loss"]

    eval_every = max(1, int(budget / EVALS / per_step))  # as the lmlab recipes: by steps
    curve, step, t0 = [], 0, time.perf_counter()
    curve.append((0, 0.0, val(EVAL_TOKENS // T)))
    while time.perf_counter() - t0 < budget:
        ref.step(lr=get_lr(step))
        step += 1
        clock = time.perf_counter() - t0
        if step % eval_every == 0 or clock >= budget:
            curve.append((step, clock, val(EVAL_TOKENS // T)))
    return {"curve": curve, "steps": step, "tokens": step * B * T, "final": val(None),
            "dtype": "float32", "note": f"cosine over {horizon} steps"}


def run_lmlab(name: str, data: Path, budget: float, threads: int | None, out: Path,
              sets: list[str]) -> dict:
    cfg = load_config(name, [f"data.path={data}", f"run.out_dir={out}",
                             f"train.time_budget_s={budget}", "train.max_steps=100000000",
                             "train.checkpoint_every=100000000", *sets])
    t = cfg.train
    if threads:
        t.threads = threads
    t.eval_batches = max(1, round(EVAL_TOKENS / (cfg.data.block_size * t.batch_size)))
    probe = Trainer(cfg, progress=False)  # 10 timed steps set how often to evaluate
    probe.step(t.lr)
    t0 = time.perf_counter()
    for _ in range(10):
        probe.step(t.lr)
    per_step = (time.perf_counter() - t0) / 10
    del probe
    t.eval_every = max(1, int(budget / EVALS / per_step))
    trainer = Trainer(cfg, progress=False)
    run_dir = trainer.run()
    records = read_metrics(run_dir)
    curve = [(r["step"], r["time"], r["val_loss"]) for r in records if r["kind"] == "eval"]
    steps = curve[-1][0]
    trainer.state.cfg.train.eval_batches = None
    return {"curve": curve, "steps": steps,
            "tokens": steps * t.batch_size * t.grad_accum * cfg.data.block_size,
            "final": trainer.evaluate()["val_loss"], "dtype": trainer.state.dtype,
            "note": f"{cfg.model.n_layer}x{cfg.model.n_head}x{cfg.model.d_model} "
                    f"ctx {cfg.data.block_size} batch {t.batch_size} {t.optimizer} {t.schedule}"}


def first_time(curve: list[tuple[int, float, float]], threshold: float) -> float | None:
    return next((clock for _, clock, loss in curve if loss <= threshold), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the Tiny Shakespeare text file")
    p.add_argument("--budget-s", type=float, default=600.0, help="wall budget per recipe")
    p.add_argument("--only", default=",".join(RECIPES), help="comma-separated recipes to run")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--dtype", default="auto",
                   help="train.dtype of the lmlab recipes: auto, float32, bfloat16, or a comma "
                        "list to run each recipe in each (nanoGPT runs fp32, as it does on CPU)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for char-speedrun (repeatable)")
    args = p.parse_args(argv)
    src = Path(args.data)
    if not src.is_file():
        print(f"Corpus {src} not found: pass --data PATH to a copy of tinyshakespeare.txt.")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    recipes = [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = set(recipes) - set(RECIPES)
    if unknown:
        print(f"Unknown recipe(s) {sorted(unknown)}; choose from {', '.join(RECIPES)}.")
        return 2
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    if not dtypes or set(dtypes) - {"auto", "float32", "bfloat16"}:
        print(f"--dtype {args.dtype}: choose auto, float32, bfloat16 or a comma list of them.")
        return 2
    runs = [(name, None) for name in recipes if name == "nanogpt"]
    runs += [(name, d) for d in dtypes for name in recipes if name != "nanogpt"]
    print(describe())
    auto = resolve_dtype("auto", torch.device("cpu"))
    print(f"dtype auto picks {auto} here; lmlab recipes run --dtype {args.dtype}" +
          ("" if auto == "bfloat16" else " (no fast bf16 on this CPU: bf16 not measured)"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        meta = prepare([str(src)], data, val_fraction=0.1)
        print(f"corpus: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens; "
              f"budget {args.budget_s:.0f} s per recipe\n")
        for name, dtype in runs:
            before = os.getloadavg()[0]
            if dtype is None:
                r = run_nanogpt(data, args.budget_s, args.threads)
            else:
                sets = [f"train.dtype={dtype}"]
                r = run_lmlab(name, data, args.budget_s, args.threads, Path(tmp) / "runs",
                              sets + (args.set if name == "char-speedrun" else []))
            r["load"] = (before, os.getloadavg()[0])
            if len(dtypes) > 1 and dtype is not None:
                name = f"{name} {DTYPE_SHORT[r['dtype']]}"
            results[name] = r
            print(f"{name}: {r['note']}, {r['dtype']}; curve (step, s, subset val loss): " +
                  ", ".join(f"({s}, {c:.0f}, {v:.3f})" for s, c, v in r["curve"]), flush=True)

    head = "".join(f"{'t<=' + str(x):>9}" for x in THRESHOLDS)
    print(f"\n{'recipe':<20}{head}{'val@budget':>12}{'steps':>8}{'tokens':>12}{'load':>12}")
    for name, r in results.items():
        times = "".join(f"{t:>8.0f}s" if (t := first_time(r["curve"], x)) is not None
                        else f"{'-':>9}" for x in THRESHOLDS)
        print(f"{name:<20}{times}{r['final']:>12.4f}{r['steps']:>8}{r['tokens']:>12,}"
              f"{r['load'][0]:>6.1f}>{r['load'][1]:<5.1f}")
    print("(time to a loss: first evaluation at or below it, on the val subset; "
          "val@budget: the whole val split; load: 1-min load average before>after)")
    ref = results.get("nanogpt")
    ref_t = ref and first_time(ref["curve"], 1.7)
    for name, r in results.items():
        if name == "nanogpt" or ref is None:
            continue
        t = first_time(r["curve"], 1.7)
        if t is None:
            print(f"time-to-1.7 ratio, {name} vs nanoGPT: {name} did not reach 1.7")
        elif ref_t is None:
            print(f"time-to-1.7 ratio, {name} vs nanoGPT: > {args.budget_s / t:.1f}x "
                  f"(nanoGPT did not reach 1.7 in {args.budget_s:.0f} s)")
        else:
            print(f"time-to-1.7 ratio, {name} vs nanoGPT: {ref_t / t:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
