"""Atomic file writes: the one way lmlab replaces a file it owns.

Every rewrite (checkpoints, manifests, metrics logs, the model registry, hashes)
goes through `atomic_write_bytes`: a temp file beside the target, fsync, rename
over the target, fsync of the folder. A crash at any moment leaves either the
old file or the new one, never a mixture or an empty file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write_bytes(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(file)` on a temp file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    data = text.encode()
    atomic_write_bytes(path, lambda f: f.write(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
