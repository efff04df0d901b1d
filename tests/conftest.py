"""Shared fixtures: a tiny corpus made on the spot and configs for tiny models.

No test reads ../shared/data: every corpus here is generated, so the suite runs
on any machine in seconds.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmlab.config import Config, from_dict  # noqa: E402

WORDS = ("the king is dead and long live the queen my lord good night sweet prince "
         "what light through yonder window breaks to be or not that is question").split()
SPEAKERS = ("HAMLET", "OPHELIA", "ROMEO", "JULIET", "KING", "QUEEN")


def play_text(n_chars: int, seed: int = 0) -> str:
    """Deterministic play-like text: speaker lines, verse lines, blank lines."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_chars:
        lines = [f"{rng.choice(SPEAKERS)}:"]
        for _ in range(rng.randint(1, 3)):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize()
                         + rng.choice(".,;!?"))
        block = "\n".join(lines) + "\n\n"
        parts.append(block)
        size += len(block)
    return "".join(parts)[:n_chars]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared character corpus (~40 KB of text), shared read-only by the session."""
    from lmlab.data.prepare import prepare

    root = tmp_path_factory.mktemp("corpus")
    src = root / "play.txt"
    src.write_text(play_text(40_000))
    prepare([str(src)], root / "data")
    return root / "data"


def tiny_config(data_dir: Path, out_dir: Path, **sections: dict[str, Any]) -> Config:
    """A 2-layer, 32-wide model on 32-token windows: a training step takes milliseconds."""
    raw: dict[str, Any] = {
        "run": {"name": "test", "seed": 7, "out_dir": str(out_dir)},
        "data": {"path": str(data_dir), "block_size": 32},
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64},
        "train": {"batch_size": 4, "max_steps": 8, "lr": 3e-3, "warmup_steps": 2,
                  "eval_every": 4, "eval_batches": 2, "checkpoint_every": 4, "log_every": 1,
                  "device": "cpu", "dtype": "float32"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return from_dict(raw)


@pytest.fixture
def make_config(corpus_dir: Path, tmp_path: Path):
    def make(**sections: dict[str, Any]) -> Config:
        return tiny_config(corpus_dir, tmp_path / "runs", **sections)

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; two spin-wait badly on a shared 2-core machine.

    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
