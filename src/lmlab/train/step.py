"""One training step: forward -> loss (+ aux losses) -> backward -> clip -> update hooks -> update.

A non-finite loss or gradient norm is a value in the result, not an exception:
the step leaves the weights untouched and says why; the loop's policy
(`train.on_nonfinite`) decides whether to stop or to skip (`nonfinite_policy`).
Update hooks receive the run's learning rate, given here explicitly, never an
optimizer group's (under Muon the first group is Muon's, at its own lr).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmlab.device import autocast
from lmlab.errors import LmlabError
from lmlab.eval.metrics import cross_entropy
from lmlab.train import faults
from lmlab.train.telemetry import NO_PROBE, NoProbe, Probe

if TYPE_CHECKING:
    from lmlab.train.state import RunState

Batch = tuple[torch.Tensor, torch.Tensor]


class NonFiniteLoss(LmlabError):
    pass


@dataclass
class StepResult:
    loss: float  # mean over micro-batches; NaN when the update was skipped
    aux: dict[str, float] = field(default_factory=dict)  # each aux loss, weighted, mean
    grad_norm: float | None = None  # after clipping and update hooks (what the update used)
    nonfinite: tuple[str, Any] | None = None  # (what, its value): why the update was skipped
    seconds: float = 0.0  # wall time of the step

    @property
    def skipped(self) -> bool:
        return self.nonfinite is not None


def micro_batches(state: RunState) -> Iterable[Batch]:
    """The step's micro-batches, drawn lazily: a step stopped early draws no more."""
    return (state.batcher.next() for _ in range(state.cfg.train.grad_accum))


def train_step(state: RunState, batches: Iterable[Batch], lr: float,
               probe: Probe | NoProbe = NO_PROBE) -> StepResult:
    """Accumulate gradients over `batches`, then update, unless something is non-finite."""
    s, n = state, state.cfg.train.grad_accum
    total_loss, aux_totals = 0.0, {}
    last = n - 1
    for micro, (x, y) in enumerate(batches):
        with s.dist.no_sync(s.model, last=micro == last):
            with autocast(s.device, s.dtype):
                out = s.model(x, targets=y) if s.fused_loss else s.model(x)
            loss = out if s.fused_loss else cross_entropy(out, y)
            aux = s.hooks.aux_losses()
            total = loss + sum(aux.values()) if aux else loss
            value = loss.item()
            checked = value if total is loss else total.item()
            bad = not math.isfinite(checked)
            if s.dist.any_rank(bad):
                what = "loss" if total is loss else "loss with aux losses"
                return _skip(s, what, checked if bad else "non-finite on another rank")
            (total / n).backward()
        total_loss += value / n
        for name, v in aux.items():
            aux_totals[name] = aux_totals.get(name, 0.0) + v.item() / n
    probe.before_update(x)
    norm = _clipped_norm(s, lr)
    if s.dist.any_rank(not bool(torch.isfinite(norm))):
        return _skip(s, "gradient norm", norm.item())
    s.optimizer.step()
    probe.after_update()
    s.optimizer.zero_grad(set_to_none=True)
    return StepResult(total_loss, aux_totals, norm.item())


def _clipped_norm(s: RunState, lr: float) -> torch.Tensor:
    """Clip (the norm comes free with it); after update hooks, the norm of what they left."""
    t = s.cfg.train
    if t.grad_clip:
        norm = torch.nn.utils.clip_grad_norm_(s.adapter.parameters(), t.grad_clip)
    else:
        norm = grad_norm(s.adapter)
    if s.hooks.update_fns:  # they may change the gradient: check what the update uses
        s.hooks.transform_grads(s.step, lr)
        norm = grad_norm(s.adapter)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _skip(s: RunState, what: str, value: Any) -> StepResult:
    s.optimizer.zero_grad(set_to_none=True)
    return StepResult(math.nan, nonfinite=(what, value))


def grad_norm(adapter: torch.nn.Module) -> torch.Tensor:
    grads = [p.grad for p in adapter.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def nonfinite_policy(state: RunState, result: StepResult) -> None:
    """Count a skipped update (train.on_nonfinite=skip), or stop with the reason and the way out."""
    if not result.skipped:
        state.skips_in_row = 0
        return
    t, step = state.cfg.train, state.step + 1
    what, value = result.nonfinite
    advice = ("Lower train.lr, " + ("" if t.grad_clip else "enable train.grad_clip, ") +
              "check the hooks in force" + (", or set train.on_nonfinite=skip to skip "
                                            "such updates." if t.on_nonfinite == "stop" else "."))
    if t.on_nonfinite == "stop":
        raise NonFiniteLoss(f"The {what} became {value} at step {step}; stopping before the "
                            f"update so no weights are damaged. {_last_good(state)} " + advice)
    state.skipped, state.skips_in_row = state.skipped + 1, state.skips_in_row + 1
    state.metrics.write(kind="skipped", step=step, reason=f"{what} {value}")
    if state.skips_in_row >= t.max_nonfinite_skips:
        raise NonFiniteLoss(
            f"{state.skips_in_row} updates in a row were skipped for a non-finite loss or "
            f"gradient (the last: {what} {value} at step {step}); stopping, as "
            f"train.max_nonfinite_skips={t.max_nonfinite_skips} says. {_last_good(state)} "
            + advice)


def _last_good(state: RunState) -> str:
    return faults.last_good(Path(state.run_dir) / "checkpoints")
