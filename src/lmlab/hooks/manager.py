"""ExperimentHooks: the config's `hooks` section, resolved against one model.

Everything is checked when it is built (hook names, parameters, point
patterns), before any training step runs. `attach()` registers PyTorch forward
hooks on the matched HookPoints and `detach()` removes exactly those handles, so
a model with its hooks removed computes bit-identical outputs again. The loop
calls `aux_losses()` after the forward pass and `transform_grads()` between
`backward()` and `optimizer.step()`; it knows nothing else about hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lmlab.config import HooksConfig
from lmlab.errors import LmlabError
from lmlab.hooks import registry
from lmlab.hooks.plugins import load_plugin
from lmlab.hooks.points import match_points


def _split_entry(kind: str, entry: dict, with_at: bool | None
                 ) -> tuple[str, str | None, float, dict]:
    """(name, at, weight, params) of a config entry; `with_at` None means 'at' is optional."""
    if not isinstance(entry, dict) or "name" not in entry:
        raise LmlabError(f"Each hooks.{kind} entry needs a 'name' (got {entry!r}).")
    params = dict(entry)
    name = params.pop("name")
    at = params.pop("at", None)
    weight = params.pop("weight", 1.0) if kind == "aux_losses" else 1.0
    if with_at is True and at is None:
        raise LmlabError(f"hooks.{kind} entry '{name}' needs 'at': a hook point name or glob.")
    if with_at is False and at is not None:
        raise LmlabError(f"hooks.{kind} entry '{name}' takes no 'at': it acts on parameters.")
    return name, at, float(weight), params


class ExperimentHooks:
    def __init__(self, cfg: HooksConfig, adapter: torch.nn.Module) -> None:
        self.cfg, self.adapter = cfg, adapter
        self.plugins = {path: load_plugin(path) for path in cfg.plugins}  # path -> sha256
        points = adapter.hook_points()
        names = list(points)
        # (point name, callable) for forward and backward hooks, in config order
        self.point_fns: list[tuple[str, Callable]] = []
        for kind in ("forward", "backward"):
            for entry in getattr(cfg, kind):
                name, at, _, params = _split_entry(kind, entry, with_at=True)
                spec = registry.get(kind, name)
                for point in match_points(at, names):
                    self.point_fns.append((point, spec.bind(params)))
        self.update_fns = []
        for entry in cfg.update:
            name, _, _, params = _split_entry("update", entry, with_at=False)
            self.update_fns.append(registry.get("update", name).bind(params))
        # (label, weight, callable, matched points)
        self.aux: list[tuple[str, float, Callable, list[str]]] = []
        for entry in cfg.aux_losses:
            name, at, weight, params = _split_entry("aux_losses", entry, with_at=None)
            matched = match_points(at, names) if at else []
            self.aux.append((name, weight, registry.get("aux_losses", name).bind(params), matched))
        self._acts: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    @property
    def empty(self) -> bool:
        return not (self.point_fns or self.update_fns or self.aux)

    def attach(self) -> ExperimentHooks:
        points = self.adapter.hook_points()
        for point, fn in self.point_fns:
            self._handles.append(points[point].register_forward_hook(_wrap(point, fn)))
        for point in sorted({p for *_, matched in self.aux for p in matched}):
            self._handles.append(points[point].register_forward_hook(self._recorder(point)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._acts.clear()

    def __enter__(self) -> ExperimentHooks:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def _recorder(self, point: str) -> Callable:
        def hook(module, inputs, output):
            self._acts[point] = output

        return hook

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Each aux loss of this forward pass, already multiplied by its weight."""
        out = {}
        for label, weight, fn, matched in self.aux:
            acts = {p: self._acts[p] for p in matched}
            out[label] = weight * fn(acts, self.adapter)
        self._acts.clear()
        return out

    def transform_grads(self, step: int, lr: float) -> None:
        if not self.update_fns:
            return
        named = [(n, p) for n, p in self.adapter.network.named_parameters() if p.grad is not None]
        for fn in self.update_fns:
            fn(named, step=step, lr=lr)

    def describe(self) -> list[dict[str, Any]]:
        """Every hook in force with its parameters and where it came from, for the manifest."""
        out = []
        for kind in registry.KINDS:
            for entry in getattr(self.cfg, kind):
                spec = registry.get(kind, entry["name"])
                out.append({"kind": kind, **entry, "source": spec.source})
        return out


def _wrap(point: str, fn: Callable) -> Callable:
    def hook(module, inputs, output):
        return fn(output, point)

    return hook
