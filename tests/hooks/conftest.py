"""Fixtures for the hook tests: a tiny model, and a tiny prepared corpus for real training runs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lmlab.model.adapters.custom import CustomTransformerAdapter
from lmlab.model.transformer import TransformerConfig


@pytest.fixture(autouse=True)
def _hooks_tests_on_one_thread(one_thread):
    """Every hooks test runs its tiny models on one thread (tests/conftest.py)."""


def tiny_adapter(seed: int = 0, **kw) -> CustomTransformerAdapter:
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, d_model=32,
                            d_ff=64, **kw)
    return CustomTransformerAdapter(cfg)


@pytest.fixture
def adapter() -> CustomTransformerAdapter:
    return tiny_adapter()


@pytest.fixture
def idx() -> torch.Tensor:
    return torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))


def make_corpus(folder: Path) -> Path:
    """~20 KB of varied text: prepare needs more than 256 tokens in each split."""
    from lmlab.data.prepare import prepare

    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "runs",
             "far", "away", "from", "home", "while", "birds", "sing", "softly", "at", "dawn"]
    g = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(600):
        n = int(torch.randint(4, 9, (1,), generator=g))
        picks = torch.randint(0, len(words), (n,), generator=g).tolist()
        lines.append(" ".join(words[i] for i in picks).capitalize() + ".")
    src = folder / "corpus.txt"
    src.write_text("\n".join(lines) + "\n")
    out = folder / "data"
    prepare([str(src)], out)
    return out


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def tiny_config_dict(data: Path, out_dir: Path, **sections) -> dict:
    base = {
        "run": {"name": "t", "seed": 7, "out_dir": str(out_dir)},
        "data": {"path": str(data), "block_size": 16},
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64},
        "train": {"batch_size": 4, "max_steps": 4, "lr": 3e-3, "warmup_steps": 1,
                  "eval_every": 2, "eval_batches": 2, "checkpoint_every": 100, "log_every": 1,
                  "device": "cpu", "threads": 1},
        "hooks": {},
    }
    d = copy.deepcopy(base)
    for key, value in sections.items():
        d[key] = {**d.get(key, {}), **value}
    return d
