"""Batchers: windows -> [B, T] int64 tensors on the configured device.

`Batcher` is the seed's interface (any iterable of (x, y) pairs in, batches
out). `RandomBatcher` is what training uses: it draws window starts straight
from the token memmap with its own seeded generator, whose state is saved in
every checkpoint so a resumed run draws exactly the windows it would have.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from lmlab.data.sequences import IGNORE_INDEX, SequenceBuilder


class Batcher:
    def __init__(self, pairs: Iterable[tuple[list[int], list[int]]], batch_size: int,
                 device: str | torch.device = "cpu") -> None:
        self.pairs, self.batch_size, self.device = pairs, batch_size, torch.device(device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        xs, ys = [], []
        for x, y in self.pairs:
            xs.append(x)
            ys.append(y)
            if len(xs) == self.batch_size:
                yield self._tensors(xs, ys)
                xs, ys = [], []
        if xs:
            yield self._tensors(xs, ys)

    def _tensors(self, xs: list, ys: list) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.tensor(xs, dtype=torch.int64)
        y = torch.tensor(ys, dtype=torch.int64)
        return x.to(self.device), y.to(self.device)


def _gather(tokens: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    """Rows tokens[s:s+length] for each start, as one int64 tensor (no Python loop)."""
    idx = starts[:, None] + np.arange(length)[None, :]
    return torch.from_numpy(tokens[idx].astype(np.int64))


class RandomBatcher:
    """Uniformly random windows, reproducible from (seed, rank) and resumable."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int,
                 device: str | torch.device, seed: int, rank: int = 0) -> None:
        self.seqs = SequenceBuilder(tokens, block_size)
        self.batch_size, self.device = batch_size, torch.device(device)
        self.generator = torch.Generator().manual_seed(seed * 1000 + rank)
        self.batches_drawn = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(self.seqs.num_starts, (self.batch_size,), generator=self.generator)
        chunk = _gather(self.seqs.tokens, starts.numpy(), self.seqs.block_size + 1)
        self.batches_drawn += 1
        x, y = chunk[:, :-1], chunk[:, 1:]
        if self.device.type == "cuda":
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.contiguous().to(self.device), y.contiguous().to(self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.batches_drawn = state["batches_drawn"]


def eval_batches(tokens: np.ndarray, block_size: int, batch_size: int,
                 device: str | torch.device, max_windows: int | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Ordered windows covering the split; targets already scored are IGNORE_INDEX."""
    seqs = SequenceBuilder(tokens, block_size)
    windows = seqs.ordered(max_windows)
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        starts = np.array([s for s, _ in chunk])
        rows = _gather(seqs.tokens, starts, block_size + 1)
        x, y = rows[:, :-1], rows[:, 1:].clone()
        for r, (_, first) in enumerate(chunk):
            y[r, :first] = IGNORE_INDEX
        yield x.to(device), y.to(device)
