"""The learning rules under a real 2-process torchrun (gloo): DDP equals one process.

One launch carries every kind of rule at once: DFA between the blocks, and
inside them feedback alignment, brSF sign-symmetry (redrawn each step) and
Kolen-Pollack (its B decayed each step). Two DDP steps on batch B per rank must
give the parameters of two single-process steps on the union of both ranks'
windows (batch 2B): each rule's gradient is linear in the per-example errors,
so DDP's average of the ranks' gradients is the 2B gradient, and the per-step
state (brSF's draw, KP's B) advances once per optimizer step on every rank.
SGD without momentum keeps the step linear in the gradient (and lets KP
mirror a decay), so an error shows at full size. Telemetry runs at every step,
alignment passes included, on both ranks.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from lmlab.config import from_dict
from lmlab.model.build import build_adapter
from lmlab.model.checkpoint import list_checkpoints, load_checkpoint
from tests.train.test_distributed import _corpus, _max_rel_diff, _params, _single, _torchrun

pytestmark = pytest.mark.slow

RULES = [{"name": "dfa", "at": "blocks.*"},
         {"name": "feedback_alignment", "at": "blocks.0.attn.*", "seed": 1},
         {"name": "sign_symmetry", "at": "blocks.0.mlp.*", "mode": "brsf"},
         {"name": "kolen_pollack", "at": "blocks.1.*", "seed": 2}]


def test_rules_under_ddp_equal_one_process_with_the_union_batch(tmp_path):
    data = _corpus(tmp_path)
    raw = {
        "run": {"name": "rules", "seed": 7, "out_dir": str(tmp_path / "runs")},
        "data": {"path": str(data), "block_size": 32},
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64, "bias": True},
        "train": {"batch_size": 4, "max_steps": 2, "lr": 0.5, "min_lr": 0.5, "warmup_steps": 0,
                  "optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.1, "grad_clip": 0.0,
                  "eval_every": 100, "eval_batches": 1, "checkpoint_every": 100,
                  "log_every": 1, "device": "cpu", "dtype": "float32"},
        "hooks": {"backward": RULES},
        "telemetry": {"every": 1},  # the alignment passes run on every rank, every step
    }
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(raw))
    _torchrun(["--config", str(path)], tmp_path)
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    ckpt = load_checkpoint(list_checkpoints(run / "checkpoints")[-1])
    assert ckpt["step"] == 2
    from lmlab.records import read_metrics

    tel = [r for r in read_metrics(run) if r["kind"] == "telemetry"]
    assert [r["step"] for r in tel] == [1, 2]
    assert any(k.startswith("grad_angle/") for k in tel[-1])
    assert any(k.startswith("b_w_angle/blocks.1.") for k in tel[-1])
    assert ckpt["hooks"][0]["backward.2.sign_symmetry"] == {"steps": 2}
    assert ckpt["hooks"][1]["backward.3.kolen_pollack"].keys() == \
        ckpt["hooks"][0]["backward.3.kolen_pollack"].keys()

    cfg = from_dict(raw)
    torch.manual_seed(cfg.run.seed)
    init = {k: v.clone() for k, v in build_adapter(cfg, 97).network.state_dict().items()}
    single = _single(raw, ranks=2, max_steps=2)
    rel = _max_rel_diff(ckpt["model"], _params(single), init)
    assert rel < 1e-4, f"DDP with the rules differs from one process by {rel:.2e} of a step"
    # negative control: the same rules on rank 0's windows alone take another step
    assert _max_rel_diff(ckpt["model"], _params(_single(raw, ranks=1, max_steps=2)), init) > 1e-2
    kp = ckpt["hooks"][0]["backward.3.kolen_pollack"]
    kp_single = single.state.hooks.state_dict()["backward.3.kolen_pollack"]
    assert all(torch.allclose(kp[k], kp_single[k], atol=1e-7) for k in kp)
