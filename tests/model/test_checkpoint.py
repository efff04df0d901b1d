from pathlib import Path

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.model.adapters import load_adapter
from lmlab.model.adapters.custom import CustomTransformerAdapter
from lmlab.model.checkpoint import (
    load_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from lmlab.model.transformer import TransformerConfig


def adapter() -> CustomTransformerAdapter:
    torch.manual_seed(0)
    return CustomTransformerAdapter(TransformerConfig(block_size=16, n_layer=1, n_head=2,
                                                      d_model=16, d_ff=32))


def test_round_trip_loads_with_weights_only(tmp_path: Path):
    a = adapter()
    path = save_checkpoint(tmp_path / "checkpoints" / "ckpt_0000003.pt", a, step=3,
                           rng={"torch": torch.get_rng_state()}, config={"x": 1})
    raw = torch.load(path, weights_only=True)  # nothing but tensors and plain values
    assert raw["step"] == 3 and raw["model_meta"]["architecture_type"] == "custom"
    b, ckpt = load_adapter(tmp_path)  # a run folder resolves to its newest checkpoint
    x = torch.randint(0, 97, (1, 16))
    assert torch.equal(a(x), b(x))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoints"]  # no temp files left
    assert ckpt["model_meta"]["fine_tuned_from"] is None


def test_truncated_checkpoint_is_refused(tmp_path: Path):
    path = save_checkpoint(tmp_path / "ckpt_0000001.pt", adapter())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LmlabError, match="truncated, corrupt"):
        load_checkpoint(path)
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(LmlabError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_foreign_checkpoint_is_refused(tmp_path: Path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": adapter().state_dict()}, path)
    with pytest.raises(LmlabError, match="not an lmlab checkpoint"):
        load_checkpoint(path)


def test_missing_checkpoint_and_empty_run(tmp_path: Path):
    with pytest.raises(LmlabError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(LmlabError, match="holds no checkpoint"):
        resolve_checkpoint(tmp_path)


def test_weights_that_do_not_fit_the_recorded_architecture(tmp_path: Path):
    path = save_checkpoint(tmp_path / "ckpt_0000001.pt", adapter())
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_config"]["d_model"] = 32
    torch.save(ckpt, path)
    with pytest.raises(LmlabError, match="is corrupt: its content hashes to sha256"):
        load_adapter(path)  # edited after saving: the recorded hash no longer matches
    from lmlab.model.checkpoint import content_hash

    ckpt["sha256"] = content_hash(ckpt)  # as if written that way
    torch.save(ckpt, path)
    with pytest.raises(LmlabError, match="do not fit"):
        load_adapter(path)


def test_prune_keeps_the_newest(tmp_path: Path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path / f"ckpt_{step:07d}.pt", adapter(), step=step)
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000003.pt", "ckpt_0000004.pt"]
