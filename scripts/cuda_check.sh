#!/usr/bin/env bash
# One short check of lmlab's CUDA path, for a lent GPU machine (issue 5, "Device layer").
#
# Why a script: the project is built and tested on CPU; a GPU is lent rarely and
# briefly (about 15 minutes, start-up included), so everything the CUDA path
# needs checking runs here in one go, in < 3 minutes on an H100, and prints one
# PASS/FAIL line per check. It installs nothing and needs no network: it uses the
# first `python` that imports torch with CUDA ($PYTHON, python3, python) and the
# working tree's src/ (PYTHONPATH=src).
#
#   bash scripts/cuda_check.sh            # from the repository root
#   PYTHON=/opt/venv/bin/python bash scripts/cuda_check.sh
#   CHECK_DEVICE=cpu PYTHON=.venv/bin/python bash scripts/cuda_check.sh   # dry run, no GPU
#
# Checks: device info; the default model (char-tiny) trained 40 steps on a tiny
# generated corpus with train.device=cuda and dtype bfloat16, then auto (must
# resolve to bfloat16 on a bf16 GPU) and float32; loss finite and falling; the
# manifest records cuda; eval; sampling with and without the KV cache (greedy,
# inside one window: identical tokens); a 2-process DDP (NCCL) run when the
# machine has >= 2 GPUs (skipped on one).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
DEV="${CHECK_DEVICE:-cuda}"
export DEV
FAILS=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; FAILS=$((FAILS + 1)); }

PY=""
for cand in ${PYTHON:-} python3 python; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then
    PY="$cand"; break
  fi
done
if [ -z "$PY" ]; then echo "FAIL: no python with torch found (set PYTHON=...)"; exit 1; fi
echo "python: $(command -v "$PY")"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# --- device info, and the imports lmlab needs --------------------------------------------
nvidia-smi -L 2>/dev/null || echo "(nvidia-smi not found)"
if "$PY" - <<'EOF'
import importlib, os, sys, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available {torch.cuda.is_available()}")
if not torch.cuda.is_available() and os.environ["DEV"] == "cuda":
    sys.exit(1)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
missing = [m for m in ("numpy", "yaml", "tqdm", "safetensors") if importlib.util.find_spec(m) is None]
if missing:
    print("missing python packages:", ", ".join(missing)); sys.exit(1)
EOF
then pass "device $DEV usable and lmlab's imports present"
else fail "no CUDA device, or missing packages (above): the remaining checks cannot run"; exit 1
fi
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
[ "$DEV" = cuda ] || NGPU=0

# --- a tiny generated corpus -----------------------------------------------------------------
"$PY" - "$WORK/play.txt" <<'EOF'
import random, sys
rng = random.Random(0)
words = "thou art the king and i am not mine own lord but what say you good sir to be".split()
lines = [("ROMEO:" if i % 2 else "JULIET:") + " " + " ".join(rng.choice(words) for _ in range(8))
         for i in range(4000)]
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
EOF
if timeout 120 "$PY" main.py prepare "$WORK/play.txt" --out "$WORK/data" >"$WORK/prepare.log" 2>&1
then pass "prepare a generated corpus"; else fail "prepare"; cat "$WORK/prepare.log"; exit 1; fi

COMMON=(--config char-tiny --set "data.path=$WORK/data" --set "train.device=$DEV"
        --set train.max_steps=40 --set train.eval_every=20 --set train.eval_batches=5
        --set train.log_every=5 --set train.warmup_steps=5 --set train.checkpoint_every=1000 --quiet)

# --- training on cuda: bfloat16, auto, float32 ----------------------------------------------
DTYPES="bfloat16 auto float32"
[ "$DEV" = cuda ] || DTYPES="auto float32"  # bf16 is emulated, very slow, on most CPUs
for DT in $DTYPES; do
  OUT="$WORK/runs-$DT"
  if timeout 300 "$PY" main.py train "${COMMON[@]}" --set "train.dtype=$DT" \
       --set "run.out_dir=$OUT" >"$WORK/train-$DT.log" 2>&1; then
    if "$PY" - "$OUT" "$DT" <<'EOF'
