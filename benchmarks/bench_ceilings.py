"""Ceilings: how far the issue-5 speed targets can be reached on this machine, and why.

Training: one step of each nanoGPT-sized model (forward, cross-entropy,
backward, clipping, fused AdamW) is profiled and its time split into matmuls,
the fused attention kernel (forward and backward) and everything else. lmlab's
step already runs at nanoGPT's speed (bench_throughput.py), so the speed-up
over nanoGPT is at most step / (step - removable time): the figure printed if
attention cost nothing, and if nothing but the matmuls cost anything (at their
measured rate). The targets are 1.5x (0.8 M) and 1.8x (10.7 M).

Generation: with the KV cache each new token reads every weight once, so a
decode step cannot be faster than the matrix-vector products over all the
weights; recomputing a full 256-token window is bound by compute. Their ratio
is the ceiling of the cache's speed-up in fp32 (target 20x), printed beside the
measured cached step.

    .venv/bin/python benchmarks/bench_ceilings.py              # ~1 min on 2 cores
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from machine import describe, matmul_peak  # noqa: E402

from lmlab.model.transformer import Transformer, TransformerConfig  # noqa: E402

MODELS = {"0.8 M": (4, 4, 128, 16), "10.7 M": (6, 6, 384, 8)}  # layers, heads, width, batch
MATMUL = ("aten::mm", "aten::addmm", "aten::bmm")
ATTENTION = "scaled_dot_product_flash_attention"


def median_ms(fn: Callable[[], object], n: int, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def model(n_layer: int, n_head: int, d: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=97, block_size=256, n_layer=n_layer,
                                         n_head=n_head, d_model=d, d_ff=4 * d))


def training(name: str, n_layer: int, n_head: int, d: int, batch: int) -> None:
    m = model(n_layer, n_head, d)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
    x = torch.randint(0, 97, (batch, 256))
    y = torch.randint(0, 97, (batch, 256))

    def step() -> None:
        F.cross_entropy(m(x).view(-1, 97), y.view(-1)).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms = median_ms(step, 5)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in MATMUL) / total
    attn = sum(e.self_cpu_time_total for e in events if ATTENTION in e.key) / total
    flops = 6 * sum(p.numel() for p in m.parameters()) * batch * 256  # matmul FLOPs, roughly
    mm_rate = flops / (mm * ms / 1e3) / 1e9
    print(f"{name}: step {ms:.0f} ms; matmuls {mm:.0%} (~{mm_rate:.0f} GFLOP/s), "
          f"attention kernel {attn:.0%}, rest {1 - mm - attn:.0%}")
    print(f"  speed-up ceiling if attention were free: {1 / (1 - attn):.2f}x; "
          f"if only matmuls cost anything: {1 / mm:.2f}x")


def generation() -> None:
    m = model(6, 6, 384).eval()
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    with torch.no_grad():
        cache = m.new_cache(1, torch.device("cpu"), torch.float32)
        m(torch.zeros(1, 128, dtype=torch.long), cache=cache)
        one = torch.zeros(1, 1, dtype=torch.long)
        rows = {mod.in_features: torch.randn(1, mod.in_features) for mod in linears}

        def cached() -> None:
            m(one, cache=cache)
            cache.pos -= 1  # stay at 128 cached positions

        def weights_once() -> None:
            for mod in linears:
                F.linear(rows[mod.in_features], mod.weight)

        window = torch.zeros(1, 256, dtype=torch.long)
        step, stream = median_ms(cached, 200, 20), median_ms(weights_once, 200, 20)
        full = median_ms(lambda: m(window), 10)
    mb = sum(mod.weight.numel() for mod in linears) * 4 / 1e6
    print(f"10.7 M decode on {torch.get_num_threads()} thread(s): recompute a 256 window "
          f"{full:.1f} ms/token; cached step {step:.2f} ms -> {full / step:.1f}x; the weights "
          f"alone ({mb:.0f} MB fp32, {mb / stream:.1f} GB/s) {stream:.2f} ms -> ceiling "
          f"{full / stream:.1f}x")


def main() -> int:
    print(describe())
    print(f"fp32 matmul peak measured here: {matmul_peak(torch.float32, 1024):.0f} GFLOP/s")
    for name, spec in MODELS.items():
        training(name, *spec)
    for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
        torch.set_num_threads(threads)
        generation()
    return 0


if __name__ == "__main__":
    sys.exit(main())
