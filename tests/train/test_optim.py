import copy
import math

import pytest
import torch

from lmlab.config import TrainConfig
from lmlab.model.adapters.custom import CustomTransformerAdapter
from lmlab.model.transformer import TransformerConfig
from lmlab.train.optim import build_optimizer, lr_multiplier, param_groups, set_lr

pytestmark = pytest.mark.usefixtures("one_thread")


def adapter() -> CustomTransformerAdapter:
    return CustomTransformerAdapter(TransformerConfig(block_size=16, n_layer=1, n_head=2,
                                                      d_model=16, d_ff=32, bias=True))


def test_no_weight_decay_on_norms_biases_embeddings():
    a = adapter()
    decay, no_decay = param_groups(a, TrainConfig(weight_decay=0.1))
    names = {id(p): n for n, p in a.network.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed == {"blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                       "blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight"}
    assert no_decay["weight_decay"] == 0.0
    assert "wte.weight" in {names[id(p)] for p in no_decay["params"]}
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == a.num_params()  # the tied head is counted once


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_embed_lr_gives_the_embedding_tables_their_own_lr(optimizer):
    torch.manual_seed(0)
    a = CustomTransformerAdapter(TransformerConfig(block_size=16, n_layer=1, n_head=2, d_model=16,
                                                   d_ff=32, tie_embeddings=False,
                                                   value_embed=True))
    t = TrainConfig(optimizer=optimizer, lr=1e-3, muon_lr=1e-2, embed_lr=3e-2)
    opt = build_optimizer(a, t, torch.device("cpu"))
    set_lr(opt, 0.5e-3)  # the schedule halves the lr: every group keeps its ratio
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    net = a.network
    tables = [net.wte.weight, net.value_embeds[0].weight]
    assert [lr[id(p)] for p in tables] == pytest.approx([1.5e-2, 1.5e-2])
    assert lr[id(net.lm_head.weight)] == pytest.approx(0.5e-3)  # the head is not a table
    qkv = lr[id(net.blocks[0].attn.qkv.weight)]
    assert qkv == pytest.approx(0.5e-2 if optimizer == "muon" else 0.5e-3)
    assert len(lr) == sum(1 for _ in net.parameters())  # every parameter once
    default = build_optimizer(a, TrainConfig(optimizer=optimizer), torch.device("cpu"))
    assert len(default.param_groups) == len(opt.param_groups) - 1  # no extra group unless asked


def test_warmup_then_cosine_to_min_lr():
    t = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    f = lr_multiplier(t)
    assert math.isclose(f(0), 0.1) and math.isclose(f(9), 1.0)
    assert math.isclose(f(60), 0.55, rel_tol=1e-6)  # halfway down the cosine
    assert math.isclose(f(110), 0.1) and math.isclose(f(500), 0.1)


def _step(a: CustomTransformerAdapter, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    loss = torch.nn.functional.cross_entropy(a(x).flatten(0, 1), x.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def test_every_optimizer_trains_and_round_trips_its_state():
    """A restored optimizer takes exactly the original's next step; a fresh one does not."""
    for name in ("adamw", "sgd", "lion", "muon"):
        torch.manual_seed(0)
        a = adapter()
        t = TrainConfig(optimizer=name, lr=1e-2)
        opt = build_optimizer(a, t, torch.device("cpu"))
        x = torch.randint(0, 97, (2, 16))
        losses = [_step(a, opt, x) for _ in range(5)]
        assert losses[-1] < losses[0], name
        restored, fresh = copy.deepcopy(a), copy.deepcopy(a)
        opt2 = build_optimizer(restored, t, torch.device("cpu"))
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
        opt3 = build_optimizer(fresh, t, torch.device("cpu"))
        for model, o in ((a, opt), (restored, opt2), (fresh, opt3)):
            _step(model, o, x)
        after = dict(a.network.named_parameters())
        for n, p in restored.network.named_parameters():
            assert torch.equal(p, after[n]), (name, n)
        assert any(not torch.equal(p, after[n]) for n, p in fresh.network.named_parameters()), \
            name  # the state matters, so the equality above could have failed


def test_wsd_warms_up_holds_then_decays_linearly_to_min_lr():
    t = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, schedule="wsd",
                    decay_fraction=0.2)
    f = lr_multiplier(t)
    assert math.isclose(f(0), 0.1) and math.isclose(f(9), 1.0)
    assert f(10) == f(50) == f(90) == 1.0  # stable until 80% of the post-warm-up steps
    assert math.isclose(f(100), 0.55, rel_tol=1e-6)  # halfway down the decay
    assert math.isclose(f(110), 0.1) and math.isclose(f(500), 0.1)


def test_time_fraction_drives_the_schedule_past_warmup():
    t = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=10, max_steps=10 ** 9, schedule="wsd",
                    decay_fraction=0.5)
    f = lr_multiplier(t)
    assert math.isclose(f(3, 0.9), 0.4)  # warm-up still counts steps
    assert f(20, 0.25) == 1.0 and math.isclose(f(20, 0.75), 0.5) and f(20, 1.2) == 0.0
    cos = lr_multiplier(TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=10 ** 9))
    assert math.isclose(cos(5, 0.5), 0.5, rel_tol=1e-9)


def test_muon_lr_is_its_own_and_survives_a_state_round_trip():
    torch.manual_seed(0)
    a = CustomTransformerAdapter(TransformerConfig(block_size=16, n_layer=1, n_head=2,
                                                   d_model=16, d_ff=32, tie_embeddings=False))
    t = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=2e-2)
    opt = build_optimizer(a, t, torch.device("cpu"))
    muon, adam = opt.optimizers
    head = a.network.lm_head.weight
    assert all(p is not head for p in muon.param_groups[0]["params"])  # the head stays on AdamW
    assert any(p is head for g in adam.param_groups for p in g["params"])
    set_lr(opt, 0.5e-3)
    assert muon.param_groups[0]["lr"] == 1e-2
    assert {g["lr"] for g in adam.param_groups} == {0.5e-3}
    opt2 = build_optimizer(a, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=4e-2),
                           torch.device("cpu"))
    opt2.load_state_dict(opt.state_dict())  # the new config's ratio wins; groups stay live
    set_lr(opt2, 1e-3)
    assert opt2.optimizers[0].param_groups[0]["lr"] == 4e-2
    assert opt2.param_groups[0] is opt2.optimizers[0].param_groups[0]


