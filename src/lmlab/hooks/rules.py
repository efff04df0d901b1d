"""Learning rules: backprop's credit assignment replaced, one backward hook per rule.

Convention (Lillicrap et al. 2016): for a linear layer `y = x W^T + b` a rule
sends `g @ B` to the layer's input, where `g` is the gradient at its output and
`B` has W's shape; backprop is `B = W`. The weight's own gradient stays the
true local one, `g^T x`. Which linears: every `nn.Linear` under the matched
points, where "under" is the module tree: a point of a block's MLP
(`blocks.3.mlp.hook_pre`) selects that MLP's linears, one of its attention
(`blocks.3.attn.hook_q`) the attention's q/k/v/o, a point of the block itself
(`blocks.3.hook_resid_pre`) every linear of the block. So `at: "blocks.*"`
means every linear of every block and `at: "blocks.*.mlp.*"` the MLPs alone.
Norm points (`blocks.3.ln1.*`) hold no linear; an entry whose points hold none
at all is an error.

* `feedback_alignment` (Lillicrap et al. 2016): B fixed, ~ N(0, std^2), drawn
  from `seed` and the layer's name.
* `sign_symmetry` (Liao, Leibo & Poggio 2016; BioTorch's modes): B follows
  sign(W) at every step. `usf`: B = sign(W) * sqrt(2 / (fan_in + fan_out))
  (BioTorch's scale, Xavier's std). `frsf`: B = |M| * sign(W) with M fixed;
  `brsf`: the same with M drawn anew after every optimizer step ("batchwise").
  M ~ N(0, s^2) with that same Xavier s.
* `kolen_pollack` (Kolen & Pollack 1994; Akrout et al. 2019): B is learned. It
  gets W's update and W's weight decay, so B - W shrinks by (1 - lr * wd) at
  each step: with decoupled decay (AdamW, Lion, Muon), or none, this is exact
  for any update rule, so B = W + D with D, the learned state, decayed after
  each optimizer step. An optimizer whose decay enters its moments (SGD with
  momentum, Adam with L2 decay) is refused: B would need moments of its own.
* `dfa` (Nokland 2016; Launay et al. 2020): the error e = dL/dlogits goes
  through a fixed random B_u [vocab, d_model] straight to each unit's output,
  where a unit is a block (`granularity: block`, the output hook_resid_post)
  or one residual sublayer step (`sublayer`: hook_resid_mid and
  hook_resid_post). No gradient passes from a unit to the one below it;
  inside a unit it is ordinary backprop, and the embedding learns from what
  flows into the bottom unit's input. The readout (final norm, head) learns
  by its true gradient.
* `shallow`: the control. The matched blocks' outputs pass no gradient, so
  with `at: "blocks.*"` only the readout (final norm and head; with tied
  embeddings the table, as the head) learns.

Rules whose B changes with training (sign_symmetry's brsf, kolen_pollack)
follow the optimizer through torch's global optimizer-step hooks, so the loop
needs no call of its own; their state is saved in checkpoints like any hook's.
Every attached rule is listed by `active()`, for the alignment telemetry, and
`bypass()` turns them all off for a backprop reference pass.
"""

from __future__ import annotations

import contextlib
import math
import re
import weakref
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.hooks.registry import register

_ACTIVE: weakref.WeakSet = weakref.WeakSet()
_BYPASS = [False]


def active(adapter: Any = None) -> list[Rule]:
    """The rules attached now (to `adapter`, if given): the telemetry measures their alignment."""
    return [r for r in _ACTIVE if r.attached and (adapter is None or r.adapter() is adapter)]


@contextlib.contextmanager
def bypass() -> Iterator[None]:
    """Within the block every rule stands aside: forward and backward are plain backprop."""
    _BYPASS[0] = True
    try:
        yield
    finally:
        _BYPASS[0] = False


def _seeded(seed: int, key: str, step: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()) + step)


def _layer(point: str) -> int:
    return int(re.match(r"blocks\.(\d+)\.", point).group(1))


def block_modules(adapter: Any, rule: str) -> list[nn.Module]:
    """The model's blocks in order: `blocks` (from scratch) or `model.layers` (Hugging Face)."""
    net = adapter.network
    for path in ("blocks", "model.layers", "layers"):
        try:
            blocks = net.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return list(blocks)
    raise LmlabError(f"{rule} cannot find the blocks of {type(net).__name__} (looked for "
                     "'blocks' and 'model.layers'); it works on the from-scratch model and on "
                     "imported Llama-style models.")


