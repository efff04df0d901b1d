"""Checkpoints: everything a run needs to continue exactly, written atomically.

A checkpoint holds only tensors and plain values, so it loads with
`torch.load(weights_only=True)`: opening one never runs code. It is written to
a temporary file, fsynced and renamed into place, so a crash or Ctrl-C during
the write leaves the previous checkpoint intact.

Integrity: the file records `sha256`, a digest of its whole content (every
tensor's dtype, shape and bytes, every plain value, every key, in order), taken
before writing and checked on every load, so a flipped byte anywhere, even one
that leaves the zip readable and the tensor sizes right, is refused with both
hashes named. The digest lives inside the file rather than in a sidecar, so one
atomic rename publishes payload and hash together and no crash can leave one
without the other. A checkpoint holding a non-finite tensor is never written.
"""

from __future__ import annotations

import hashlib
import math
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


class NonFiniteCheckpoint(LmlabError):
    """A checkpoint would hold NaN or inf: it is not written."""


def content_hash(obj: Any) -> str:
    """sha256 over a checkpoint's content: keys, plain values, tensors' dtype, shape and bytes."""
    h = hashlib.sha256()

    def visit(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(o.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            items = [(k, v) for k, v in o.items() if k != "sha256"]
            h.update(f"D{len(items)}".encode())
            for k, v in items:
                visit(k)
                visit(v)
        elif isinstance(o, list | tuple):
            h.update(f"L{len(o)}".encode())
            for v in o:
                visit(v)
        else:
            h.update(f"V{type(o).__name__}:{o!r};".encode())

    visit(obj)
    return h.hexdigest()


def nonfinite_tensors(obj: Any, prefix: str = "") -> list[str]:
    """Names (dotted paths) of the floating-point tensors in `obj` holding NaN or inf."""
    if isinstance(obj, torch.Tensor):
        # a float64 sum cannot overflow from finite float32/16 values, and NaN/inf survive it:
        # exact, and ~15x faster than isfinite().all()
        bad = obj.is_floating_point() and not math.isfinite(
            obj.detach().sum(dtype=torch.float64).item())
        return [prefix or "tensor"] if bad else []
    items = obj.items() if isinstance(obj, dict) else \
        enumerate(obj) if isinstance(obj, list | tuple) else ()
    return [n for k, v in items for n in nonfinite_tensors(v, f"{prefix}.{k}" if prefix
                                                              else str(k))]


def save_checkpoint(path: str | Path, adapter: Any, **state: Any) -> Path:
    """Write weights, model config and metadata, plus whatever loop state is given.

    `model=` in `state` gives the weights (a sharded run gathers them first);
    otherwise they are the adapter's own trained ones (on a LoRA model, the LoRA
    weights). Refused (NonFiniteCheckpoint) when a
    tensor is NaN or inf, so every checkpoint on disk is one worth resuming.
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
    bad = nonfinite_tensors({"model": ckpt["model"], "optimizer": ckpt.get("optimizer")})
    if bad:
        last = last_good_checkpoint(path.parent)
        raise NonFiniteCheckpoint(
            f"Refusing to write {path}: {len(bad)} tensor(s) hold NaN or inf "
            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}). "
            + (f"The last good checkpoint is {last}." if last else "No good checkpoint exists.")
        )
    ckpt["sha256"] = content_hash(ckpt)
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
    """Load and check a checkpoint; a truncated, corrupt, non-finite or foreign file is refused."""
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
    if "sha256" in ckpt:
        actual = content_hash(ckpt)
        if actual != ckpt["sha256"]:
            raise LmlabError(
                f"'{p}' is corrupt: its content hashes to sha256 {actual}, but it was written "
                f"with {ckpt['sha256']}. Its bytes changed after saving (disk or copy error); "
                "use an earlier checkpoint of the run (`lmlab runs verify RUN` checks them all)."
            )
    bad = nonfinite_tensors({"model": ckpt.get("model"), "optimizer": ckpt.get("optimizer")})
    if bad:  # only an older lmlab wrote such a file
        raise LmlabError(
            f"'{p}' holds NaN or inf in {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}: "
            "it was saved after training had diverged. Use an earlier checkpoint of the run."
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


def last_good_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint in `folder` that loads, matches its hash and is finite."""
    for p in reversed(list_checkpoints(folder) if folder.is_dir() else []):
        try:
            load_checkpoint(p)  # checks the hash and that every tensor is finite
        except LmlabError:
            continue
        return p
    return None
