"""The notebook API: the config's hooks, from Python, on any adapter.

    from lmlab.hooks.api import hooked, run_with_cache

    with hooked(adapter, forward=[{"name": "scale", "at": "blocks.0.hook_attn_out",
                                   "factor": 0.0}]):
        ablated = adapter(idx)          # the hooks are removed again on exit

    logits, cache = run_with_cache(adapter, idx, names=["blocks.*.hook_resid_post"])

Both go through the same registry and checks as a config file, so a notebook
experiment moves to a training run by copying its dicts into YAML.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lmlab.config import HooksConfig, from_dict
from lmlab.hooks.manager import ExperimentHooks
from lmlab.model.points import PointHooks, match_points


def hooks_config(spec: HooksConfig | dict[str, Any] | None = None, **kinds: Any) -> HooksConfig:
    """A validated HooksConfig from a HooksConfig, a `hooks:` dict, and/or keyword sections."""
    if isinstance(spec, HooksConfig):
        spec = {k: getattr(spec, k) for k in ("forward", "backward", "update", "aux_losses",
                                              "plugins")}
    raw = {**(spec or {}), **kinds}
    return from_dict({"hooks": raw}).hooks


@contextmanager
def hooked(adapter: torch.nn.Module, spec: HooksConfig | dict[str, Any] | None = None, *,
           run_dir: str | Path | None = None, **kinds: Any) -> Iterator[ExperimentHooks]:
    """Attach hooks for the `with` block; on exit remove exactly these, whatever else is on.

    Inside, call `h.aux_losses()` after a forward pass and `h.transform_grads(step, lr)`
    before `optimizer.step()` if the spec has aux losses or update hooks.
    """
    h = ExperimentHooks(hooks_config(spec, **kinds), adapter)
    h.attach(run_dir)
    try:
        yield h
    finally:
        h.detach()


class _Tap(torch.autograd.Function):
    """Identity whose backward stores the gradient arriving at it under `name`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, store: dict, name: str) -> torch.Tensor:
        ctx.store, ctx.name = store, name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.store[ctx.name] = grad.detach()
        return grad, None, None


def next_token_loss(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The training loss: cross-entropy of each position's prediction of the next token."""
    logits = logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                             idx[:, 1:].reshape(-1))


def run_with_cache(adapter: torch.nn.Module, idx: torch.Tensor,
                   names: list[str] | str | None = None, detach: bool = True,
                   incl_bwd: bool = False,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(logits, {point name: activation}) of one forward pass, for the points `names` globs select.

    With `names` None every point is cached, which hooks the attention scores
    and pattern too and so takes the explicit (non-fused) attention path; name
    the points you need to keep the fused kernel. Activations are detached
    unless `detach` is false (then gradients can flow from them).

    `incl_bwd` (TransformerLens's name and meaning): also run backward from
    `loss_fn(logits, idx)` (default: the next-token loss) and cache each
    point's gradient under `<name>_grad`; parameters get their `.grad` as after
    any backward. The gradient is the one reaching the activation the point
    computed, under every hook and learning rule in force (DFA's feedback at a
    block output, say). A norm's points (`ln*.hook_scale`, `hook_normalized`)
    get theirs too: tapped, the norm's output is rebuilt from them, the same
    values to float rounding, so they lie on the gradient's path.
    """
    points = adapter.hook_points()
    patterns = [names] if isinstance(names, str) else names
    if patterns is None:
        chosen = list(points)
    else:
        chosen = [n for n in points if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        for p in patterns:
            match_points(p, list(points))  # an error listing the real points if p matches none
    cache: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}

    def recorder(name: str):
        def hook(module, inputs, output):
            cache[name] = output.detach() if detach else output

        return hook

    def tap(name: str):
        def hook(module, inputs, output):
            if torch.is_grad_enabled() and output.requires_grad:
                return _Tap.apply(output, grads, name + "_grad")
            return None

        return hook

    with PointHooks(points) as attached:
        for name in chosen:
            if incl_bwd:  # first, so a rule's hook at the point acts on the tapped value
                attached.add(name, tap(name), prepend=True)
            attached.add(name, recorder(name))
        if incl_bwd:
            with torch.enable_grad():
                logits = adapter(idx)
                (loss_fn or next_token_loss)(logits, idx).backward()
        else:
            logits = adapter(idx)
    cache.update({k: grads[k] for k in (n + "_grad" for n in chosen) if k in grads})
    return logits, cache
