"""Does llama.cpp read lmlab's GGUF export as lmlab's model? Greedy text, token for token.

Exports a checkpoint (default: the imported SmolLM2-135M-Instruct itself; `--checkpoint`
e.g. the LoRA demo's run, merged on export) with `lmlab export --format gguf`, loads the
file in llama.cpp through llama-cpp-python, and decodes greedily from the same prompt in
both: lmlab's KV-cache sampler in float32 and llama.cpp on the f32 (or `--outtype`) file.
Prints whether llama.cpp's tokenizer gives lmlab's prompt ids and how many of the greedy
tokens agree.

llama-cpp-python is not an lmlab dependency: it builds llama.cpp from source (a C++
compiler and CMake, ~5 minutes on 2 cores). Install it beside lmlab to run this:

    CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF" \\
        pip install --no-deps --target /tmp/llcpp llama-cpp-python==0.3.36
    PYTHONPATH=/tmp/llcpp python benchmarks/check_llama_cpp.py [--checkpoint runs/<run_id>]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from machine import describe

sys.path.insert(0, str(Path(__file__).parent))
from bench_gguf_export import NAME, smollm2_checkpoint  # noqa: E402

PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="a fine-tune's checkpoint or run folder")
    ap.add_argument("--models-dir", help="a registry holding smollm2-135m-instruct")
    ap.add_argument("--outtype", default="f32")
    ap.add_argument("--tokens", type=int, default=60)
    args = ap.parse_args()
    print(describe())
    import llama_cpp

    from lmlab.eval.sampling import generate
    from lmlab.model import catalog
    from lmlab.model.export_gguf import export_gguf

    work = Path(tempfile.mkdtemp(prefix="check-llama-cpp-"))
    root, ckpt, adapter = smollm2_checkpoint(work, args.models_dir, args.checkpoint)
    tok = catalog.load_tokenizer(NAME, root)
    out = export_gguf(ckpt, work / f"model-{args.outtype}.gguf", outtype=args.outtype,
                      root=root)
    ids = tok.encode(PROMPT)
    ours = generate(adapter, ids, args.tokens, greedy=True)

    llm = llama_cpp.Llama(model_path=str(out), n_ctx=512, n_threads=2, verbose=False)
    theirs_ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    theirs = []
    for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        if len(theirs) == args.tokens or t == llm.token_eos():
            break
        theirs.append(t)
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                 min(len(ours), len(theirs)))
    print(f"llama-cpp-python {llama_cpp.__version__}, file {out.name} "
          f"({out.stat().st_size / 1e6:.1f} MB), checkpoint {ckpt}")
    print(f"prompt ids: llama.cpp's tokenizer {'gives' if theirs_ids == ids else 'DIFFERS from'}"
          f" lmlab's ({len(ids)} ids)")
    print(f"greedy tokens that agree: {agree} of {len(ours)} (llama.cpp gave {len(theirs)})")
    print("lmlab:     " + repr(tok.decode(ours)))
    print("llama.cpp: " + repr(tok.decode(theirs)))


if __name__ == "__main__":
    main()
