"""The character tokenizer: a vocabulary fixed by the ASCII policy, not by the corpus.

Because the vocabulary never depends on the text, a model trained on one corpus
can be evaluated on any other. The policy answers the seed's open question 1:
printable ASCII (space to '~') plus newline and tab, 97 characters in all.
"""

from __future__ import annotations

import string
from typing import Any, Protocol

import numpy as np

from lmlab.errors import LmlabError

CHARS = "\n\t" + "".join(chr(c) for c in range(32, 127))
assert len(CHARS) == 97 and set(CHARS) <= set(string.printable)

# byte -> token id, 255 where the byte is not in the vocabulary
BYTE_TO_ID = np.full(256, 255, dtype=np.uint8)
BYTE_TO_ID[np.frombuffer(CHARS.encode("ascii"), dtype=np.uint8)] = np.arange(len(CHARS))


class Tokenizer(Protocol):
    """What the loop, evaluation and sampling need of any tokenizer."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def spec(self) -> dict[str, Any]: ...


class CharTokenizer:
    """ASCII character tokenizer; ids are positions in `CHARS`."""

    vocab_size = len(CHARS)

    def __init__(self) -> None:
        self._decode = np.frombuffer(CHARS.encode("ascii"), dtype=np.uint8)

    def encode(self, text: str) -> list[int]:
        try:
            raw = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        except UnicodeEncodeError as e:
            bad = text[e.start]
            raise LmlabError(
                f"Character {bad!r} (U+{ord(bad):04X}) at position {e.start} is not in the "
                "vocabulary (printable ASCII, newline, tab). Remove or replace it."
            ) from None
        return self.encode_bytes(raw).tolist()

    def encode_bytes(self, raw: np.ndarray) -> np.ndarray:
        """Vectorised encode of already-normalised ASCII bytes (uint8 in, uint8 out)."""
        ids = BYTE_TO_ID[raw]
        bad = np.flatnonzero(ids == 255)
        if bad.size:
            c = int(raw[bad[0]])
            raise LmlabError(
                f"Byte {c} ({chr(c)!r}) at position {int(bad[0])} is not in the vocabulary "
                "(printable ASCII, newline, tab). Remove or replace it."
            )
        return ids

    def decode(self, ids: list[int]) -> str:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise LmlabError(f"Token ids must lie in [0, {self.vocab_size}).")
        return self._decode[arr].tobytes().decode("ascii")

    def spec(self) -> dict[str, Any]:
        return {"kind": "char", "chars": CHARS}
