"""Quality per minute: validation loss against wall time on Tiny Shakespeare.

Why: issue 5's target is a config reaching val loss <= 1.60 (nats/char) on Tiny
Shakespeare (90/10 split) within 10 minutes of wall time on the 2-core machine.
This prepares the corpus, trains the config with the real Trainer, and prints
the curve of val loss (on a fixed subset of val windows, every eval_every steps)
against wall time, then the loss on the WHOLE val split at the end, and whether
and when the target was reached. Wall time is the loop's own clock: it includes
the evaluations, and excludes start-up and the final full evaluation.

    .venv/bin/python benchmarks/bench_quality.py                       # char-fast, ~10 min
    .venv/bin/python benchmarks/bench_quality.py --set train.max_steps=300   # a pilot
    .venv/bin/python benchmarks/bench_quality.py --data PATH --config char-tiny

The corpus path is an argument (default ../shared/data/tinyshakespeare.txt,
relative to the repository); no test depends on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from machine import describe  # noqa: E402

from lmlab.config import load_config  # noqa: E402
from lmlab.data.prepare import prepare  # noqa: E402
from lmlab.records import read_metrics  # noqa: E402
from lmlab.train.loop import Trainer  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the Tiny Shakespeare text file")
    p.add_argument("--config", default="char-fast", help="config name or file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (repeatable)")
    p.add_argument("--target", type=float, default=1.60, help="val loss to reach")
    p.add_argument("--budget-s", type=float, default=600.0, help="wall-time budget")
    p.add_argument("--out", default=None, help="where runs go (default: a temp folder)")
    args = p.parse_args(argv)

    src = Path(args.data)
    if not src.is_file():
        print(f"Corpus {src} not found: pass --data PATH to a copy of tinyshakespeare.txt.")
        return 2
    print(describe())
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        meta = prepare([str(src)], data, val_fraction=0.1)
        print(f"corpus: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens")
        out = args.out or str(Path(tmp) / "runs")
        cfg = load_config(args.config, [f"data.path={data}", f"run.out_dir={out}", *args.set])
        t = cfg.train
        print(f"config {args.config}: {cfg.model.n_layer}x{cfg.model.n_head}x{cfg.model.d_model}"
              f" ctx {cfg.data.block_size} batch {t.batch_size} steps {t.max_steps} lr {t.lr}"
              f" dtype {t.dtype} compile {t.compile} threads {t.threads}")
        t0 = time.perf_counter()
        trainer = Trainer(cfg, progress=False)
        startup = time.perf_counter() - t0
        run_dir = trainer.run()
        records = read_metrics(run_dir)
        evals = [r for r in records if r.get("kind") == "eval"]
        trains = {r["step"]: r for r in records if r.get("kind") == "train"}
        print(f"\nstart-up {startup:.1f} s; curve (val loss on {t.eval_batches} batches):")
        print(f"{'step':>6}{'wall s':>9}{'train':>9}{'val':>9}{'tok/s':>9}")
        for r in evals:
            tr = trains.get(r["step"], {})
            print(f"{r['step']:>6}{r['time']:>9.1f}{tr.get('loss', float('nan')):>9.4f}"
                  f"{r['val_loss']:>9.4f}{tr.get('tokens_per_s', 0):>9,}")
        trainer.state.cfg.train.eval_batches = None  # the same evaluation, on every val window
        final = trainer.evaluate()
        wall = evals[-1]["time"] if evals else float("nan")
        hit = next((r for r in evals if r["val_loss"] <= args.target), None)
        print(f"\nfinal: val loss {final['val_loss']:.4f} on the whole val split "
              f"({final['val_tokens']:,} tokens), train wall time {wall:.1f} s "
              f"(budget {args.budget_s:.0f} s)")
        print(f"target {args.target}: " + (
            f"reached at step {hit['step']} after {hit['time']:.1f} s (subset val loss)"
            if hit else "not reached") +
            f"; whole-split loss {'<=' if final['val_loss'] <= args.target else '>'} target, "
            f"wall {'within' if wall <= args.budget_s else 'OVER'} budget")
        print(json.dumps({"final_val_loss": round(final["val_loss"], 4), "wall_s": wall,
                          "load_avg": os.getloadavg()[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
