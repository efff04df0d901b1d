"""Adapters, one file per architecture family; found by their `architecture_types`."""

from __future__ import annotations

import importlib
import pkgutil

from lmlab.errors import LmlabError
from lmlab.model.adapters.base import BaseAdapter


def adapter_class(architecture_type: str) -> type[BaseAdapter]:
    """The adapter for an architecture type; imports the adapter modules on demand."""
    found: dict[str, type[BaseAdapter]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, BaseAdapter):
                for t in obj.architecture_types:
                    found[t] = obj
        if architecture_type in found:
            return found[architecture_type]
    raise LmlabError(
        f"No adapter supports architecture '{architecture_type}'. "
        f"Supported: {', '.join(sorted(found))}."
    )
