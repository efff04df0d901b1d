"""Sampling speed: KV cache against recomputing the whole window for every token.

Why: issue 5 asks that with the cache, 1,000 tokens from the 10.7 M model
(6 layers, 6 heads, 384 wide) at full 256 context are >= 20x faster than
recomputing the window per token. The prompt is 256 tokens, so the window is
full from the first new token on. Both paths run interleaved in one process
(the machine is shared), through lmlab's own `generate`.

Positions: once the cache holds a full window the sampler re-reads the last
half window (128 tokens) into a fresh cache, so every 128 new tokens cost one
128-token prefill; learned and rotary positions are both measured
(`--pos learned,rotary`). Thread counts: each path is timed on all threads and
on one, since one-token steps are too small to share between cores and, on a
busy machine, waiting for the second thread dominates.

The uncached path costs the same for every token once the window is full, so by
default it is timed on `--uncached-tokens 200` tokens and its rate compared;
`--uncached-tokens 1000` times all 1,000 (minutes on 2 cores).

    .venv/bin/python benchmarks/bench_generation.py [--tokens 1000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from machine import describe  # noqa: E402

from lmlab.eval.sampling import generate  # noqa: E402
from lmlab.model.adapters.custom import CustomTransformerAdapter  # noqa: E402
from lmlab.model.transformer import TransformerConfig  # noqa: E402


def build(pos: str) -> CustomTransformerAdapter:
    """The 10.7 M model, randomly initialised: speed does not depend on the weights."""
    torch.manual_seed(0)
    return CustomTransformerAdapter(TransformerConfig(
        vocab_size=97, block_size=256, n_layer=6, n_head=6, d_model=384, d_ff=1536,
        dropout=0.0, bias=False, pos_encoding=pos)).eval()


def tokens_per_s(adapter: CustomTransformerAdapter, prompt: list[int], n: int,
                 use_cache: bool) -> float:
    t0 = time.perf_counter()
    out = generate(adapter, prompt, n, temperature=1.0, top_k=40, seed=1, use_cache=use_cache)
    assert len(out) == n
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1000, help="new tokens, cached path")
    p.add_argument("--uncached-tokens", type=int, default=200,
                   help="new tokens timed on the uncached path (its per-token cost is constant)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    p.add_argument("--pos", default="learned,rotary", help="position encodings to measure")
    args = p.parse_args(argv)
    print(describe())
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 97, (256,), generator=gen).tolist()  # a full window
    threads = torch.get_num_threads()
    counts = sorted({threads, 1}, reverse=True)
    for pos in args.pos.split(","):
        adapter = build(pos)
        tokens_per_s(adapter, prompt, 20, True)  # warm-up
        tokens_per_s(adapter, prompt, 3, False)
        rates: dict[tuple[bool, int], list[float]] = {
            (cache, n): [] for cache in (True, False) for n in counts}
        for _ in range(args.rounds):
            for cache, n in rates:
                torch.set_num_threads(n)
                rates[cache, n].append(tokens_per_s(
                    adapter, prompt, args.tokens if cache else args.uncached_tokens, cache))
        torch.set_num_threads(threads)
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(f"{pos} positions, {adapter.num_params() / 1e6:.1f} M params, prompt 256, "
              f"{args.tokens} new tokens (uncached rate timed on {args.uncached_tokens}):")
        for (cache, n), r in med.items():
            print(f"  {'cached  ' if cache else 'uncached'} {n} thread(s): {r:8.2f} tok/s "
                  f"-> {args.tokens / r:7.1f} s for {args.tokens}   rounds "
                  f"{[round(x, 1) for x in rates[cache, n]]}")
        for n in counts:
            print(f"  speed-up, both on {n} thread(s): {med[True, n] / med[False, n]:.1f}x "
                  "(target >= 20x)")
        best_c, best_u = max(med[True, n] for n in counts), max(med[False, n] for n in counts)
        print(f"  speed-up, best of each: {best_c / best_u:.1f}x")
    print(f"load avg {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
