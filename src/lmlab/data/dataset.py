"""Open a prepared corpus (the output of `lmlab prepare`) as read-only token memmaps.

Memmaps keep a corpus of any size off the Python heap: training reads only the
windows it draws. The checks here are cheap (sizes against meta, never a full
hash) so opening stays instant, yet a folder from another program or a
half-replaced corpus is refused rather than trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.data.prepare import FORMAT, VERSION
from lmlab.errors import LmlabError

DTYPES = ("uint8", "uint16", "uint32")


@dataclass
class PreparedData:
    path: Path
    train: np.ndarray
    val: np.ndarray
    meta: dict[str, Any]


def load_prepared(path: str | Path) -> PreparedData:
    """Memmap train.bin and val.bin of the corpus in `path`, checked against its meta.json."""
    path = Path(path)
    fix = f"Run `lmlab prepare --out {path}` to (re)build it."
    if not path.is_dir():
        raise LmlabError(f"Prepared data folder {path} does not exist. {fix}")
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise LmlabError(f"{path} has no meta.json, so it is not a prepared corpus. {fix}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmlabError(f"{meta_path} cannot be read ({e}). {fix}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LmlabError(f"{meta_path} was not written by lmlab prepare. {fix}")
    if meta.get("version") != VERSION:
        raise LmlabError(
            f"{path} holds data format version {meta.get('version')!r}; this lmlab reads "
            f"version {VERSION}. {fix}"
        )
    dtype = meta.get("dtype")
    if dtype not in DTYPES:
        raise LmlabError(f"{meta_path} names an unknown token dtype {dtype!r}. {fix}")
    splits = {}
    for split in ("train", "val"):
        splits[split] = _open_split(path / f"{split}.bin", np.dtype(dtype),
                                    meta.get(f"{split}_tokens"), fix)
    return PreparedData(path=path, train=splits["train"], val=splits["val"], meta=meta)


def _open_split(file: Path, dtype: np.dtype, tokens: Any, fix: str) -> np.ndarray:
    if not isinstance(tokens, int) or tokens < 0:
        raise LmlabError(f"meta.json beside {file.name} has no valid token count. {fix}")
    if not file.is_file():
        raise LmlabError(f"{file} is missing. {fix}")
    size, expected = file.stat().st_size, tokens * dtype.itemsize
    if size != expected:
        raise LmlabError(
            f"{file} holds {size} bytes but meta.json promises {tokens} {dtype.name} tokens "
            f"({expected} bytes): the corpus is damaged or half-written. {fix}"
        )
    if tokens == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(file, dtype=dtype, mode="r")
