"""Adapters, one file per architecture family, listed in FAMILIES by their `architecture_types`.

Also here: rebuilding the adapter a checkpoint was made with, since only this
package knows every family. A new family is one new file and one line in
FAMILIES (imported statically, so import-linter sees it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmlab.errors import LmlabError
from lmlab.model.adapters.base import BaseAdapter
from lmlab.model.adapters.custom import CustomTransformerAdapter
from lmlab.model.adapters.gemma3 import Gemma3Adapter
from lmlab.model.adapters.llama import LlamaAdapter
from lmlab.model.adapters.qwen import QwenAdapter
from lmlab.model.checkpoint import load_checkpoint
from lmlab.model.finetune import is_lora, lora_adapter_from_checkpoint

FAMILIES: tuple[type[BaseAdapter], ...] = (CustomTransformerAdapter, QwenAdapter, LlamaAdapter,
                                          Gemma3Adapter)


def _adapter_classes() -> dict[str, type[BaseAdapter]]:
    """architecture type -> adapter class, over FAMILIES."""
    return {t: cls for cls in FAMILIES for t in cls.architecture_types}


def adapter_class(architecture_type: str) -> type[BaseAdapter]:
    """The adapter for an architecture type; imports the adapter modules on demand."""
    found = _adapter_classes()
    if architecture_type not in found:
        raise LmlabError(
            f"No adapter supports architecture '{architecture_type}'. "
            f"Supported: {', '.join(sorted(found))}."
        )
    return found[architecture_type]


def supported_architectures() -> dict[str, str]:
    """model_type -> adapter class name, for every Hugging Face family lmlab has an adapter for."""
    return {t: cls.__name__ for t, cls in _adapter_classes().items()
            if getattr(cls, "hf_classes", None)}


def adapter_from_checkpoint(ckpt: dict[str, Any], models_root: str | Path | None = None
                            ) -> BaseAdapter:
    """The adapter of an already loaded checkpoint, with its weights (on the CPU).

    A LoRA checkpoint holds its adapter weights only: the base comes from the
    registry (`models_root`, default as everywhere), checked against its hash.
    """
    meta = ckpt["model_meta"]
    cls = adapter_class(meta["architecture_type"])
    if is_lora(meta):
        return lora_adapter_from_checkpoint(cls, ckpt, models_root)
    adapter = cls.from_checkpoint(ckpt)
    if models_root is not None and hasattr(adapter, "models_root"):
        adapter.models_root = Path(models_root)  # where its tokenizer is looked up, lazily
    return adapter


def load_adapter(path: str | Path, device: str | torch.device = "cpu",
                 models_root: str | Path | None = None) -> tuple[BaseAdapter, dict[str, Any]]:
    """Rebuild the adapter a checkpoint was made with (a LoRA one on its registered base)."""
    ckpt = load_checkpoint(path)
    return adapter_from_checkpoint(ckpt, models_root).to(device), ckpt
