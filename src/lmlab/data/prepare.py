"""Sources -> a prepared corpus: `train.bin`, `val.bin` (raw token arrays) and `meta.json`.

Training memmaps the token arrays, so text is read and tokenized once, not on
every run; `meta.json` records how they were made (tokenizer, the sources'
hashes, what normalisation changed) and a hash of the tokens, so every run can
say exactly which data it saw. Each document gives its last `val_fraction` to
val, so val samples every document and the split never depends on file order.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lmlab.config import DataConfig
from lmlab.data.normalize import CHUNK, check_policy, merge_reports, normalise
from lmlab.data.sources import Document, read_sources
from lmlab.data.tokenizer import BYTE_TO_ID, CharTokenizer, Tokenizer
from lmlab.errors import LmlabError

FORMAT = "lmlab-data"
VERSION = 1
MIN_TOKENS = DataConfig.block_size + 1  # one training window of the default block size
NATIVE_PIECE_CHARS = 1 << 16


def _check_out(out: str | Path, val_fraction: float) -> Path:
    """The output folder, once the split and the destination are known to be usable."""
    if not 0.0 < val_fraction < 1.0:
        raise LmlabError(
            f"val_fraction = {val_fraction} must lie strictly between 0 and 1 (like 0.1): "
            "both splits need text."
        )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LmlabError(f"Output {out} exists and is not a folder. Choose another --out.")
    return out


def _check_sizes(train_ids: np.ndarray, val_ids: np.ndarray) -> None:
    """Each split must hold at least one training window plus its next token."""
    for split, ids in (("train", train_ids), ("val", val_ids)):
        if ids.size < MIN_TOKENS:
            raise LmlabError(
                f"The {split} split has {ids.size} tokens, but training needs at least "
                f"{MIN_TOKENS} (one window of block_size {MIN_TOKENS - 1} plus the next "
                f"token). Give more text{' or a larger val_fraction' if split == 'val' else ''}."
            )


def prepare(sources: list[str], out: str | Path, unknown: str = "replace",
            val_fraction: float = 0.1, tokenizer: Tokenizer | None = None,
            replacement: str = "?") -> dict[str, Any]:
    """Build the corpus in `out` and return its meta.

    Nothing is written until every check has passed, and each file lands by an
    atomic rename, so a failed or interrupted prepare leaves an existing corpus
    in `out` as it was.
    """
    check_policy(unknown, replacement)
    out = _check_out(out, val_fraction)

    docs = read_sources(sources)
    if tokenizer is None:
        tok: Tokenizer = CharTokenizer()
        train, val, report = _split_char(docs, unknown, replacement, val_fraction)
        train_ids, val_ids = _char_ids(train), _char_ids(val)
        train_chars, val_chars = train.size, val.size
        dtype = token_dtype(tok.vocab_size)
    else:
        tok = tokenizer
        train_text, val_text, report = _split_native(docs, val_fraction)
        train_ids, val_ids = _encode_native(tok, train_text), _encode_native(tok, val_text)
        train_chars, val_chars = len(train_text), len(val_text)
        # some tokenizers count added special tokens outside vocab_size; size for the real ids
        top_id = max(int(train_ids.max(initial=0)), int(val_ids.max(initial=0)))
        dtype = token_dtype(max(tok.vocab_size, top_id + 1))
    _check_sizes(train_ids, val_ids)
    train_ids, val_ids = train_ids.astype(dtype, copy=False), val_ids.astype(dtype, copy=False)

    with _Staging(out) as staging:
        # the bins' fsync runs in the background while the hashes below are computed
        staging.add("train.bin", train_ids)
        staging.add("val.bin", val_ids)
        digest = hashlib.sha256(train_ids)
        digest.update(val_ids)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "tokenizer": tok.spec(),
            "vocab_size": int(tok.vocab_size),
            "dtype": np.dtype(dtype).name,
            "train_tokens": int(train_ids.size),
            "val_tokens": int(val_ids.size),
            "train_chars": int(train_chars),
            "val_chars": int(val_chars),
            "sources": [
                {"name": d.name, "bytes": len(d.data),
                 "sha256": hashlib.sha256(d.data).hexdigest()}
                for d in docs
            ],
            "normalisation": report,
            "val_fraction": val_fraction,
            "data_hash": digest.hexdigest()[:16],
        }
        staging.add("meta.json", (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
        staging.commit()
    return meta


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The smallest unsigned type holding every id: halves or quarters the corpus on disk."""
    if vocab_size <= 1 << 8:
        return np.uint8
    if vocab_size <= 1 << 16:
        return np.uint16
    return np.uint32


def _val_size(n: int, val_fraction: float) -> int:
    return int(round(n * val_fraction))


