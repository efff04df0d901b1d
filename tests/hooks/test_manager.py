"""Config errors name the real choices; plugins register by decorator; describe() is complete."""

from __future__ import annotations

import hashlib

import pytest
import torch

from lmlab.config import HooksConfig
from lmlab.errors import LmlabError
from lmlab.hooks import registry
from lmlab.hooks.api import hooked, hooks_config
from lmlab.hooks.manager import ExperimentHooks
from lmlab.hooks.plugins import load_plugin


def build(adapter, **kinds) -> ExperimentHooks:
    return ExperimentHooks(hooks_config(**kinds), adapter)


def test_unknown_point_lists_the_real_points(adapter):
    with pytest.raises(LmlabError) as e:
        build(adapter, forward=[{"name": "scale", "at": "blocks.*.hook_atn_out"}])
    msg = str(e.value)
    assert "blocks.{i}.hook_attn_out" in msg and "hook_logits" in msg


def test_unknown_hook_lists_the_available_ones(adapter):
    with pytest.raises(LmlabError) as e:
        build(adapter, forward=[{"name": "scael", "at": "hook_logits"}])
    assert "Did you mean 'scale'" in str(e.value) and "zero_ablate" in str(e.value)


def test_unknown_or_mistyped_param_is_an_error(adapter):
    with pytest.raises(LmlabError, match="Its parameters: factor"):
        build(adapter, forward=[{"name": "scale", "at": "hook_logits", "fatcor": 2}])
    with pytest.raises(LmlabError, match="factor"):
        build(adapter, forward=[{"name": "scale", "at": "hook_logits", "factor": "big"}])
    with pytest.raises(LmlabError, match="'sign', 'round'"):
        build(adapter, backward=[{"name": "straight_through", "at": "hook_logits",
                                  "fn": "floor"}])
    with pytest.raises(LmlabError, match="takes no 'at'"):
        build(adapter, update=[{"name": "sign", "at": "hook_logits"}])
    with pytest.raises(LmlabError, match="needs 'at'"):
        build(adapter, backward=[{"name": "grad_scale"}])


def test_a_plugin_cannot_silently_replace_a_builtin(tmp_path):
    p = tmp_path / "clash.py"
    p.write_text("from lmlab.hooks.registry import register\n\n"
                 "@register('forward')\ndef scale(x, point):\n    return x\n")
    with pytest.raises(LmlabError, match="already registered by builtin"):
        load_plugin(p)
    assert registry.get("forward", "scale").source == "builtin"


def test_plugin_hooks_of_every_kind_run_from_config(adapter, idx, tmp_path):
    p = tmp_path / "my_rules.py"
    p.write_text(
        "import torch\n"
        "from lmlab.hooks.registry import register\n\n"
        "CALLS = []\n\n"
        "@register('forward')\n"
        "def t_negate(x, point, *, times: int = 1):\n"
        "    '''Negate (a test).'''\n"
        "    CALLS.append(point)\n"
        "    return -x if times % 2 else x\n\n"
        "@register('update')\n"
        "def t_zero(named_params, *, step, lr):\n"
        "    for _, q in named_params:\n"
        "        q.grad.zero_()\n\n"
        "@register('aux_losses')\n"
        "def t_const(acts, model):\n"
        "    return torch.tensor(2.0)\n")
    spec = HooksConfig(forward=[{"name": "t_negate", "at": "hook_embed", "times": 3}],
                       update=[{"name": "t_zero"}], aux_losses=[{"name": "t_const",
                                                                "weight": 0.5}],
                       plugins=[str(p)])
    with hooked(adapter, spec) as h:
        out = adapter(idx)
        assert h.aux_losses() == {"t_const": torch.tensor(1.0)}
        out.sum().backward()
        h.transform_grads(0, 0.1)
        described = h.describe()
    assert all(not q.grad.any() for q in adapter.parameters())
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    assert h.plugins == {str(p): digest}
    assert described[0]["sha256"] == digest and described[0]["source"] == str(p)
    assert registry.get("forward", "t_negate").source == str(p.resolve())


def test_describe_lists_every_hook_with_its_params(adapter):
    h = build(adapter, forward=[{"name": "scale", "at": "blocks.0.*", "factor": 0.5}],
              update=[{"name": "sign"}], aux_losses=[{"name": "z_loss", "weight": 0.1}])
    assert h.describe() == [
        {"kind": "forward", "name": "scale", "at": "blocks.0.*", "factor": 0.5,
         "source": "builtin"},
        {"kind": "update", "name": "sign", "source": "builtin"},
        {"kind": "aux_losses", "name": "z_loss", "weight": 0.1, "source": "builtin"}]


def test_attach_twice_is_refused_and_detach_is_idempotent(adapter, idx):
    h = build(adapter, forward=[{"name": "scale", "at": "hook_logits", "factor": 2.0}])
    h.attach()
    with pytest.raises(LmlabError, match="already attached"):
        h.attach()
    h.detach()
    h.detach()
    assert not adapter.hook_points()["hook_logits"]._forward_hooks
    with torch.no_grad():
        assert torch.equal(adapter(idx), adapter(idx))
