"""Optimizers by name, and the learning-rate schedule.

Weight decay applies to matrices only: norms, biases and embeddings are left
alone (the adapter's `decay_mask` decides). Optimizers are chosen by name from
config so an experiment can swap the update rule without touching the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from lmlab.config import TrainConfig
from lmlab.device import fast_bf16
from lmlab.errors import LmlabError


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al., 2023): the sign of an interpolated momentum, with decoupled decay."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = m.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


class Fp32Muon(torch.optim.Muon):
    """torch's Muon with its Newton-Schulz iteration in float32 instead of bfloat16.

    torch casts the update to bf16 for the iteration, which CPUs without
    AVX512-BF16/AMX emulate about 100x slower than fp32: there the iteration
    would cost more than the forward and backward passes. The maths is torch's.
    """

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            a, b, c = group["ns_coefficients"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                x = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                x = x.float().T if x.size(0) > x.size(1) else x.float()
                x = x / x.norm().clamp(min=group["eps"])
                for _ in range(group["ns_steps"]):
                    gram = x @ x.T
                    x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
                x = x.T if p.size(0) > p.size(1) else x
                scale = 0.2 * math.sqrt(max(p.shape[0], p.shape[1]))  # match_rms_adamw
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(x.to(p.dtype), alpha=-group["lr"] * scale)
        return loss


class Combined(torch.optim.Optimizer):
    """Several optimizers stepped as one (Muon for matrices, AdamW for the rest)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        self.defaults = {}
        self.state = {}

    @property
    def param_groups(self) -> list[dict]:
        # read through: load_state_dict gives each optimizer new group dicts
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self, closure: Callable | None = None):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        ratios = [g.get("lr_ratio", 1.0) for g in self.param_groups]  # this config's, not saved
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)
        for g, r in zip(self.param_groups, ratios, strict=True):
            g["lr_ratio"] = r


def param_groups(adapter: nn.Module, t: TrainConfig) -> list[dict]:
    """Decayed matrices, then the rest; with `train.embed_lr`, the embedding tables apart.

    Embedding rows are updated only for the tokens a batch holds, so they can
    take a far higher lr than the matrices (modded-nanogpt's embeddings run at
    ~100x its head's); the group's `lr_ratio` keeps that ratio through the schedule.
    """
    tables = {id(m.weight) for m in adapter.network.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, embed, seen = [], [], [], set()
    for name, p in adapter.network.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        if t.embed_lr is not None and id(p) in tables:
            embed.append(p)
        else:
            (decay if adapter.decay_mask(name, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if embed:
        groups.append({"params": embed, "weight_decay": 0.0, "lr_ratio": t.embed_lr / t.lr})
    return groups


def build_optimizer(adapter: nn.Module, t: TrainConfig, device: torch.device
                    ) -> torch.optim.Optimizer:
    groups = param_groups(adapter, t)
    betas = (t.beta1, t.beta2)
    if t.optimizer == "adamw":
        # the fused kernel exists on CPU and CUDA and is the fastest path on both
        return torch.optim.AdamW(groups, lr=t.lr, betas=betas, fused=device.type in ("cpu", "cuda"))
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)
    if t.optimizer == "lion":
        return Lion(groups, lr=t.lr, betas=betas)
    if t.optimizer == "muon":
        # Muon orthogonalises hidden 2-D updates; embeddings and the head stay on AdamW
        head = {id(p) for n, p in adapter.network.named_parameters() if "lm_head" in n}
        matrices = [p for p in groups[0]["params"] if p.dim() == 2 and id(p) not in head]
        rest = [p for p in groups[0]["params"] if p.dim() != 2 or id(p) in head]
        adam = torch.optim.AdamW([{"params": rest, "weight_decay": t.weight_decay},
                                  *groups[1:]], lr=t.lr, betas=betas)
        muon_lr = t.muon_lr or t.lr
        fp32 = t.muon_ns_dtype == "float32" or (t.muon_ns_dtype == "auto"
                                                 and not fast_bf16(device))
        muon = (Fp32Muon if fp32 else torch.optim.Muon)(
            matrices, lr=muon_lr, weight_decay=t.weight_decay, momentum=t.momentum,
            adjust_lr_fn="match_rms_adamw")
        muon.param_groups[0]["lr_ratio"] = muon_lr / t.lr
        return Combined([muon, adam])
    raise LmlabError(f"Unknown optimizer '{t.optimizer}'. Choices: adamw, sgd, lion, muon.")


def lr_multiplier(t: TrainConfig) -> Callable[..., float]:
    """Linear warmup, then cosine, linear or warmup-stable-decay to min_lr (a multiplier of lr).

    Progress is the fraction of steps done after warm-up, or, under a time
    budget, the `fraction` of the budget used, so the decay ends when time does.
    WSD holds the peak lr and decays linearly over the last `decay_fraction`.
    The decay's shape is chosen once, here.
    """
    decay = DECAYS[t.schedule](t.min_lr / t.lr, t.decay_fraction)

    def fn(step: int, fraction: float | None = None) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if fraction is None:
            progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        else:
            progress = min(1.0, max(0.0, fraction))
        return decay(progress)

    return fn


def _constant(floor: float, decay_fraction: float) -> Callable[[float], float]:
    return lambda progress: 1.0


def _linear(floor: float, decay_fraction: float) -> Callable[[float], float]:
    return lambda progress: floor + (1 - floor) * (1 - progress)


def _cosine(floor: float, decay_fraction: float) -> Callable[[float], float]:
    return lambda progress: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _wsd(floor: float, decay_fraction: float) -> Callable[[float], float]:
    stable = 1.0 - decay_fraction

    def decay(progress: float) -> float:
        if progress <= stable:
            return 1.0
        return floor + (1 - floor) * (1 - (progress - stable) / decay_fraction)

    return decay


DECAYS = {"constant": _constant, "linear": _linear, "cosine": _cosine, "wsd": _wsd}


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule is a pure function of the step, so resuming needs no scheduler state.

    A group with an `lr_ratio` (Muon's, when train.muon_lr is set) gets lr x that ratio.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
