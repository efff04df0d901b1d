"""Atomic file writes: the one way lmlab replaces a file it owns.

Every rewrite (checkpoints, manifests, metrics logs, the model registry, hashes)
goes through `atomic_write_bytes`: a temp file beside the target, fsync, rename
over the target, fsync of the folder. A crash at any moment leaves either the
old file or the new one, never a mixture or an empty file. A process killed
mid-write leaves its temp file (`.NAME.tmp-HOST-PID`); `clean_stale_temps`
removes those whose process is gone.

An operating-system failure (disk full, permission denied, read-only folder)
surfaces as an `OSError` that names the target file, even when a library
(torch's zip writer) buried it under its own error.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

TMP_MARK = ".tmp-"


def os_cause(e: BaseException) -> OSError | None:
    """The OSError behind `e` (itself, or one it was raised from or while handling)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ if e.__cause__ is not None else \
            None if e.__suppress_context__ else e.__context__
    return None


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Re-raise an OS failure inside the block as an OSError naming `path`."""
    try:
        yield
    except BaseException as e:
        os_err = os_cause(e)
        if os_err is None:
            raise
        raise OSError(os_err.errno, os_err.strerror, str(path)) from None


def temp_path(path: str | Path) -> Path:
    """`.NAME.tmp-HOST-PID` beside `path`: this process's scratch name for it (file or folder)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}")


def atomic_write_bytes(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(file)` on a temp file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    with naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
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


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a zombie, killed but not yet
    reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # Linux: the state is the field after the parenthesised command name
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def clean_stale_temps(folder: str | Path) -> list[Path]:
    """Delete temp files and folders in `folder` left by dead processes of this host."""
    folder, host, removed = Path(folder), socket.gethostname(), []
    if not folder.is_dir():
        return removed
    for p in folder.glob(f".*{TMP_MARK}*"):
        owner = p.name.rsplit(TMP_MARK, 1)[1]
        owner_host, _, pid = owner.rpartition("-")
        if owner_host == host and pid.isdigit() and not pid_alive(int(pid)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed
