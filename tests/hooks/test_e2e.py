"""Real tiny training runs: hooks from config, plugin hashes in the manifest, honest resumes."""

from __future__ import annotations

import hashlib
import json

import pytest

from lmlab.config import from_dict
from lmlab.errors import LmlabError
from lmlab.records import read_manifest, read_metrics
from lmlab.train.loop import train

from .conftest import tiny_config_dict

PLUGIN = '''
from pathlib import Path

from lmlab.hooks.registry import register


@register("forward")
def e2e_mark(x, point, *, factor: float = 1.0):
    """Scale, and leave a mark so the test knows it ran."""
    Path(__file__).with_suffix(".ran").write_text(point)
    return x * factor
'''


def _hooks(plugin, factor=0.9):
    return {"forward": [{"name": "e2e_mark", "at": "blocks.*.hook_resid_mid", "factor": factor}],
            "backward": [{"name": "feedback_alignment", "at": "blocks.1.mlp.hook_pre"}],
            "update": [{"name": "clip_per_param", "max_norm": 0.5}],
            "aux_losses": [{"name": "z_loss", "weight": 1e-3}],
            "plugins": [str(plugin)]}


@pytest.mark.slow
def test_plugin_runs_its_hash_lands_in_the_manifest_and_resume_is_honest(corpus, tmp_path):
    plugin = tmp_path / "my_rules.py"
    plugin.write_text(PLUGIN)
    cfg_dict = tiny_config_dict(corpus, tmp_path / "runs", hooks=_hooks(plugin))
    run = train(from_dict(cfg_dict), progress=False)

    assert plugin.with_suffix(".ran").is_file()
    m = read_manifest(run)
    digest = hashlib.sha256(plugin.read_bytes()).hexdigest()
    assert m["plugins"] == {str(plugin): digest}
    assert [h["name"] for h in m["hooks"]] == ["e2e_mark", "feedback_alignment",
                                               "clip_per_param", "z_loss"]
    assert m["hooks"][0]["sha256"] == digest and m["base_hash"] and m["data_hash"]
    aux = [r for r in read_metrics(run) if r["kind"] == "aux"]
    assert [r["name"] for r in aux] == ["z_loss"] * 4

    # a changed hook parameter: refused, and the message shows the difference
    changed = from_dict(tiny_config_dict(corpus, tmp_path / "runs",
                                         hooks=_hooks(plugin, factor=0.5)))
    with pytest.raises(LmlabError, match=r"Refusing to resume(.|\n)*hooks.forward"):
        train(changed, resume=str(run), progress=False)
    # a changed plugin source under the same path: refused with both hashes
    plugin.write_text(PLUGIN + "\n# edited\n")
    new_digest = hashlib.sha256(plugin.read_bytes()).hexdigest()
    with pytest.raises(LmlabError, match=f"{digest}(.|\n)*{new_digest}"):
        train(from_dict(cfg_dict), resume=str(run), progress=False)
    # --allow-config-change resumes and records what changed
    train(changed, resume=str(run), allow_config_change=True, progress=False)
    resumes = read_manifest(run)["resumes"]
    assert len(resumes) == 1
    text = json.dumps(resumes[0]["config_changes"])
    assert "hooks.forward" in text and new_digest in text


@pytest.mark.slow
def test_same_config_and_seed_give_the_same_loss_curve_step_for_step(corpus, tmp_path):
    hooks = {"forward": [{"name": "add_noise", "at": "blocks.0.hook_resid_post", "std": 0.1}],
             "backward": [{"name": "grad_noise", "at": "blocks.1.hook_mlp_out", "std": 0.01}]}
    curves = []
    for folder in ("a", "b"):
        cfg = from_dict(tiny_config_dict(corpus, tmp_path / folder, hooks=hooks,
                                         train={"max_steps": 6, "eval_every": 3}))
        run = train(cfg, progress=False)
        curves.append([(r["kind"], r["step"], r.get("loss"), r.get("val_loss"))
                       for r in read_metrics(run) if r["kind"] in ("train", "eval")])
    assert len(curves[0]) == 9 and curves[0] == curves[1]  # 6 train lines, evals at 0, 3, 6
    # and the hooks did act: without them the curve differs
    cfg = from_dict(tiny_config_dict(corpus, tmp_path / "c", train={"max_steps": 6,
                                                                     "eval_every": 3}))
    run = train(cfg, progress=False)
    plain = [(r["kind"], r["step"], r.get("loss"), r.get("val_loss"))
             for r in read_metrics(run) if r["kind"] in ("train", "eval")]
    assert plain != curves[0]
