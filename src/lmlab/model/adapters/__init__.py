"""Adapters, one file per architecture family; found by their `architecture_types`.

Also here: rebuilding the adapter a checkpoint was made with, since only this
package knows every family.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import LmlabError
from lmlab.model.adapters.base import BaseAdapter
from lmlab.model.checkpoint import load_checkpoint
from lmlab.model.finetune import is_lora, lora_adapter_from_checkpoint


def _adapter_classes() -> dict[str, type[BaseAdapter]]:
    """architecture type -> adapter class, over every module in this package."""
    found: dict[str, type[BaseAdapter]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in ("base", "hf"):  # shared code, not families
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, BaseAdapter):
                for t in obj.architecture_types:
                    found[t] = obj
    return found


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
    adapter = cls.from_config(ckpt["model_config"], meta)
    try:
        adapter.network.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise LmlabError(
            f"The weights in '{ckpt['path']}' do not fit the architecture it records: "
            f"{str(e).splitlines()[0]}"
        ) from None
    return adapter


def load_adapter(path: str | Path, device: str | torch.device = "cpu",
                 models_root: str | Path | None = None) -> tuple[BaseAdapter, dict[str, Any]]:
    """Rebuild the adapter a checkpoint was made with (a LoRA one on its registered base)."""
    ckpt = load_checkpoint(path)
    return adapter_from_checkpoint(ckpt, models_root).to(device), ckpt