def test_default_muon_uses_train_lr_for_every_group():
    opt = build_optimizer(adapter(), TrainConfig(optimizer="muon", lr=3e-3), torch.device("cpu"))
    set_lr(opt, 3e-3)
    assert {g["lr"] for g in opt.param_groups} == {3e-3}


def test_fp32_newton_schulz_muon_matches_torchs_bf16_muon():
    """muon_ns_dtype=float32: torch's update (up to bf16 rounding) without bf16 matmuls."""
    from lmlab.train.optim import Fp32Muon

    torch.manual_seed(0)
    a = adapter()
    x = torch.randint(0, 97, (2, 16))
    opts = {}
    for ns in ("bfloat16", "float32"):
        b = copy.deepcopy(a)
        opts[ns] = (b, build_optimizer(b, TrainConfig(optimizer="muon", lr=1e-2, muon_ns_dtype=ns),
                                       torch.device("cpu")))
    assert type(opts["float32"][1].optimizers[0]) is Fp32Muon
    assert type(opts["bfloat16"][1].optimizers[0]) is torch.optim.Muon
    for b, opt in opts.values():
        _step(b, opt, x)
    (b16, o16), (b32, o32) = opts["bfloat16"], opts["float32"]
    moved = 0
    for (n, p16), p32, p0 in zip(b16.network.named_parameters(), b32.network.parameters(),
                                 a.network.parameters(), strict=True):
        d16, d32 = p16 - p0, p32 - p0
        if p0.dim() == 2 and n not in ("wte.weight", "wpe.weight"):
            moved += 1
            assert (d32 - d16).norm() < 0.15 * d16.norm(), n  # NS amplifies bf16 rounding
    assert moved == 4
    o32.load_state_dict(o16.state_dict())  # the same state: a run can switch
