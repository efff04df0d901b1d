"""Throughput of `lmlab prepare` on a 100 MB synthetic, mostly-ASCII text file.

The file is English-like prose with what real scraped text carries: a few
UTF-8 characters (accents, dashes, curly quotes, emoji) and some CRLF lines, so
the timing covers the slow path of normalisation, not just the all-clean one.
Target: >= 200 MB/s of input for the whole prepare (read, normalise, split,
tokenize, hash, fsync'd writes) on one core.

    .venv/bin/python benchmarks/bench_prepare.py [--mb 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import describe

from lmlab.data.normalize import normalise
from lmlab.data.prepare import prepare

WORDS = ("the of and to in a is that for it as was with be by on not he I this are or his "
         "from at which but have an they you were her she there would their we him been has "
         "when who will more no if out so said what up its about into than them can only "
         "other new some could time these two may then do first any my now such like our "
         "over man me even most made after also did many before must through back years "
         "where much your way well down should because each just those people how too "
         "little state good very make world still own see men work long get here between "
         "both life being under never day same another know while last might us great old "
         "year off come since against go came right used take three").split()
ODD = ("café", "naïve", "—", "“quoted”", "it’s", "Zürich", "½", "😀", "\x0c")


def synthetic_block(n_bytes: int, seed: int = 0) -> bytes:
    """~n_bytes of prose: ~1 in 300 words non-ASCII, ~1 in 20 lines ending CRLF."""
    rng = random.Random(seed)
    lines, size = [], 0
    while size < n_bytes:
        words = [rng.choice(ODD) if rng.random() < 1 / 300 else rng.choice(WORDS)
                 for _ in range(rng.randint(6, 14))]
        line = " ".join(words).capitalize() + "." + ("\r\n" if rng.random() < 0.05 else "\n")
        lines.append(line)
        size += len(line)
    return "".join(lines).encode("utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=100, help="input size in MB (default 100)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs (default 3)")
    args = ap.parse_args()

    print(describe())
    block = synthetic_block(1 << 20)
    data = (block * (args.mb * (1 << 20) // len(block) + 1))[: args.mb * (1 << 20)]
    mb = len(data) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "corpus.txt"
        src.write_bytes(data)

        t = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            _, report = normalise(data)
            t.append(time.perf_counter() - t0)
        print(f"normalise: {mb:.0f} MB in {min(t):.3f} s best -> {mb / min(t):.0f} MB/s "
              f"({report['unknown']} unknown chars replaced, {report['crlf']} CRLF)")

        t = []  # what prepare cannot avoid: read, hash in and out, write + fsync
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            raw = src.read_bytes()
            hashlib.sha256(raw).digest()
            hashlib.sha256(raw).digest()
            with open(Path(tmp) / "copy.bin", "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            t.append(time.perf_counter() - t0)
            os.remove(Path(tmp) / "copy.bin")
        print(f"I/O floor: {mb:.0f} MB in {min(t):.3f} s best -> {mb / min(t):.0f} MB/s "
              "(read + 2 x sha256 + write + fsync)")

        t = []
        for _ in range(args.repeat):
            out = Path(tmp) / "out"  # fresh each time: a first prepare, not a replacement
            t0 = time.perf_counter()
            meta = prepare([str(src)], out)
            t.append(time.perf_counter() - t0)
            shutil.rmtree(out)
        print(f"prepare:   {mb:.0f} MB in {min(t):.3f} s best, {statistics.median(t):.3f} s "
              f"median -> {mb / min(t):.0f} MB/s best, {mb / statistics.median(t):.0f} MB/s "
              f"median ({meta['train_tokens'] + meta['val_tokens']} tokens)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
