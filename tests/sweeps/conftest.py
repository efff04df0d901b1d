"""Sweep files over tiny runs: 1 layer, d_model 32, 32-token windows, 10 steps (seconds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

TINY = {"data.block_size": 32, "model.n_layer": 1, "model.n_head": 2, "model.d_model": 32,
        "model.d_ff": 64, "train.batch_size": 4, "train.max_steps": 10,
        "train.warmup_steps": 2, "train.eval_every": 5, "train.eval_batches": 2,
        "train.checkpoint_every": 5, "train.log_every": 5, "train.device": "cpu",
        "train.dtype": "float32", "run.out_dir": "runs"}
FA = {"hooks": {"backward": [{"name": "feedback_alignment", "at": "blocks.*.mlp.*"}]}}


@pytest.fixture
def sweep_file(corpus_dir: Path, tmp_path: Path):
    """Write a sweep file over the tiny corpus; keyword arguments replace top-level keys."""

    def write(file: str = "sweep.yaml", **top: Any) -> Path:
        raw = {"name": "t", "base": "char-tiny",
               "set": {**TINY, "data.path": str(corpus_dir)}, "seeds": 2,
               "baseline": "backprop", "variants": {"backprop": {}, "fa": FA}}
        raw.update(top)
        raw = {k: v for k, v in raw.items() if v is not None}
        path = tmp_path / file
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return write
