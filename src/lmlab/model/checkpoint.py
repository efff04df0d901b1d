"""Checkpoints: everything a run needs to continue exactly, written atomically.

A checkpoint holds only tensors and plain values, so it loads with
`torch.load(weights_only=True)`: opening one never runs code. It is written to
a temporary file, fsynced and renamed into place, so a crash or Ctrl-C during
the write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import LmlabError
from lmlab.fileio import atomic_write_bytes

FORMAT = "lmlab-checkpoint"
VERSION = 1
PREFIX, SUFFIX = "ckpt_", ".pt"


def save_checkpoint(path: str | Path, adapter: Any, **state: Any) -> Path:
    """Write weights, model config and metadata, plus whatever loop state is given.

    `model=` in `state` gives the weights (a sharded run gathers them first);
    otherwise they are the adapter's own trained ones (on a LoRA model, the LoRA weights).
    """
    path = Path(path)
    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": adapter.get_config(),
        "model_meta": dict(adapter.meta),
        **state,
    }
    if "model" not in ckpt:
        ckpt["model"] = adapter.trained_state()
    atomic_write_bytes(path, lambda f: torch.save(ckpt, f))
    return path


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{PREFIX}{step:07d}{SUFFIX}"


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files in a folder, oldest step first."""
    return sorted(folder.glob(f"{PREFIX}*{SUFFIX}"))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, a checkpoints folder, or a run folder -> its newest checkpoint."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise LmlabError(f"Checkpoint '{p}' does not exist. Give a checkpoint file or run folder.")
    for folder in (p, p / "checkpoints"):
        found = list_checkpoints(folder) if folder.is_dir() else []
        if found:
            return found[-1]
    raise LmlabError(
        f"'{p}' holds no checkpoint ({PREFIX}*{SUFFIX}). Has the run saved one yet? "
        "Checkpoints are written every train.checkpoint_every steps and at the end."
    )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint; a truncated, corrupt or foreign file is refused."""
    p = resolve_checkpoint(path)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            OSError) as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise LmlabError(
            f"'{p}' is not a readable checkpoint: it is truncated, corrupt or not a PyTorch "
            f"file ({reason}). Use an earlier checkpoint of the run."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise LmlabError(
            f"'{p}' is a PyTorch file but not an lmlab checkpoint (no '{FORMAT}' marker); "
            "it was written by another program. To use Hugging Face weights, run "
            "`lmlab import-model`."
        )
    if ckpt.get("version", 0) > VERSION:
        raise LmlabError(
            f"'{p}' is checkpoint format version {ckpt['version']}, newer than this lmlab "
            f"reads ({VERSION}). Upgrade lmlab."
        )
    ckpt["path"] = str(p)
    return ckpt


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (the newest is never deleted)."""
    for old in list_checkpoints(folder)[: -max(keep, 1)]:
        old.unlink(missing_ok=True)
