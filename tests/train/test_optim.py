import math

import torch

from lmlab.config import TrainConfig
from lmlab.model.adapters.custom import CustomTransformerAdapter
from lmlab.model.transformer import TransformerConfig
from lmlab.train.optim import build_optimizer, lr_multiplier, param_groups


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


def test_every_optimizer_trains_and_round_trips_its_state():
    for name in ("adamw", "sgd", "lion", "muon"):
        torch.manual_seed(0)
        a = adapter()
        opt = build_optimizer(a, TrainConfig(optimizer=name, lr=1e-2), torch.device("cpu"))
        x = torch.randint(0, 97, (2, 16))
        losses = []
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(a(x).flatten(0, 1), x.flatten())
            losses.append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad()
        assert losses[-1] < losses[0], name
        state = opt.state_dict()
        opt2 = build_optimizer(a, TrainConfig(optimizer=name, lr=1e-2), torch.device("cpu"))
        opt2.load_state_dict(state)
