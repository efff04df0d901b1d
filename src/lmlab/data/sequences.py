"""SequenceBuilder: token arrays -> (x, y) windows for next-token prediction.

x is tokens t..t+T-1 and y is t+1..t+T, so every position of a window is a
training example. Random windows serve training; ordered, non-overlapping
windows serve evaluation so every target token is scored exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from lmlab.errors import LmlabError

IGNORE_INDEX = -100


class SequenceBuilder:
    def __init__(self, tokens: Sequence[int] | np.ndarray, block_size: int = 256) -> None:
        self.tokens = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
        self.block_size = block_size
        if len(self.tokens) < block_size + 1:
            raise LmlabError(
                f"The token sequence holds {len(self.tokens)} tokens, but one window of "
                f"{block_size} needs {block_size + 1}. Use more text or a smaller data.block_size."
            )

    @property
    def num_starts(self) -> int:
        """How many distinct window start positions exist."""
        return len(self.tokens) - self.block_size

    def window(self, start: int) -> tuple[list[int], list[int]]:
        chunk = self.tokens[start:start + self.block_size + 1].astype(np.int64)
        return chunk[:-1].tolist(), chunk[1:].tolist()

    def __iter__(self) -> Iterator[tuple[list[int], list[int]]]:
        for start, _ in self.ordered():
            yield self.window(start)

    def ordered(self, max_windows: int | None = None) -> list[tuple[int, int]]:
        """(start, first scored position) pairs covering every target once.

        Windows are non-overlapping; the last one is aligned to the end and scores
        only the targets earlier windows missed. With `max_windows`, an evenly
        spaced subset of them, still in order, for a cheaper estimate.
        """
        T, n = self.block_size, len(self.tokens) - 1  # n targets
        starts = [(s, 0) for s in range(0, n - T + 1, T)]
        covered = starts[-1][0] + T
        if covered < n:
            starts.append((n - T, T - (n - covered)))
        if max_windows is not None and max_windows < len(starts):
            idx = np.linspace(0, len(starts) - 1, max_windows).round().astype(int)
            starts = [starts[i] for i in idx]
        return starts
