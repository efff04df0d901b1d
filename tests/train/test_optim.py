import copy
import math

import pytest
import torch

from lmlab.config import TrainConfig
from lmlab.model.adapters.custom import CustomTransformerAdapter
from lmlab.model.transformer import TransformerConfig
from lmlab.train.optim import build_optimizer, lr_multiplier, param_groups


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; two spin-wait badly on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def adapter() -> CustomTransformerAdapter:
    return CustomTransformerAdapter(TransformerConfig(block_size=16, n_layer=1, n_head=2,
                                                      d_model=16, d_ff=32, bias=True))


def test_no_weight_decay_on_norms_biases_embeddings():
    a = adapter()
    decay, no_decay = param_groups(a, 0.1)
    names = {id(p): n for n, p in a.network.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed == {"blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                       "blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight"}
    assert no_decay["weight_decay"] == 0.0
    assert "wte.weight" in {names[id(p)] for p in no_decay["params"]}
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == a.num_params()  # the tied head is counted once


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
