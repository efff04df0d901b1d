"""Validation loss, perplexity and bits per character, over ordered windows.

Every target token of the split (or of an evenly spaced subset of windows) is
scored exactly once. Bits per character divide the total bits by the number of
characters the tokens stand for, so a char model and a BPE model are measured
in the same unit.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.data.batcher import eval_batches
from lmlab.data.sequences import IGNORE_INDEX
from lmlab.device import autocast


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
                  ) -> torch.Tensor:
    """The seed's Loss: next-token cross-entropy over all positions, ignoring IGNORE_INDEX."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


@torch.no_grad()
def evaluate(adapter: torch.nn.Module, tokens: np.ndarray, block_size: int, batch_size: int,
             device: torch.device, dtype: str = "float32", max_windows: int | None = None,
             chars_per_token: float = 1.0) -> dict[str, float]:
    was_training = adapter.training
    adapter.eval()
    total, count = 0.0, 0
    for x, y in eval_batches(tokens, block_size, batch_size, device, max_windows):
        with autocast(device, dtype):
            logits = adapter(x)
        total += cross_entropy(logits, y, reduction="sum").item()
        count += int((y != IGNORE_INDEX).sum())
    adapter.train(was_training)
    loss = total / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
            "val_bpc": loss / math.log(2) / chars_per_token, "val_tokens": count}