def _split_char(
    docs: list[Document], unknown: str, replacement: str, val_fraction: float
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    trains, vals, reports = [], [], []
    for doc in docs:
        text, report = normalise(doc.data, unknown, replacement, source=doc.name)
        reports.append(report)
        cut = text.size - _val_size(text.size, val_fraction)
        trains.append(text[:cut])
        vals.append(text[cut:])
    return _join(trains), _join(vals), merge_reports(reports)


def _join(pieces: list[np.ndarray]) -> np.ndarray:
    """Documents joined by one newline, so no document runs into the next mid-word."""
    pieces = [p for p in pieces if p.size]
    if len(pieces) <= 1:
        return pieces[0] if pieces else np.zeros(0, dtype=np.uint8)
    newline = np.array([ord("\n")], dtype=np.uint8)
    joined = [newline] * (2 * len(pieces) - 1)
    joined[::2] = pieces
    return np.concatenate(joined)


# Char ids are ASCII order shifted down by 30 with '\n' and '\t' moved to the front;
# doing that by arithmetic is over 10x faster than a numpy table lookup (which
# widens every byte to an index). Used only while it agrees with the tokenizer's own table.
_VOCAB_BYTES = np.array([9, 10, *range(32, 127)], dtype=np.uint8)


def _shifted_ids(text: np.ndarray, in_place: bool = False) -> np.ndarray:
    ids = text if in_place else np.empty_like(text)
    for start in range(0, text.size, CHUNK):  # chunks keep the temporary in cache
        c = np.subtract(text[start:start + CHUNK], np.uint8(30), out=ids[start:start + CHUNK])
        # now printable c -> c - 30, '\n' -> 236, '\t' -> 235; fold those two to 0 and 1
        np.minimum(c, np.uint8(236) - c, out=c)
    return ids


_SHIFT_MATCHES = np.array_equal(_shifted_ids(_VOCAB_BYTES), BYTE_TO_ID[_VOCAB_BYTES])


def _char_ids(text: np.ndarray) -> np.ndarray:
    """Token ids of normalised text (every byte is in the vocabulary by construction).

    Text that prepare owns (writeable) becomes its ids in place: no second 100 MB
    buffer for a 100 MB corpus. Read-only text (a view of the file) is copied.
    """
    if _SHIFT_MATCHES:
        return _shifted_ids(text, in_place=text.flags.writeable)
    return CharTokenizer().encode_bytes(text)


def _split_native(
    docs: list[Document], val_fraction: float
) -> tuple[str, str, dict[str, Any]]:
    """For a model's own tokenizer: no ASCII policy, only UTF-8 decoding and LF newlines."""
    trains, vals = [], []
    report = {"policy": "native", "crlf": 0, "cr": 0}
    for doc in docs:
        text = doc.data.decode("utf-8", errors="replace")
        report["crlf"] += text.count("\r\n")
        text = text.replace("\r\n", "\n")
        report["cr"] += text.count("\r")
        text = text.replace("\r", "\n")
        cut = len(text) - _val_size(len(text), val_fraction)
        trains.append(text[:cut])
        vals.append(text[cut:])
    return "\n".join(t for t in trains if t), "\n".join(v for v in vals if v), report


def _encode_native(tok: Tokenizer, text: str) -> np.ndarray:
    """Encode in ~64K-character pieces, each cut just after a newline.

    One multi-megabyte string makes Hugging Face tokenizers warn that the
    sequence is longer than the model's maximum (true, and irrelevant here), and
    pieces let a tokenizer with `encode_batch` work on them in parallel.
    """
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + NATIVE_PIECE_CHARS)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    encode_batch = getattr(tok, "encode_batch", None)
    encoded = encode_batch(pieces) if encode_batch else [tok.encode(p) for p in pieces]
    return np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64)


class _Staging:
    """Files written to temp names beside their targets, renamed into place by `commit`.

    Each temp file is fsynced on a background thread: that thread only waits on
    the disk, so the wait overlaps the hashing instead of adding to it. Leaving
    the block without `commit` (an error, Ctrl-C) deletes the temp files and
    leaves `out` as it was. meta.json goes last and the old one is removed
    before the data files are swapped, so a crash between two renames leaves a
    folder that `load_prepared` refuses, never old metadata describing new tokens.
    """

    def __init__(self, out: Path) -> None:
        self.created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LmlabError(f"Cannot create the output folder {out}: {e.strerror}.") from None
        self.out, self.committed = out, False
        self.temps: dict[str, str] = {}
        self.syncs: list[Future[None]] = []
        self.pool = ThreadPoolExecutor(max_workers=1)

    def add(self, name: str, data: Any) -> None:
        fd, self.temps[name] = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.out)
        f = os.fdopen(fd, "wb")
        try:
            f.write(data)
            f.flush()
            os.chmod(self.temps[name], 0o644)  # mkstemp makes 0600; a corpus is for sharing
        except BaseException:
            f.close()
            raise
        self.syncs.append(self.pool.submit(_fsync_and_close, f))

    def commit(self) -> None:
        for sync in self.syncs:
            sync.result()
        (self.out / "meta.json").unlink(missing_ok=True)
        for name in sorted(self.temps, key=lambda n: n == "meta.json"):
            os.replace(self.temps.pop(name), self.out / name)
        _fsync_dir(self.out)
        self.committed = True

    def __enter__(self) -> _Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True)
        for temp in self.temps.values():
            Path(temp).unlink(missing_ok=True)
        if self.created and not self.committed:  # failed in a folder we made: leave no trace
            try:
                self.out.rmdir()
            except OSError:
                pass


def _fsync_and_close(f: BinaryIO) -> None:
    with f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make the renames themselves durable (POSIX only; a no-op where folders can't be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
