"""Backward hooks change only the gradient, and exactly where they say."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from lmlab.eval.metrics import cross_entropy
from lmlab.hooks import registry
from lmlab.hooks.api import hooked
from lmlab.hooks.rules import feedback_linear

from .conftest import tiny_adapter


def grads(adapter, idx, spec=None) -> dict[str, torch.Tensor]:
    adapter.zero_grad(set_to_none=True)
    with hooked(adapter, spec or {}):
        logits = adapter(idx)
        cross_entropy(logits[:, :-1], idx[:, 1:]).backward()
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for n, p in adapter.network.named_parameters()}


def bwd(**entry) -> dict:
    return {"backward": [entry]}


def test_grad_scale_doubles_exactly_the_gradients_through_the_point(adapter, idx):
    base = grads(adapter, idx)
    scaled = grads(adapter, idx, bwd(name="grad_scale", at="blocks.0.hook_mlp_out", factor=2.0))
    through = [n for n in base if n.startswith(("blocks.0.mlp.", "blocks.0.ln_2."))]
    downstream = [n for n in base if n.startswith(("blocks.1.", "ln_final."))]
    upstream = [n for n in base if n.startswith(("blocks.0.attn.", "blocks.0.ln_1.", "wpe."))]
    assert through and downstream and upstream
    for n in through:
        assert torch.equal(scaled[n], 2 * base[n]), n
    for n in downstream:
        assert torch.equal(scaled[n], base[n]), n
    for n in upstream:  # they also get gradient by the residual path: changed, not doubled
        assert not torch.allclose(scaled[n], base[n]) and not torch.allclose(scaled[n], 2 * base[n])


def test_stop_gradient_cuts_what_flows_back_only_through_the_point(adapter, idx):
    g = grads(adapter, idx, bwd(name="stop_gradient", at="blocks.*.hook_attn_out"))
    assert all(not g[n].any() for n in g if ".attn." in n or ".ln_1." in n)
    assert g["blocks.0.mlp.fc.weight"].any()


def test_grad_clip_bounds_the_gradient_at_the_point(adapter, idx):
    seen = {}
    point = adapter.hook_points()["blocks.1.hook_resid_mid"]
    # a tensor hook registered before the clip sees the gradient after it (backward order)

    def watch(module, inputs, output):
        output.register_hook(lambda g: seen.__setitem__("g", g))

    handle = point.register_forward_hook(watch)
    grads(adapter, idx, bwd(name="grad_clip", at="blocks.1.hook_resid_mid", max_norm=1e-4))
    handle.remove()
    assert seen["g"].norm() <= 1e-4 * (1 + 1e-5)


def test_straight_through_quantises_forward_and_passes_the_gradient():
    fn = registry.get("backward", "straight_through").bind({"fn": "round"})
    x = torch.tensor([0.2, 1.7, -2.6], requires_grad=True)
    y = fn(x, "p")
    assert torch.equal(y, torch.tensor([0.0, 2.0, -3.0]))
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("name,params", [("grad_scale", {"factor": 1.0}),
                                         ("grad_clip", {"max_norm": 1e6}),
                                         ("grad_noise", {"std": 0.0})])
def test_hooks_that_claim_the_true_gradient_pass_gradcheck(name, params):
    fn = registry.get("backward", name).bind(params)
    x = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    assert gradcheck(lambda t: torch.tanh(fn(t, "p")) * 3, (x,))


def test_grad_noise_is_seeded():
    def g(seed):
        fn = registry.get("backward", "grad_noise").bind({"std": 1.0, "seed": seed})
        x = torch.zeros(5, requires_grad=True)
        fn(x, "p").sum().backward()
        return x.grad

    assert torch.equal(g(1), g(1)) and not torch.equal(g(1), g(2))


def test_feedback_linear_true_weight_gradient_random_input_gradient():
    torch.manual_seed(0)
    w = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    b = torch.randn(3, dtype=torch.double, requires_grad=True)
    feedback = torch.randn(3, 4, dtype=torch.double)
    x = torch.randn(2, 5, 4, dtype=torch.double, requires_grad=True)
    # weight and bias: feedback alignment claims their true gradient, so gradcheck holds
    assert gradcheck(lambda w_, b_: feedback_linear(x.detach(), w_, b_, feedback), (w, b))
    # the input's gradient is g @ B, not the true g @ W, and gradcheck sees that
    g = torch.randn(2, 5, 3, dtype=torch.double)
    (feedback_linear(x, w, b, feedback) * g).sum().backward()
    assert torch.allclose(x.grad, g @ feedback)
    assert not torch.allclose(x.grad, g @ w)
    with pytest.raises(Exception):  # noqa: B017 -- gradcheck's own error when grads differ
        gradcheck(lambda x_: feedback_linear(x_, w.detach(), b.detach(), feedback), (x,))


def test_feedback_alignment_from_config(adapter, idx):
    true = grads(adapter, idx)
    fa = grads(adapter, idx, bwd(name="feedback_alignment", at="blocks.1.mlp.*", seed=3))
    # block 1's last linear sees the true gradient at its output: its weight gradient is true
    assert torch.allclose(fa["blocks.1.mlp.proj.weight"], true["blocks.1.mlp.proj.weight"])
    # its input gradient is random feedback, so the layer below learns differently
    assert not torch.allclose(fa["blocks.1.mlp.fc.weight"], true["blocks.1.mlp.fc.weight"])
    assert not torch.allclose(fa["blocks.0.mlp.fc.weight"], true["blocks.0.mlp.fc.weight"])
    # everything that lies after block 1's MLP is untouched
    assert torch.equal(fa["ln_final.weight"], true["ln_final.weight"])
    # the same seed gives the same matrices; detaching restores the true gradients
    again = grads(adapter, idx, bwd(name="feedback_alignment", at="blocks.1.mlp.*", seed=3))
    assert torch.equal(again["blocks.0.mlp.fc.weight"], fa["blocks.0.mlp.fc.weight"])
    assert all(not m._forward_hooks for m in adapter.modules())
    assert torch.equal(grads(adapter, idx)["blocks.0.mlp.fc.weight"],
                       true["blocks.0.mlp.fc.weight"])


def test_feedback_alignment_only_on_block_points(adapter):
    from lmlab.errors import LmlabError

    with pytest.raises(LmlabError, match="blocks.\\*"):
        hooked(adapter, bwd(name="feedback_alignment", at="hook_embed")).__enter__()


def test_feedback_alignment_still_learns():
    a = tiny_adapter(seed=1)
    x = torch.randint(0, 8, (8, 16), generator=torch.Generator().manual_seed(0))
    with hooked(a, bwd(name="feedback_alignment", at="blocks.*.mlp.hook_pre")):
        losses = []
        for _ in range(8):
            loss = cross_entropy(a(x)[:, :-1], x[:, 1:])
            a.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in a.parameters():
                    p -= 0.2 * p.grad
            losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
