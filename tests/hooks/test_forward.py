"""Forward hooks change exactly what they claim, and leave no trace once removed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from lmlab.errors import LmlabError
from lmlab.hooks.api import hooked, run_with_cache

from .conftest import tiny_adapter


def fwd(**entry) -> dict:
    return {"forward": [entry]}


def test_scale_zero_at_attn_out_makes_output_independent_of_attention(adapter, idx):
    attn = adapter.model.blocks[0].attn
    with torch.no_grad(), hooked(adapter, fwd(name="scale", at="blocks.0.hook_attn_out",
                                              factor=0.0)):
        before = adapter(idx)
        attn.qkv.weight.add_(torch.randn_like(attn.qkv.weight))
        attn.proj.weight.add_(torch.randn_like(attn.proj.weight))
        after = adapter(idx)
    assert torch.equal(before, after)
    with torch.no_grad():  # without the hook the same perturbation does change the output
        attn.proj.weight.add_(torch.randn_like(attn.proj.weight))
        assert not torch.allclose(adapter(idx), after)


def test_removing_hooks_restores_bit_identical_outputs(adapter, idx):
    with torch.no_grad():
        clean = adapter(idx)
        spec = {"forward": [
            {"name": "scale", "at": "blocks.*.hook_attn_out", "factor": 0.5},
            {"name": "add_noise", "at": "blocks.*.hook_resid_mid", "std": 0.3, "seed": 1},
            {"name": "attn_temperature", "at": "blocks.*.attn.hook_attn_scores",
             "temperature": 2.0},
            {"name": "clamp", "at": "blocks.1.mlp.hook_post", "max": 0.01}],
            "backward": [{"name": "feedback_alignment", "at": "blocks.*.mlp.hook_pre"}]}
        with hooked(adapter, spec):
            assert not torch.allclose(adapter(idx), clean)
        assert torch.equal(adapter(idx), clean)
        assert all(not p._forward_hooks for p in adapter.hook_points().values())


def test_context_removes_only_its_own_hooks(adapter, idx):
    seen = []
    point = adapter.hook_points()["blocks.0.hook_resid_post"]
    mine = point.register_forward_hook(lambda m, i, o: seen.append(1))
    with hooked(adapter, fwd(name="scale", at="blocks.*.hook_resid_post", factor=2.0)):
        with hooked(adapter, fwd(name="scale", at="hook_logits", factor=2.0)):
            pass
        assert len(point._forward_hooks) == 2
    adapter(idx)
    assert seen == [1] and len(point._forward_hooks) == 1
    mine.remove()


def test_ablations_and_clamp(adapter, idx):
    _, clean = run_with_cache(adapter, idx, "blocks.0.mlp.hook_post")
    cases = {"zero_ablate": {}, "mean_ablate": {}, "clamp": {"min": -0.01, "max": 0.01}}
    for name, params in cases.items():
        with hooked(adapter, fwd(name=name, at="blocks.0.mlp.hook_post", **params)):
            # the recorder runs after the hook, so it sees the changed activation
            _, cache = run_with_cache(adapter, idx, "blocks.0.mlp.hook_post")
        act = cache["blocks.0.mlp.hook_post"]
        if name == "zero_ablate":
            assert not act.any()
        elif name == "mean_ablate":
            expect = clean["blocks.0.mlp.hook_post"].mean(0, keepdim=True).expand_as(act)
            assert torch.allclose(act, expect)
        else:
            assert act.abs().max() <= 0.01


def test_seeded_noise_repeats_and_differs_by_seed(adapter, idx):
    def noisy(seed):
        with torch.no_grad(), hooked(adapter, fwd(name="add_noise", at="hook_embed", std=1.0,
                                                  seed=seed)):
            return adapter(idx)

    assert torch.equal(noisy(3), noisy(3))
    assert not torch.allclose(noisy(3), noisy(4))


def test_attn_temperature_flattens_the_pattern(adapter, idx):
    def entropy(t):
        with hooked(adapter, fwd(name="attn_temperature", at="blocks.0.attn.hook_attn_scores",
                                 temperature=t)):
            _, c = run_with_cache(adapter, idx, "blocks.0.attn.hook_pattern")
        p = c["blocks.0.attn.hook_pattern"]
        return -(p * p.clamp_min(1e-9).log()).sum(-1).mean()

    with torch.no_grad():
        adapter.model.blocks[0].attn.qkv.weight.mul_(20)  # sharp enough to matter
    assert entropy(10.0) > entropy(1.0) > entropy(0.1)
    with pytest.raises(LmlabError, match="hook_attn_scores"):
        hooked(adapter, fwd(name="attn_temperature", at="blocks.0.hook_attn_out")).__enter__()


class _Calls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _attention_calls(adapter, idx) -> set[str]:
    with torch.no_grad(), _Calls() as mode:
        adapter(idx)
    return mode.names


def test_fused_attention_kept_unless_scores_or_pattern_hooked(adapter, idx):
    assert "scaled_dot_product_attention" in _attention_calls(adapter, idx)
    every_other_point = {"forward": [{"name": "scale", "at": p, "factor": 1.0}
                                     for p in adapter.hook_points()
                                     if not p.endswith(("hook_attn_scores", "hook_pattern"))]}
    with hooked(adapter, every_other_point):
        calls = _attention_calls(adapter, idx)
    assert "scaled_dot_product_attention" in calls and "softmax" not in calls
    with hooked(adapter, fwd(name="scale", at="blocks.1.attn.hook_pattern", factor=1.0)):
        calls = _attention_calls(adapter, idx)
    assert "softmax" in calls  # block 1 went explicit ...
    assert "scaled_dot_product_attention" in calls  # ... block 0 kept the fused kernel
    assert "softmax" not in _attention_calls(adapter, idx)


def test_record_writes_bounded_safetensors(adapter, idx, tmp_path):
    spec = fwd(name="record", at="blocks.*.hook_resid_post", dir=str(tmp_path), every=2,
               max_records=2)
    adapter.train()
    with hooked(adapter, spec), torch.no_grad():
        for _ in range(7):
            adapter(idx)
        adapter.eval()
        adapter(idx)  # eval passes are not recorded by default
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.safetensors"))
    assert files == [f"blocks.{i}.hook_resid_post/{k:05d}.safetensors"
                     for i in range(2) for k in range(2)]
    saved = load_file(str(tmp_path / "blocks.1.hook_resid_post" / "00000.safetensors"))
    _, cache = run_with_cache(adapter, idx, "blocks.1.hook_resid_post")
    assert torch.equal(saved["activation"], cache["blocks.1.hook_resid_post"])


def test_record_without_dir_outside_a_run_is_an_error(adapter):
    with pytest.raises(LmlabError, match="dir"):
        hooked(adapter, fwd(name="record", at="hook_logits")).__enter__()


def test_run_with_cache_returns_activations_by_name(adapter, idx):
    logits, cache = run_with_cache(adapter, idx, names=["blocks.*.hook_resid_post", "hook_logits"])
    assert set(cache) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "hook_logits"}
    assert torch.equal(cache["hook_logits"], logits)
    assert all(not p._forward_hooks for p in adapter.hook_points().values())
    _, everything = run_with_cache(adapter, idx)
    assert set(everything) == set(adapter.hook_points())
    with pytest.raises(LmlabError, match="hook_resid_post"):
        run_with_cache(adapter, idx, names=["blocks.*.hook_resid_pots"])


def test_same_names_on_a_rotary_model():
    a = tiny_adapter(pos_encoding="rotary")
    x = torch.randint(0, 97, (1, 8))
    _, cache = run_with_cache(a, x)
    assert "hook_pos_embed" not in cache and "blocks.1.attn.hook_pattern" in cache


def test_unhooked_points_skip_dispatch_but_honour_global_and_pre_hooks(adapter, idx):
    seen = []
    adapter.hook_points()  # names the points
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(getattr(m, "name", "")))
    try:
        adapter(idx)
    finally:
        handle.remove()
    assert "blocks.1.hook_mlp_out" in seen  # a global hook still sees every point
    point = adapter.hook_points()["hook_embed"]
    pre = point.register_forward_pre_hook(lambda m, args: (args[0] * 0,))
    with torch.no_grad():
        out = adapter(idx)
    pre.remove()
    with torch.no_grad():
        assert not torch.equal(out, adapter(idx))
