"""Update hooks receive the run's learning rate (train.lr x the schedule), whatever the optimizer.

Under train.optimizer=muon the first parameter group is Muon's, at train.muon_lr;
a hook reading that group's lr saw muon_lr, not the run's (issue 18).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmlab.train.optim import lr_multiplier

from .test_loop import losses

PLUGIN = '''
import json, os
from lmlab.hooks.registry import register


@register("update")
def record_lr(named_params, *, step, lr, path: str):
    with open(path, "a") as f:
        f.write(json.dumps([step, lr]) + "\\n")
'''

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file for the module: the registry refuses a hook name from a second path."""
    path = tmp_path_factory.mktemp("plugin") / "record_lr.py"
    path.write_text(PLUGIN)
    return path


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_update_hooks_get_the_runs_lr_not_a_groups(optimizer, plugin, make_config, tmp_path):
    from lmlab.train.loop import train

    log = tmp_path / "lr.jsonl"
    cfg = make_config(train={"optimizer": optimizer, "lr": 3e-3, "muon_lr": 2e-2,
                             "embed_lr": 1e-2, "max_steps": 4},
                      hooks={"plugins": [str(plugin)],
                             "update": [{"name": "record_lr", "path": str(log)}]})
    run = train(cfg, progress=False)
    seen = [json.loads(line) for line in log.read_text().splitlines()]
    mult = lr_multiplier(cfg.train)
    assert seen == [[step, 3e-3 * mult(step, None)] for step in range(4)]
    assert {step: lr for step, lr in seen} != {s: 2e-2 * mult(s, None) for s in range(4)}
    assert len(losses(run)) == 4
