"""Aux losses: weight 0 is inert, a positive weight changes the gradients, each is a scalar."""

from __future__ import annotations

import pytest
import torch

from lmlab.eval.metrics import cross_entropy
from lmlab.hooks.api import hooked


def grads_and_aux(adapter, idx, entries):
    adapter.zero_grad(set_to_none=True)
    with hooked(adapter, {"aux_losses": entries}) as h:
        loss = cross_entropy(adapter(idx)[:, :-1], idx[:, 1:])
        aux = h.aux_losses()
        (loss + sum(aux.values())).backward()
    return {n: p.grad.clone() for n, p in adapter.network.named_parameters()}, aux


@pytest.mark.parametrize("entry", [
    {"name": "act_l2", "at": "blocks.*.hook_resid_post"},
    {"name": "attn_entropy"},  # would leave the fused kernel if it were computed
    {"name": "weight_orthogonality"},
])
def test_weight_zero_changes_nothing_and_positive_weight_changes_gradients(adapter, idx, entry):
    base, _ = grads_and_aux(adapter, idx, [])
    zero, aux = grads_and_aux(adapter, idx, [{**entry, "weight": 0.0}])
    assert all(torch.equal(zero[n], base[n]) for n in base)
    assert aux[entry["name"]].item() == 0.0
    some, aux = grads_and_aux(adapter, idx, [{**entry, "weight": 0.5}])
    assert aux[entry["name"]].item() != 0.0
    assert any(not torch.allclose(some[n], base[n]) for n in base)


@pytest.mark.parametrize("entry", [
    {"name": "act_l1", "at": "blocks.*.mlp.hook_post"},
    {"name": "act_l2", "at": "hook_embed"},
    {"name": "attn_entropy", "at": "blocks.0.attn.hook_pattern"},
    {"name": "z_loss"},
    {"name": "weight_orthogonality", "params": "blocks.*.mlp.*"},
])
def test_each_builtin_is_a_finite_positive_scalar_times_its_weight(adapter, idx, entry):
    with hooked(adapter, {"aux_losses": [{**entry, "weight": 1.0}]}) as h:
        adapter(idx)
        one = h.aux_losses()[entry["name"]]
    with hooked(adapter, {"aux_losses": [{**entry, "weight": 3.0}]}) as h:
        adapter(idx)
        three = h.aux_losses()[entry["name"]]
    assert one.dim() == 0 and torch.isfinite(one) and one > 0
    assert torch.allclose(three, 3 * one)


def test_z_loss_matches_its_definition(adapter, idx):
    with hooked(adapter, {"aux_losses": [{"name": "z_loss"}]}) as h:
        logits = adapter(idx)
        z = h.aux_losses()["z_loss"]
    assert torch.allclose(z, torch.logsumexp(logits, -1).pow(2).mean())


def test_two_entries_of_one_loss_are_logged_apart(adapter, idx):
    with hooked(adapter, {"aux_losses": [{"name": "act_l2", "at": "hook_embed"},
                                         {"name": "act_l2", "at": "hook_logits"}]}) as h:
        adapter(idx)
        assert len(h.aux_losses()) == 2
