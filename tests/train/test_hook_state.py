"""Stateful learning rules resume exactly: their state_dict travels in the checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.hooks import registry
from lmlab.hooks.api import hooked
from lmlab.model.checkpoint import load_checkpoint
from lmlab.train.loop import config_for_resume, train
from tests.conftest import tiny_config

from .test_loop import losses

PLUGIN = '''
import torch
from lmlab.hooks.registry import register


@register("update")
class momentum_kick:
    """Momentum on the gradient, divided by a step counter, plus a kick of private noise."""

    restore = True  # False: the forgetful variant the test expects to drift

    def __init__(self, *, beta: float = 0.9, std: float = 1e-3, seed: int = 0):
        self.beta, self.std = beta, std
        self.buf, self.count = {}, 0
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, named_params, *, step, lr):
        self.count += 1
        for name, p in named_params:
            b = self.buf[name] = self.buf[name].mul(self.beta).add(p.grad) \\
                if name in self.buf else p.grad.clone()
            noise = torch.randn(p.grad.shape, generator=self.gen) * self.std
            p.grad.copy_(b * (2.0 / (1 + self.count)) + noise)

    def state_dict(self):
        return {"buf": self.buf, "count": self.count, "gen": self.gen.get_state()}

    def load_state_dict(self, state):
        if self.restore:
            self.buf, self.count = dict(state["buf"]), state["count"]
            self.gen.set_state(state["gen"])


@register("update")
class holds_a_generator:
    """State that torch.load(weights_only=True) could not read back."""

    def __call__(self, named_params, *, step, lr):
        pass

    def state_dict(self):
        return {"gen": torch.Generator()}
'''


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path
             ) -> tuple[Path, dict[int, float]]:
    """8 steps straight with the stateful plugin and every seeded built-in noise hook."""
    root = tmp_path_factory.mktemp("hook_state")
    plugin = root / "kick.py"
    plugin.write_text(PLUGIN)
    cfg = tiny_config(corpus_dir, root / "runs", hooks={
        "plugins": [str(plugin)],
        "update": [{"name": "momentum_kick"}, {"name": "noise", "seed": 3}],
        "forward": [{"name": "add_noise", "at": "blocks.0.hook_resid_mid", "std": 0.05,
                     "seed": 4}],
        "backward": [{"name": "grad_noise", "at": "blocks.1.hook_mlp_out", "seed": 5}]})
    run = train(cfg, progress=False)
    return run, losses(run)


def _resume_a_copy(straight: tuple[Path, dict[int, float]], tmp_path: Path) -> Path:
    """Resume a copy of the straight run from its step-4 checkpoint; the copy's folder."""
    run = tmp_path / straight[0].name
    shutil.copytree(straight[0], run)
    mid = str(run / "checkpoints" / "ckpt_0000004.pt")
    train(config_for_resume(mid, None, []), resume=mid, progress=False)
    return run


def test_stateful_plugin_and_seeded_noise_resume_step_for_step(straight, tmp_path):
    run = _resume_a_copy(straight, tmp_path)
    assert len(straight[1]) == 8 and losses(run) == straight[1]
    state = load_checkpoint(run / "checkpoints" / "ckpt_0000004.pt")["hooks"][0]
    assert set(state) == {"update.0.momentum_kick", "update.1.noise", "forward.0.add_noise",
                          "backward.0.grad_noise"}
    assert state["update.0.momentum_kick"]["count"] == 4


def test_without_restoring_the_state_the_resume_drifts(straight, tmp_path, monkeypatch):
    monkeypatch.setattr(registry.get("update", "momentum_kick").fn, "restore", False)
    resumed = losses(_resume_a_copy(straight, tmp_path))
    # step 5's loss is measured before the rule's first update after the resume
    assert all(resumed[s] == straight[1][s] for s in range(1, 6))
    assert all(resumed[s] != straight[1][s] for s in range(6, 9))


def test_a_checkpoint_without_the_state_is_refused(straight, tmp_path):
    mid = tmp_path / "ckpt_0000004.pt"
    ckpt = torch.load(straight[0] / "checkpoints" / mid.name, weights_only=True)
    del ckpt["hooks"], ckpt["sha256"]  # as written before hooks kept state (and hashes)
    torch.save(ckpt, mid)
    with pytest.raises(LmlabError, match="update.0.momentum_kick: the checkpoint holds no state"):
        train(config_for_resume(str(mid), None, []), resume=str(mid), progress=False)


def test_state_that_would_not_load_safely_is_refused(straight):
    from lmlab.model.adapters.custom import CustomTransformerAdapter
    from lmlab.model.transformer import TransformerConfig

    adapter = CustomTransformerAdapter(TransformerConfig(block_size=8, n_layer=1, n_head=1,
                                                         d_model=8, d_ff=16))
    with hooked(adapter, update=[{"name": "holds_a_generator"}]) as h:
        with pytest.raises(LmlabError, match="holds a Generator"):
            h.state_dict()


def test_record_goes_on_numbering_after_a_restore(tmp_path):
    """A resumed `record` adds files after the saved ones, never over them, and keeps its bound."""
    from lmlab.model.adapters.custom import CustomTransformerAdapter
    from lmlab.model.transformer import TransformerConfig

    adapter = CustomTransformerAdapter(TransformerConfig(block_size=8, n_layer=1, n_head=1,
                                                         d_model=8, d_ff=16))
    spec = {"forward": [{"name": "record", "at": "hook_embed", "dir": str(tmp_path),
                         "max_records": 3}]}
    idx = torch.zeros(1, 8, dtype=torch.long)
    with hooked(adapter, spec) as h:
        adapter(idx), adapter(idx)
        state = h.state_dict()
    assert state == {"forward.0.record": {"calls": {"hook_embed": 2}, "saved": {"hook_embed": 2}}}
    with hooked(adapter, spec) as h:  # as after a resume: fresh objects, state loaded
        h.load_state_dict(state)
        adapter(idx), adapter(idx)
    assert sorted(p.name for p in (tmp_path / "hook_embed").iterdir()) == [
        "00000.safetensors", "00001.safetensors", "00002.safetensors"]
