"""Training throughput of lmlab against nanoGPT, interleaved in one run.

Why interleaved: the benchmark machine is a shared 2-core box, so absolute
figures drift with other people's load; rounds of (nanoGPT steps, lmlab steps)
alternate so both see the same load, and the ratio of their medians is the
figure to trust. Prints per model: tokens/s, ms/step, peak RSS (each side in its
own subprocess, so one's memory does not hide the other's), model FLOP
utilisation against the fp32 and bf16 matmul peaks measured here, and the
lmlab / nanoGPT ratio.

FLOPs per token are nanoGPT's estimate: 6*N + 12*L*d*T (N = parameters less
the position table; the second term is attention's score and value matmuls).

    .venv/bin/python benchmarks/bench_throughput.py              # ~2-3 min on 2 cores
    .venv/bin/python benchmarks/bench_throughput.py --levers     # + each speed lever
    .venv/bin/python benchmarks/bench_throughput.py --models tiny --rounds 5

`--levers` adds lmlab variants, each timed in the same rounds: one thread,
torch.compile, foreach (non-fused) AdamW, bf16 autocast (emulated and slow on
CPUs without AVX512-BF16/AMX: skipped unless `--bf16`), and a "lean" step
without the per-step `.item()` calls, to show what the loop's bookkeeping costs.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import describe, matmul_peak  # noqa: E402
from nanogpt_reference import GPTConfig, NanoGPTTrainer  # noqa: E402

from lmlab.config import from_dict  # noqa: E402
from lmlab.data.dataset import load_prepared  # noqa: E402
from lmlab.data.prepare import prepare  # noqa: E402
from lmlab.device import fast_bf16  # noqa: E402
from lmlab.eval.metrics import cross_entropy  # noqa: E402
from lmlab.train.loop import Trainer  # noqa: E402
from lmlab.train.optim import set_lr  # noqa: E402

MODELS = {  # name: (n_layer, n_head, d_model, context, batch, steps per round)
    "tiny": (4, 4, 128, 256, 16, 2),   # the default config, char-tiny (0.8 M)
    "small": (6, 6, 384, 256, 8, 1),   # nanoGPT's shakespeare_char size (10.7 M)
}
ROUNDS = {"tiny": 8, "small": 5}  # short rounds, many of them: the load changes by the second
LR = 1e-3


# --- the data and the two trainers --------------------------------------------------------


def make_corpus(folder: Path, n_bytes: int = 400_000) -> Path:
    """Random play-like text, prepared with lmlab's own `prepare` (both splits > 1 window)."""
    rng = random.Random(0)
    words = ("thou art the king and i am not mine own lord but what say you good sir to be "
             "or not that is all we know of it hence away my heart LEAR ROMEO , . ; ! ?").split()
    parts, size = [], 0
    while size < n_bytes:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + "\n"
        parts.append(line)
        size += len(line)
    src = folder / "corpus.txt"
    src.write_text("".join(parts))
    prepare([str(src)], folder / "data")
    return folder / "data"


def lmlab_config(data: Path, model: str, runs: Path, **train: object):
    L, H, d, T, B, _ = MODELS[model]
    raw = {"run": {"name": f"bench-{model}", "seed": 1337, "out_dir": str(runs)},
           "data": {"path": str(data), "block_size": T},
           "model": {"n_layer": L, "n_head": H, "d_model": d, "d_ff": 4 * d, "dropout": 0.0,
                     "bias": False, "pos_encoding": "learned"},
           "train": {"batch_size": B, "max_steps": 10_000, "lr": LR, "warmup_steps": 0,
                     "device": "cpu", "dtype": "float32", **train}}
    return from_dict(raw)


