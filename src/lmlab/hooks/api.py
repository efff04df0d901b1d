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
from collections.abc import Iterator
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


def run_with_cache(adapter: torch.nn.Module, idx: torch.Tensor,
                   names: list[str] | str | None = None, detach: bool = True
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(logits, {point name: activation}) of one forward pass, for the points `names` globs select.

    With `names` None every point is cached, which hooks the attention scores
    and pattern too and so takes the explicit (non-fused) attention path; name
    the points you need to keep the fused kernel. Activations are detached
    unless `detach` is false (then gradients can flow from them).
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

    def recorder(name: str):
        def hook(module, inputs, output):
            cache[name] = output.detach() if detach else output

        return hook

    with PointHooks(points) as attached:
        for name in chosen:
            attached.add(name, recorder(name))
        logits = adapter(idx)
    return logits, cache