import json, math, os, sys, pathlib, torch
from lmlab.device import resolve_dtype
run = next(pathlib.Path(sys.argv[1]).iterdir())
m = json.loads((run / "manifest.json").read_text())
recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
train = [r for r in recs if r["kind"] == "train"]
evals = [r for r in recs if r["kind"] == "eval"]
want = resolve_dtype(sys.argv[2], torch.device(os.environ["DEV"]))
if os.environ["DEV"] == "cuda" and sys.argv[2] == "auto" and torch.cuda.is_bf16_supported():
    want = "bfloat16"  # auto must pick bf16 on a bf16 GPU
ok = (m["device"].startswith(os.environ["DEV"]) and m["dtype"] == want and m["status"] == "finished"
      and all(math.isfinite(r["loss"]) for r in train) and train[-1]["loss"] < train[0]["loss"]
      and evals and math.isfinite(evals[-1]["val_loss"]))
print(f"  device {m['device']}, dtype {m['dtype']} (want {want}), loss {train[0]['loss']:.3f}"
      f" -> {train[-1]['loss']:.3f}, val {evals[-1]['val_loss']:.3f}, "
      f"{train[-1]['tokens_per_s']:,} tokens/s, wall {m['final']['wall_s']} s")
sys.exit(0 if ok else 1)
EOF
    then pass "train 40 steps on $DEV, dtype $DT"; else fail "train on $DEV, dtype $DT: bad figures"; fi
  else
    fail "train on $DEV, dtype $DT (exit $?)"; tail -n 30 "$WORK/train-$DT.log"
  fi
done

# --- eval and sampling, with and without the cache --------------------------------------------
RUN="$(ls -d "$WORK"/runs-auto/* 2>/dev/null | head -n 1)"
if [ -n "$RUN" ] && timeout 120 "$PY" main.py eval --checkpoint "$RUN" --json >"$WORK/eval.log" 2>&1
then pass "eval: $(tail -n 1 "$WORK/eval.log" | cut -c1-160)"; else fail "eval"; cat "$WORK/eval.log"; fi
if [ -n "$RUN" ] && timeout 120 "$PY" main.py sample --checkpoint "$RUN" --max-new-tokens 100 \
     --seed 1 >"$WORK/sample.log" 2>&1
then pass "sample (CLI)"; else fail "sample (CLI)"; cat "$WORK/sample.log"; fi
if [ -n "$RUN" ] && timeout 180 "$PY" - "$RUN" <<'EOF'
import os, sys, time, torch
from lmlab.eval.sampling import generate
from lmlab.model.adapters import load_adapter
dev = os.environ["DEV"]
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
adapter, _ = load_adapter(sys.argv[1])
adapter.to(dev)
prompt = adapter.tokenizer.encode("JULIET:\n")
out = {}
for cache in (True, False):
    generate(adapter, prompt, 5, greedy=True, use_cache=cache)
    sync(); t0 = time.perf_counter()
    out[cache] = generate(adapter, prompt, 200, greedy=True, use_cache=cache)
    sync()
    print(f"  use_cache={cache}: {200 / (time.perf_counter() - t0):,.0f} tokens/s")
same = out[True] == out[False]
print("  greedy tokens identical with and without cache:", same)
sys.exit(0 if same else 1)
EOF
then pass "generate on $DEV with and without KV cache (greedy, same tokens)"
else fail "generate on $DEV with/without KV cache"; fi

# --- DDP over NCCL, only with >= 2 GPUs --------------------------------------------------------
if [ "$NGPU" -ge 2 ]; then
  if timeout 300 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 main.py train \
       "${COMMON[@]}" --set train.dtype=bfloat16 --set "run.out_dir=$WORK/runs-ddp" \
       >"$WORK/ddp.log" 2>&1 && "$PY" - "$WORK/runs-ddp" <<'EOF'
import json, sys, pathlib
runs = list(pathlib.Path(sys.argv[1]).iterdir())
m = json.loads((runs[0] / "manifest.json").read_text())
print(f"  world_size {m['world_size']}, status {m['status']}, runs {len(runs)}")
sys.exit(0 if len(runs) == 1 and m["world_size"] == 2 and m["status"] == "finished" else 1)
EOF
  then pass "DDP, 2 processes, NCCL"; else fail "DDP over NCCL"; tail -n 40 "$WORK/ddp.log"; fi
else
  echo "SKIP: DDP over NCCL needs >= 2 GPUs (this machine has $NGPU)"
fi

echo "cuda_check: $FAILS failure(s)"
exit $(( FAILS > 0 ))
