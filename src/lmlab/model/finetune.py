"""How an imported model is fine-tuned: LoRA through PEFT, and activation checkpointing.

LoRA (Hu et al., 2021) freezes the pretrained weights and trains a low-rank
update beside chosen linear layers. PEFT's `get_peft_model` injects its layers
in place into the Hugging Face model the adapter runs, so the adapter's own
calls (`layer.self_attn.q_proj(h)`) go through them and every hook point keeps
its name and meaning. A LoRA checkpoint holds the trained weights only, with a
hash of the base model's weight files: it is rebuilt on the base from the
registry, and refused if that base is no longer the one it was trained on.

The record of the method (`adapter.meta["finetune"]`) travels in every
checkpoint's model metadata, the run's manifest and the registry entry of a
registered fine-tune.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmlab.config import FinetuneConfig
from lmlab.device import reuse_freed_memory
from lmlab.errors import LmlabError
from lmlab.model import catalog
from lmlab.model.lora_linear import use_fused_lora

LORA = "lora"


@dataclass
class LoraState:
    """The PEFT model around an adapter's HF model (a plain attribute, not a submodule)."""

    peft_model: Any  # peft.PeftModelForCausalLM, whose base_model.model is adapter.model
    spec: dict[str, Any]


def lora_spec(ft: FinetuneConfig, base_weights_sha256: str) -> dict[str, Any]:
    """The plain record of a LoRA set-up that checkpoints and the registry keep."""
    return {"method": LORA, "r": ft.r, "alpha": ft.alpha, "dropout": ft.dropout,
            "target_modules": list(ft.target_modules),
            "base_weights_sha256": base_weights_sha256}


def is_lora(meta: dict[str, Any]) -> bool:
    return (meta.get("finetune") or {}).get("method") == LORA


def linear_names(model: nn.Module) -> list[str]:
    """The last name part of every linear layer: what `target_modules` may name."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, nn.Linear)})


def apply_lora(adapter: Any, spec: dict[str, Any]) -> None:
    """Freeze the adapter's HF model and inject PEFT LoRA layers into its `target_modules`."""
    from peft import LoraConfig, get_peft_model

    have = linear_names(adapter.model)
    missing = [t for t in spec["target_modules"] if t not in have]
    if missing:
        raise LmlabError(
            f"train.finetune.target_modules names {', '.join(missing)}, which "
            f"{type(adapter.model).__name__} does not have. Its linear layers are: "
            f"{', '.join(have)}.")
    config = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                        target_modules=list(spec["target_modules"]), task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft asks transformers a deprecated question
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        peft_model = get_peft_model(adapter.model, config)  # injects in place, freezes the rest
    assert peft_model.base_model.model is adapter.model
    adapter.lora = LoraState(peft_model, dict(spec))
    adapter.meta["finetune"] = dict(spec)


def base_weights_hash(folder: str | Path) -> str:
    return catalog.weights_hash(folder)


def lora_adapter_from_checkpoint(adapter_cls: type, ckpt: dict[str, Any],
                                 root: str | Path | None = None) -> Any:
    """The base from the registry (checked against the recorded hash) + the checkpoint's LoRA."""
    meta, config = ckpt["model_meta"], ckpt["model_config"]
    spec, name = meta["finetune"], meta.get("model_name")
    try:
        entry = catalog.resolve(name, root)
    except LmlabError as e:
        raise LmlabError(
            f"{ckpt['path']} is a LoRA checkpoint: it holds the adapter weights only, which "
            f"need their base model '{name}' in the catalog. {e}") from None
    found = base_weights_hash(entry["path"])
    if found != spec["base_weights_sha256"]:
        raise LmlabError(
            f"{ckpt['path']} is a LoRA fine-tune of '{name}' with weights sha256 "
            f"{spec['base_weights_sha256']}, but the registry's '{name}' ({entry['path']}) now "
            f"has weights sha256 {found}: the base was re-imported with other weights, and the "
            "adapter only fits the base it was trained on. Import the original base under "
            f"'{name}' again, or start a new fine-tune of the current one.")
    adapter = adapter_cls.from_folder(entry["path"], dict(meta), dtype=config.get("dtype"),
                                      block_size=config.get("block_size"))
    adapter._tokenizer_folder = Path(entry["path"])
    apply_lora(adapter, spec)
    trained = {n for n, p in adapter.network.named_parameters() if p.requires_grad}
    if set(ckpt["model"]) != trained:
        odd = sorted(set(ckpt["model"]) ^ trained)[:3]
        raise LmlabError(f"The LoRA weights in {ckpt['path']} do not fit the LoRA layers its "
                         f"set-up makes (first differences: {', '.join(odd)}).")
    adapter.network.load_state_dict(ckpt["model"], strict=False)
    return adapter


