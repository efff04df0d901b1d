"""lmlab: a CPU-first lab for experimenting with how small language models learn.

The Python API (`lmlab.train`, `lmlab.Run`, `lmlab.load_model`, `lmlab.sweep`,
`lmlab.Sweep`) lives in `lmlab.api` and is imported on first use, so `import
lmlab.config` stays light (no torch, no pandas).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Run", "Sweep", "load_model", "sweep", "train"]

if TYPE_CHECKING:
    from lmlab.api import Run, Sweep, load_model, sweep, train


def __getattr__(name: str) -> Any:
    if name == "train":  # the package, callable: see lmlab/train/__init__.py
        import lmlab.train

        return lmlab.train
    if name in __all__:
        from lmlab import api

        return getattr(api, name)
    raise AttributeError(f"module 'lmlab' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
