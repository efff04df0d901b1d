"""Update hooks and the optimizers by name: what reaches optimizer.step() is what they say."""

from __future__ import annotations

import pytest
import torch

from lmlab.config import TrainConfig
from lmlab.eval.metrics import cross_entropy
from lmlab.hooks.api import hooked
from lmlab.hooks.update import newton_schulz
from lmlab.train.optim import build_optimizer

from .conftest import tiny_adapter


def step(adapter, idx, spec, optimizer="sgd", lr=0.01, **train):
    """One loop-shaped step: forward, backward, the update hooks, optimizer.step()."""
    t = TrainConfig(optimizer=optimizer, lr=lr, **train)
    opt = build_optimizer(adapter, t, torch.device("cpu"))
    with hooked(adapter, spec) as h:
        loss = cross_entropy(adapter(idx[:, :-1]), idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        h.transform_grads(0, lr)
        opt.step()
    return loss.item()


def test_sign_moves_every_parameter_by_exactly_lr_with_plain_sgd(adapter):
    # 17 tokens: inputs are 16, the whole block, so every position embedding gets a gradient
    idx = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in adapter.network.named_parameters()}
    step(adapter, idx, {"update": [{"name": "sign"}]}, lr=0.01, momentum=0.0, weight_decay=0.0)
    for n, p in adapter.network.named_parameters():
        moved = (p.detach() - before[n]).abs()
        # exactly lr, up to the rounding of p - lr in float32
        tol = torch.finfo(torch.float32).eps * (before[n].abs() + 0.01)
        assert ((moved - 0.01).abs() <= tol).all(), n


def test_without_sign_sgd_moves_by_lr_times_grad(adapter, idx):
    idx = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(0))
    before = adapter.model.blocks[0].mlp.fc.weight.detach().clone()
    step(adapter, idx, {}, lr=0.01, momentum=0.0, weight_decay=0.0)
    moved = (adapter.model.blocks[0].mlp.fc.weight.detach() - before).abs()
    assert moved.max() < 0.009  # the sign test above would fail without the hook


def _grads_after(adapter, idx, entries):
    with hooked(adapter, {"update": entries}) as h:
        adapter.zero_grad(set_to_none=True)
        cross_entropy(adapter(idx)[:, :-1], idx[:, 1:]).backward()
        h.transform_grads(0, 0.1)
    return {n: p.grad for n, p in adapter.network.named_parameters()}


def test_normalise_and_clip_per_param(adapter, idx):
    for g in _grads_after(adapter, idx, [{"name": "normalise"}]).values():
        assert torch.isclose(g.norm(), torch.tensor(1.0), atol=1e-5)
    for g in _grads_after(adapter, idx, [{"name": "clip_per_param", "max_norm": 1e-3}]).values():
        assert g.norm() <= 1e-3 * (1 + 1e-4)


@pytest.mark.parametrize("method", ["svd", "newton_schulz"])
def test_orthogonalise_2d_gradients(adapter, idx, method):
    grads = _grads_after(adapter, idx, [{"name": "orthogonalise", "method": method}])
    g = grads["blocks.0.mlp.fc.weight"]  # [64, 32]: columns orthonormal
    s = torch.linalg.svdvals(g)
    if method == "svd":
        assert torch.allclose(s, torch.ones_like(s), atol=1e-4)
    else:
        # the batch has fewer tokens than columns, so a few directions are ~0 and stay so
        big = s[s > 1e-3]
        assert len(big) >= 28 and big.min() > 0.5 and big.max() < 1.3
    assert not torch.allclose(grads["ln_final.weight"].norm(), torch.tensor(1.0))  # 1-D untouched


def test_newton_schulz_of_an_orthogonal_matrix_stays_close():
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(newton_schulz(q, 10) @ newton_schulz(q, 10).t(), torch.eye(16),
                          atol=0.35)


def test_update_noise_is_seeded(idx):
    def g(seed):
        return _grads_after(tiny_adapter(), idx, [{"name": "noise", "std": 1.0, "seed": seed}])[
            "wte.weight"]

    assert torch.equal(g(5), g(5)) and not torch.equal(g(5), g(6))


def test_update_hooks_are_applied_in_config_order(adapter, idx):
    grads = _grads_after(adapter, idx, [{"name": "sign"}, {"name": "normalise"}])
    g = grads["blocks.0.mlp.fc.weight"]
    assert torch.allclose(g.abs(), torch.full_like(g, 1 / g.numel() ** 0.5))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "lion", "muon"])
def test_optimizers_by_name_lower_the_loss(optimizer):
    a = tiny_adapter(seed=2)
    x = torch.randint(0, 8, (4, 17), generator=torch.Generator().manual_seed(0))
    lr = {"adamw": 1e-2, "sgd": 0.5, "lion": 3e-3, "muon": 2e-2}[optimizer]
    losses = [step(a, x, {}, optimizer=optimizer, lr=lr, weight_decay=0.0) for _ in range(6)]
    assert losses[-1] < losses[0] - 0.05, losses