def check_resume(meta: dict[str, Any], ft: FinetuneConfig) -> None:
    """A checkpoint can only continue with its own method: the other one is a new run."""
    saved = meta.get("finetune") or {"method": "full"}
    if saved["method"] != ft.method:
        how = ("its LoRA weights only make sense on their frozen base"
               if saved["method"] == LORA else "it has no LoRA adapter to continue")
        raise LmlabError(
            f"Refusing to resume: the checkpoint is a {saved['method']} fine-tune and this "
            f"config asks for train.finetune.method={ft.method}, a config change that cannot "
            f"be honoured ({how}). Resume with train.finetune.method={saved['method']}, or "
            "register the checkpoint (`lmlab models register`) and fine-tune that anew.")
    if ft.method == LORA:
        now = {"r": ft.r, "alpha": ft.alpha, "dropout": ft.dropout,
               "target_modules": list(ft.target_modules)}
        changed = [f"{k}: {saved[k]!r} -> {v!r}" for k, v in now.items() if saved[k] != v]
        if changed:
            raise LmlabError(
                "Refusing to resume: the checkpoint's LoRA layers differ from this config's "
                f"train.finetune ({'; '.join(changed)}), and the saved weights fit only their "
                "own. Resume with the checkpoint's own config, or start a new run.")


def merged_model(adapter: Any) -> nn.Module:
    """The HF model with each LoRA update added into its base weight (the adapter is used up)."""
    if not is_lora(adapter.meta):
        return adapter.model
    return adapter.lora.peft_model.merge_and_unload()


def use_activation_checkpointing(adapter: Any, enabled: bool = True) -> None:
    """Recompute each block's activations in backward instead of keeping them (or stop).

    The HF adapters run every decoder block through `_block` (directly, or as
    FSDP's `lmlab_block`), so wrapping that one method checkpoints every block
    and leaves the adapter's code alone. Hook points inside a block run again
    during the recomputation; deterministic hooks give the same result there.
    """
    if not hasattr(adapter, "_block"):
        raise LmlabError(f"{type(adapter).__name__} does not support activation checkpointing; "
                         "the imported (Hugging Face) models do.")
    vars(adapter).pop("_block", None)  # back to the class's own method
    if not enabled:
        return
    block = adapter._block

    def checkpointed(*args: Any) -> torch.Tensor:
        if adapter.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    adapter._block = checkpointed


def store_frozen_in(adapter: Any, dtype: torch.dtype) -> int:
    """Keep the frozen linear weights of the decoder blocks in `dtype`, once; returns how many.

    Under bf16 autocast a float32 weight is cast again on every call (autocast caches only
    weights that train), so a LoRA step would re-cast all 100 M frozen weights each time;
    stored in bf16 they go straight to the matmul. The trained LoRA weights stay float32
    (master weights), and so do the embedding (whose dtype the checkpoint records, and
    which the chunked head casts per step) and the norms.
    """
    n = 0
    for layer in adapter.model.model.layers:
        for m in layer.modules():
            if isinstance(m, nn.Linear) and not m.weight.requires_grad:
                m.weight.data = m.weight.data.to(dtype)
                n += m.weight.numel()
    return n


def compile_blocks(adapter: Any) -> None:
    """Train each decoder block through `torch.compile` (inductor fuses its elementwise work).

    Only the plain training step's blocks are compiled (grad on, no KV cache, no hook on
    the block's points): evaluation, sampling and a step that hooks the block (telemetry,
    an experiment) run the eager block, so a growing cache or a hook coming and going
    never triggers recompilation, and hooks always see the eager computation.
    """
    from lmlab.model.points import HookPoint

    block = adapter._block
    compiled = torch.compile(block, dynamic=False)
    points: dict[int, list[HookPoint]] = {}

    def run(layer: nn.Module, p: nn.Module, x: torch.Tensor, rope: tuple, cache: Any,
            i: int) -> torch.Tensor:
        if id(p) not in points:
            points[id(p)] = [m for m in p.modules() if isinstance(m, HookPoint)]
        if (adapter.training and torch.is_grad_enabled() and cache is None
                and not any(h.hooked for h in points[id(p)])):
            return compiled(layer, p, x, rope, cache, i)
        return block(layer, p, x, rope, cache, i)

    adapter._block = run


def speed_choices(adapter: Any, dtype: str, fused_loss: bool, compile: bool = False
                  ) -> list[str]:
    """Set an imported model's step up for speed, and say what was chosen ([]: nothing to do).

    Only imported models are touched: a from-scratch model trains as before, bit for bit.
    """
    if not getattr(adapter, "fuses_loss", False):
        return []
    chosen = [f"autocast {dtype}" if dtype != "float32" else "float32"]
    if dtype == "bfloat16" and is_lora(adapter.meta):
        n = store_frozen_in(adapter, torch.bfloat16)
        chosen.append(f"{n / 1e6:.1f} M frozen weights stored in bf16 once (LoRA weights fp32)")
        # PEFT casts a LoRA layer's input to its weights' fp32, which autocast casts straight
        # back: the same numbers, two copies per layer; autocast alone does it once
        for m in adapter.model.modules():
            if hasattr(m, "cast_input_dtype_enabled"):
                m.cast_input_dtype_enabled = False
    if fused_loss:
        chosen.append("chunked head + cross-entropy (no full logits)")
    if is_lora(adapter.meta) and not adapter.lora.spec["dropout"]:
        n = use_fused_lora(adapter.model)
        chosen.append(f"LoRA dropout 0: {n} LoRA layers as one fused step each")
    if reuse_freed_memory():
        chosen.append("freed blocks up to 32 MB kept for reuse (glibc malloc)")
    if compile:
        compile_blocks(adapter)
        chosen.append("torch.compile per decoder block (training steps)")
    return chosen