def lmlab_step(data: Path, model: str, runs: Path, lean: bool = False,
               foreach: bool = False, **train: object) -> Callable[[], None]:
    """One lmlab training step as the Trainer runs it (lr, micro-batches, clip, update)."""
    trainer = Trainer(lmlab_config(data, model, runs, **train), progress=False)
    s = trainer.state
    s.model.train()
    if foreach:
        from torch.optim import AdamW

        s.optimizer = AdamW(s.optimizer.param_groups, lr=LR, betas=(0.9, 0.99),
                                  foreach=True)

    def step() -> None:
        set_lr(s.optimizer, LR * s.lr_mult(s.step))
        if lean:  # the same maths without the loop's per-step bookkeeping
            x, y = s.batcher.next()
            cross_entropy(s.model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(s.adapter.parameters(), 1.0)
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
        else:
            trainer.step(LR * s.lr_mult(s.step))
        s.step += 1

    return step


def nanogpt_step(data: Path, model: str) -> Callable[[], None]:
    L, H, d, T, B, _ = MODELS[model]
    tokens = load_prepared(str(data)).train
    ref = NanoGPTTrainer(tokens, GPTConfig(T, 97, L, H, d, 0.0, False), B, lr=LR)
    return lambda: ref.step(lr=LR)


def flops_per_token(model: str) -> float:
    L, H, d, T, _, _ = MODELS[model]
    n_params = L * (4 * d * d + 2 * d * 4 * d + 2 * d) + d + 97 * d  # tied head, no biases
    return 6 * n_params + 12 * L * d * T


# --- peak memory, each side alone ---------------------------------------------------------


def peak_rss_mb(side: str, model: str, data: Path) -> float:
    """Peak RSS of a fresh process that builds one side and runs 2 steps."""
    code = (f"import sys; sys.argv=['x']; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
            f"import bench_throughput as b, resource, pathlib, tempfile; "
            f"d=pathlib.Path({str(data)!r}); "
            f"s=b.nanogpt_step(d,{model!r}) if {side!r}=='nanogpt' else "
            f"b.lmlab_step(d,{model!r},pathlib.Path(tempfile.mkdtemp())); "
            f"[s() for _ in range(2)]; "
            f"print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    if out.returncode:
        return math.nan
    return int(out.stdout.split()[-1]) / 1024  # Linux reports KiB


# --- the interleaved timing -----------------------------------------------------------


def interleave(variants: dict[str, tuple[Callable[[], None], int | None]], steps: int,
               rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each variant, in `rounds` alternating rounds of `steps` steps.

    A variant may pin its own thread count (None leaves the default); the order
    of variants rotates each round so none always runs first after the other.
    """
    default_threads = torch.get_num_threads()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            step, threads = variants[name]
            torch.set_num_threads(threads or default_threads)
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - t0) / steps)
    torch.set_num_threads(default_threads)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,small", help="comma list of: " + ", ".join(MODELS))
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved timing rounds (default: tiny 8, small 5)")
    p.add_argument("--levers", action="store_true", help="also time each speed lever")
    p.add_argument("--bf16", action="store_true", help="with --levers, include bf16 autocast")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    args = p.parse_args(argv)

    print(describe())
    fp32 = matmul_peak(torch.float32, 1024)
    bf16 = matmul_peak(torch.bfloat16, 256 if not fast_bf16(torch.device("cpu")) else 1024)
    torch.set_num_threads(1)
    fp32_1 = matmul_peak(torch.float32, 1024, 1.0)
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"matmul peak (best of ~1.5 s): fp32 {fp32:.1f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s "
          f"(bf16/fp32 = {bf16 / fp32:.2f}); fp32 on 1 thread {fp32_1:.1f} GFLOP/s")
    print("MFU = (6N + 12*L*d*T) FLOPs/token x tokens/s / matmul peak\n")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_corpus(tmp)
        for model in args.models.split(","):
            L, H, d, T, B, steps = MODELS[model]
            tokens_per_step = B * T
            variants: dict[str, tuple[Callable[[], None], int | None]] = {
                "nanogpt": (nanogpt_step(data, model), None),
                "lmlab": (lmlab_step(data, model, tmp / "runs"), None),
            }
            compile_s = None
            if args.levers:
                variants["lmlab lean step"] = (lmlab_step(data, model, tmp / "runs", lean=True),
                                               None)
                variants["lmlab foreach AdamW"] = (
                    lmlab_step(data, model, tmp / "runs", foreach=True), None)
                variants["lmlab 1 thread"] = (lmlab_step(data, model, tmp / "runs"), 1)
                compiled = lmlab_step(data, model, tmp / "runs", compile=True)
                t0 = time.perf_counter()
                compiled()
                compiled()
                compile_s = time.perf_counter() - t0
                variants["lmlab compile"] = (compiled, None)
                if args.bf16:
                    variants["lmlab bf16 autocast"] = (
                        lmlab_step(data, model, tmp / "runs", dtype="bfloat16"), None)
            for step, threads in variants.values():  # warm-up: allocator, kernels, first Adam
                torch.set_num_threads(threads or torch.get_num_threads())
                step()
            torch.set_num_threads(os.cpu_count() or 1)
            rounds = args.rounds or ROUNDS[model]
            times = interleave(variants, steps, rounds)
            fpt = flops_per_token(model)
            print(f"== {model}: {L} layers, {H} heads, {d} wide, context {T}, batch {B}, "
                  f"{fpt / 1e6:.2f} MFLOP/token; {rounds} rounds x {steps} steps, "
                  f"load avg now {os.getloadavg()[0]:.2f}")
            base = statistics.median(times["nanogpt"])
            print(f"{'variant':<22}{'tokens/s':>10}{'ms/step':>10}{'MFU fp32':>10}"
                  f"{'MFU bf16':>10}{'vs nanoGPT':>12}{'paired':>8}  per-round ms")
            for name, ts in times.items():
                med = statistics.median(ts)
                tps = tokens_per_step / med
                # paired: the median of per-round ratios, each against the same round's nanoGPT
                paired = statistics.median(n / t for n, t in zip(times["nanogpt"], ts, strict=True))
                print(f"{name:<22}{tps:>10,.0f}{med * 1e3:>10.1f}{fpt * tps / fp32 / 1e9:>10.1%}"
                      f"{fpt * tps / bf16 / 1e9:>10.1%}{base / med:>11.2f}x{paired:>7.2f}x  "
                      + " ".join(f"{t * 1e3:.0f}" for t in ts))
            if compile_s is not None:
                print(f"(torch.compile: first two steps took {compile_s:.1f} s)")
            if not args.no_memory:
                print(f"peak RSS, each alone: nanoGPT {peak_rss_mb('nanogpt', model, data):.0f} MB,"
                      f" lmlab {peak_rss_mb('lmlab', model, data):.0f} MB")
            print()
    print(f"this process: peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; "
          f"load avg {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