_SCOPES = {"attn": ("attn", "self_attn"), "mlp": ("mlp",)}


def scope_of(adapter: Any, point: str, rule: str) -> tuple[str, nn.Module] | None:
    """(key prefix, module) whose linears a point selects; None for a norm's points."""
    layer = _layer(point)
    block = block_modules(adapter, rule)[layer]
    part = point.split(".")[2]
    if part.startswith("hook_"):
        return f"blocks.{layer}.", block
    for name in _SCOPES.get(part, ()):
        if hasattr(block, name):
            return f"blocks.{layer}.{name}.", getattr(block, name)
    return None


class Rule:
    """What every learning rule shares: attach per point, listing in `active()`, close."""

    name = ""

    def __init__(self) -> None:
        self.attached = False
        self._points: list[str] = []

    def attach(self, adapter: Any, point: str, run_dir: Path | None) -> list:
        self.attached, self.adapter = True, weakref.ref(adapter)
        _ACTIVE.add(self)
        self._points.append(point)
        return self._attach(adapter, point)

    def _attach(self, adapter: Any, point: str) -> list:
        raise NotImplementedError

    def close(self) -> None:
        self.attached = False
        self._points.clear()

    def feedback_pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (B, W)} of the rules with a feedback matrix per linear, for B-W angles."""
        return {}


class _StepHooks:
    """Calls `rule.before_step(opt)` / `after_step(opt)` around every optimizer step (torch's
    global hooks; a Combined optimizer is skipped, its parts are stepped and seen)."""

    def __init__(self, rule: Any) -> None:
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        ref = weakref.ref(rule)

        def pre(opt, args, kwargs):
            if ref() is not None and not hasattr(opt, "optimizers"):  # Combined delegates
                ref().before_step(opt)

        def post(opt, args, kwargs):
            if ref() is not None and not hasattr(opt, "optimizers"):
                ref().after_step(opt)

        self.handles = [register_optimizer_step_pre_hook(pre),
                        register_optimizer_step_post_hook(post)]


# --- rules on linear layers ---------------------------------------------------------------


class _FeedbackLinear(torch.autograd.Function):
    """y = x W^T + b forward (given, already computed); backward sends g @ B to x.

    The weight and bias gradients are the true ones; only the input's differs.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                feedback: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, feedback)
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, feedback = ctx.saved_tensors
        gx = g @ feedback.to(g.device, g.dtype) if ctx.needs_input_grad[0] else None
        g2 = g.reshape(-1, g.shape[-1])
        gw = (g2.t() @ x.reshape(-1, x.shape[-1]).to(g.dtype)).to(ctx.weight_dtype) \
            if ctx.needs_input_grad[1] else None
        gb = g2.sum(0).to(ctx.weight_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None


def feedback_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    feedback: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) whose backward sends `g @ feedback` to x (true weight grads).

    Pass `y` when the linear's output is already computed, to reuse it.
    """
    if y is None:
        with torch.no_grad():
            y = torch.nn.functional.linear(x, weight, bias)
    return _FeedbackLinear.apply(x, weight, bias, feedback, y.detach())


class LinearRule(Rule):
    """A rule that replaces W by a feedback matrix B in each selected linear's backward."""

    def __init__(self) -> None:
        super().__init__()
        self.linears: dict[str, nn.Linear] = {}

    def _attach(self, adapter: Any, point: str) -> list:
        scope = scope_of(adapter, point, self.name)
        if scope is None:
            return []
        prefix, module = scope
        handles = []
        for name, linear in module.named_modules():
            key = prefix + name
            if isinstance(linear, nn.Linear) and key not in self.linears:
                self.linears[key] = linear
                self.init_feedback(key, linear.weight)
                handles.append(linear.register_forward_hook(self._hook(key)))
        return handles

    def check_attached(self) -> None:
        """After every point is attached: an entry whose points hold no linear is refused."""
        if not self.linears:
            raise LmlabError(f"{self.name} found no linear layer under its points "
                             f"({', '.join(self._points[:3])}...); give 'at' the points of "
                             "blocks, e.g. 'blocks.*' or 'blocks.*.mlp.*'.")

    def _hook(self, key: str):
        def hook(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not torch.is_grad_enabled() or _BYPASS[0]:
                return None
            with torch.no_grad():
                b = self.feedback(key, module.weight)
            return feedback_linear(inputs[0], module.weight, module.bias, b, output)

        return hook

    def init_feedback(self, key: str, weight: torch.Tensor) -> None:
        pass

    def feedback(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def feedback_pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        with torch.no_grad():
            return {k: (self.feedback(k, lin.weight), lin.weight.detach())
                    for k, lin in self.linears.items()}

    def close(self) -> None:
        super().close()
        self.linears.clear()


@register("backward", points="blocks.*")
class feedback_alignment(LinearRule):
    """Feedback alignment on every linear under the points: a fixed random B replaces W.

    Each linear gets its own B ~ N(0, std^2), drawn from `seed` and the layer's
    name only, so a resumed run gets the same matrices. The default std 0.02 is
    the usual init scale of these weights (GPT-2, Llama, Qwen), so B starts as
    large as the W it stands in for, as in Lillicrap et al.
    """

    name = "feedback_alignment"

    def __init__(self, *, seed: int = 0, std: float = 0.02) -> None:
        super().__init__()
        self.seed, self.std = seed, std
        self.matrices: dict[str, torch.Tensor] = {}

    def init_feedback(self, key: str, weight: torch.Tensor) -> None:
        b = torch.randn(weight.shape, generator=_seeded(self.seed, key)) * self.std
        self.matrices[key] = b.to(weight.device, weight.dtype)

    def feedback(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        return self.matrices[key]


def xavier_std(weight: torch.Tensor) -> float:
    """sqrt(2 / (fan_in + fan_out)): uSF's scale in BioTorch, and the std of its M."""
    return math.sqrt(2.0 / (weight.shape[0] + weight.shape[1]))


SIGN_MODES = ("usf", "frsf", "brsf")


@register("backward", points="blocks.*")
class sign_symmetry(LinearRule):
    """Sign-symmetry: B takes sign(W) at every step; mode usf | frsf | brsf (BioTorch's).

    usf: sign(W) * sqrt(2/(fan_in+fan_out)); frsf: |M| * sign(W), M fixed;
    brsf: |M| * sign(W), M drawn anew after each optimizer step. M ~ N(0, s^2)
    with that same s, from `seed`, the layer's name and (brsf) the step count.
    """

    name = "sign_symmetry"

    def __init__(self, *, mode: str = "usf", seed: int = 0) -> None:
        super().__init__()
        if mode not in SIGN_MODES:
            from lmlab.errors import did_you_mean

            raise LmlabError(f"sign_symmetry has no mode '{mode}'; modes: "
                             f"{', '.join(SIGN_MODES)}." + did_you_mean(mode, list(SIGN_MODES)))
        self.mode, self.seed = mode, seed
        self.steps = 0  # optimizer steps taken: brsf's M is a function of it
        self._magnitude: dict[str, tuple[int, torch.Tensor]] = {}
        self._step_hooks: list = []

    def _attach(self, adapter: Any, point: str) -> list:
        handles = super()._attach(adapter, point)
        if self.mode == "brsf" and not self._step_hooks:
            self._step_hooks = _StepHooks(self).handles
            handles += self._step_hooks
        return handles

    def close(self) -> None:
        super().close()
        self._step_hooks = []
        self._magnitude.clear()

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        if _owns(optimizer, self.linears):
            self.steps += 1

    def magnitude(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """|M| of this layer now (frsf: always the same draw; brsf: this step's draw)."""
        step = self.steps if self.mode == "brsf" else 0
        cached = self._magnitude.get(key)
        if cached is None or cached[0] != step:
            m = torch.randn(weight.shape, generator=_seeded(self.seed, key, step)).abs()
            cached = self._magnitude[key] = (step, (m * xavier_std(weight)).to(weight.device,
                                                                               weight.dtype))
        return cached[1]

    def feedback(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        if self.mode == "usf":
            return torch.sign(weight) * xavier_std(weight)
        return self.magnitude(key, weight) * torch.sign(weight)

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps = int(state["steps"])


def _owns(optimizer: torch.optim.Optimizer, linears: dict[str, nn.Linear]) -> bool:
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return any(id(lin.weight) in ids for lin in linears.values())


# optimizers whose weight decay is decoupled (p *= 1 - lr * wd, apart from the update)
DECOUPLED = ("AdamW", "Lion", "Muon", "Fp32Muon")


@register("backward", points="blocks.*")
class kolen_pollack(LinearRule):
    """Kolen-Pollack: B learned with W's own update and weight decay, so B -> W.

    B starts as feedback alignment's N(0, std^2) draw. The state is D = B - W,
    which every optimizer step multiplies by (1 - lr * weight_decay) of W's
    group: the same update on both cancels in the difference. Saved in
    checkpoints, so a resumed run goes on with the very same B.
    """

    name = "kolen_pollack"

    def __init__(self, *, seed: int = 0, std: float = 0.02) -> None:
        super().__init__()
        self.seed, self.std = seed, std
        self.offset: dict[str, torch.Tensor] = {}  # D = B - W per linear
        self._loaded: dict[str, torch.Tensor] = {}
        self._step_hooks: list = []
        self._checked: set[int] = set()

    def _attach(self, adapter: Any, point: str) -> list:
        handles = super()._attach(adapter, point)
        if not self._step_hooks:
            self._step_hooks = _StepHooks(self).handles
            handles += self._step_hooks
        return handles

    def close(self) -> None:
        self._step_hooks = []
        super().close()

    def init_feedback(self, key: str, weight: torch.Tensor) -> None:
        if key in self.offset:  # attached again (a notebook): B goes on from where it was
            return
        if key in self._loaded:
            self.offset[key] = self._loaded[key].to(weight.device, weight.dtype)
            return
        b = torch.randn(weight.shape, generator=_seeded(self.seed, key)) * self.std
        self.offset[key] = b.to(weight.device, weight.dtype) - weight.detach()

    def feedback(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.offset[key]

    def _groups(self, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
        """{layer: the param group of its weight} for this optimizer's groups."""
        where = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        return {k: where[id(lin.weight)] for k, lin in self.linears.items()
                if id(lin.weight) in where}

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        if id(optimizer) in self._checked:
            return
        for key, group in self._groups(optimizer).items():
            check_mirrorable(optimizer, group, key)
        self._checked.add(id(optimizer))

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            for key, group in self._groups(optimizer).items():
                if self.linears[key].weight.grad is None:  # no update: nothing to mirror
                    continue
                decay = group["lr"] * group.get("weight_decay", 0.0)
                if decay:
                    self.offset[key].mul_(1 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: d.detach().cpu().clone() for k, d in self.offset.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._loaded = dict(state)
        self.offset.clear()
        for key, lin in self.linears.items():  # already attached: take the saved B now
            self.init_feedback(key, lin.weight)


def check_mirrorable(optimizer: torch.optim.Optimizer, group: dict, key: str) -> None:
    """Refuse an optimizer whose update of B could not be W's: decay inside its moments."""
    name = type(optimizer).__name__
    wd = group.get("weight_decay", 0.0)
    if not wd or name in DECOUPLED or (name == "SGD" and not group.get("momentum")):
        return
    raise LmlabError(f"kolen_pollack cannot mirror {name} with weight_decay={wd} on {key}: its "
                     "decay enters the moments, so B would need moments of its own. Use "
                     "train.optimizer adamw, lion or muon, or train.weight_decay 0.")


# --- direct feedback alignment and the shallow control -------------------------------------


class _Hub(torch.autograd.Function):
    """Identity on the logits; backward hands e = dL/dlogits to the logits and e @ B_u to
    every unit output `outs[u]` (the units' own backward passes start there)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, rule: dfa, units: list[str],
                *outs: torch.Tensor) -> torch.Tensor:
        ctx.rule, ctx.units = rule, units
        ctx.shapes = [(o.shape[-1], o.dtype) for o in outs]
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, e: torch.Tensor):
        rule = ctx.rule
        e2 = e.reshape(-1, e.shape[-1]).float()
        grads = []
        for unit, (width, dtype) in zip(ctx.units, ctx.shapes, strict=True):
            b = rule.matrix(unit, e.shape[-1], width, e.device)
            grads.append((e2 @ b).reshape(*e.shape[:-1], width).to(dtype))
        return (e, None, None, *grads)


GRANULARITIES = ("block", "sublayer")


@register("backward", points="blocks.*")
class dfa(Rule):
    """Direct feedback alignment: e = dL/dlogits through a fixed random B_u to each unit's output.

    granularity block: a unit is a block (Launay's macro); sublayer: each
    residual step, attention and MLP (micro). B_u ~ N(0, std^2) [vocab, d_model]
    from `seed` and the unit's point name. No gradient passes between units.
    """

    name = "dfa"
    feeds_back = True  # False: the shallow control, whose cuts send nothing back

    def __init__(self, *, granularity: str = "block", seed: int = 0, std: float = 0.02) -> None:
        super().__init__()
        if granularity not in GRANULARITIES:
            from lmlab.errors import did_you_mean

            raise LmlabError(f"dfa has no granularity '{granularity}'; granularities: "
                             f"{', '.join(GRANULARITIES)}."
                             + did_you_mean(granularity, list(GRANULARITIES)))
        self.granularity, self.seed, self.std = granularity, seed, std
        self.units: list[str] = []  # the output point of each unit, bottom to top
        self._outs: list[tuple[str, torch.Tensor]] = []
        self._matrices: dict[str, torch.Tensor] = {}
        self._logits_hooked = False

    def unit_points(self, layer: int) -> list[str]:
        last = [f"blocks.{layer}.hook_resid_post"]
        return ([f"blocks.{layer}.hook_resid_mid"] if self.granularity == "sublayer" else []) + last

    def _attach(self, adapter: Any, point: str) -> list:
        points = adapter.hook_points()
        handles = []
        block_modules(adapter, self.name)
        for name in self.unit_points(_layer(point)):
            if name in self.units:
                continue
            if name not in points:
                raise LmlabError(f"{self.name} needs the point {name} (a unit's output), which "
                                 "this model does not have.")
            self.units.append(name)
            handles.append(points[name].register_forward_hook(self._cut(name)))
        if not self._logits_hooked and self.feeds_back:
            if "hook_logits" not in points:
                raise LmlabError(f"{self.name} needs the point hook_logits (the error e).")
            handles.append(points["hook_logits"].register_forward_hook(self._hub))
            self._logits_hooked = True
        return handles

    def close(self) -> None:
        super().close()
        self.units.clear()
        self._outs.clear()
        self._logits_hooked = False

    def _cut(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
            if not torch.is_grad_enabled() or _BYPASS[0] or not output.requires_grad:
                return None
            if self.feeds_back:
                self._outs.append((name, output))
            return output.detach()

        return hook

    def _hub(self, module: nn.Module, inputs: Any, logits: torch.Tensor) -> torch.Tensor | None:
        outs, self._outs = self._outs, []
        if not outs or _BYPASS[0] or not logits.requires_grad:
            return None
        return _Hub.apply(logits, self, [n for n, _ in outs], *(o for _, o in outs))

    def matrix(self, unit: str, vocab: int, width: int, device: torch.device) -> torch.Tensor:
        """B_u [vocab, width] of a unit (float32), drawn from the seed and the unit's name."""
        b = self._matrices.get(unit)
        if b is None or b.shape != (vocab, width):
            b = self._matrices[unit] = (torch.randn(vocab, width, generator=_seeded(
                self.seed, unit)) * self.std).to(device)
        return b


@register("backward", points="blocks.*")
class shallow(dfa):
    """The shallow control: the matched blocks' outputs pass no gradient back.

    With `at: "blocks.*"` no block learns; only the readout does (final norm
    and head, and with a tied head the embedding table, as the head). The
    baseline every rule must beat: what training the last layer alone gives.
    """

    name = "shallow"
    feeds_back = False

    def __init__(self) -> None:
        super().__init__(granularity="block")

    def _attach(self, adapter: Any, point: str) -> list:
        import torch.distributed as torch_dist

        if torch_dist.is_available() and torch_dist.is_initialized():
            raise LmlabError("shallow leaves the blocks without gradient, which DDP refuses "
                             "(it waits for every parameter's); run the control in one "
                             "process, without torchrun.")
        return super()._attach(adapter, point)
