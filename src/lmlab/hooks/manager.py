"""ExperimentHooks: the config's `hooks` section, resolved against one model.

Everything is checked when it is built (hook names, parameters and their
types, point patterns, where a hook may act), before any training step runs.
`attach()` registers PyTorch forward hooks on the matched HookPoints (or lets a
hook object attach itself, see the registry) and `detach()` removes exactly
those handles, so a model with its hooks removed computes bit-identical outputs
again and hooks someone else attached are left alone. The loop calls
`aux_losses()` after the forward pass and `transform_grads()` between
`backward()` and `optimizer.step()`; it knows nothing else about hooks.

A hook that keeps state (momentum, counters, a random stream) defines
`state_dict()` / `load_state_dict(state)`; `state_dict()` here collects them
under keys `kind.index.name` (the entry's place in the config, so the same
config gives the same keys on resume) and the loop saves them in checkpoints.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmlab.config import HooksConfig, check_hook_entry
from lmlab.errors import LmlabError
from lmlab.hooks import registry
from lmlab.hooks.plugins import load_plugin
from lmlab.model.points import PointHooks, match_points


class HookFailed(LmlabError):
    """A hook raised, or returned what it must not; `where` names the hook and its point."""

    def __init__(self, where: str, detail: str) -> None:
        super().__init__(f"{where} failed: {detail}")
        self.where, self.detail = where, detail


def _frame(e: BaseException) -> str:
    """'file:line in function' of the deepest Python frame outside torch and this module."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "/torch/" not in f.filename and f.filename != __file__]
    return f" ({frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""


def _guard(where: str, fn: Callable) -> Callable:
    """`fn`, with any exception it raises re-raised as HookFailed naming `where` and its line."""
    def call(*args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except LmlabError:
            raise
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise HookFailed(where, f"{type(e).__name__}: {first}{_frame(e)}") from e

    return call


def _split_entry(kind: str, entry: dict, with_at: bool | None
                 ) -> tuple[str, str | None, float, dict]:
    """(name, at, weight, params) of a config entry; `with_at` None means 'at' is optional."""
    check_hook_entry(kind, entry, f"hooks.{kind} entry")
    params = dict(entry)
    name = params.pop("name")
    at = params.pop("at", None)
    weight = params.pop("weight", 1.0) if kind == "aux_losses" else 1.0
    if with_at is True and at is None:
        raise LmlabError(f"hooks.{kind} entry '{name}' needs 'at': a hook point name or glob.")
    if with_at is False and at is not None:
        raise LmlabError(f"hooks.{kind} entry '{name}' takes no 'at': it acts on parameters.")
    if not isinstance(weight, int | float) or isinstance(weight, bool):
        raise LmlabError(f"hooks.aux_losses entry '{name}': weight must be a number.")
    return name, at, float(weight), params


class ExperimentHooks:
    """The hooks of one config on one adapter; attach/detach, or use as a context manager."""

    def __init__(self, cfg: HooksConfig, adapter: torch.nn.Module) -> None:
        self.cfg, self.adapter = cfg, adapter
        self.plugins = {path: load_plugin(path) for path in cfg.plugins}  # path -> sha256
        names = list(adapter.hook_points())
        # every bound hook under its stable key `kind.index.name`, for state_dict()
        self.bound: dict[str, Callable] = {}
        # (point name, hook, "KIND hook 'NAME' at POINT") for forward and backward hooks
        self.point_fns: list[tuple[str, Callable, str]] = []
        for kind in ("forward", "backward"):
            for i, entry in enumerate(getattr(cfg, kind)):
                name, at, _, params = _split_entry(kind, entry, with_at=True)
                spec = registry.get(kind, name)
                fn = self.bound[f"{kind}.{i}.{name}"] = spec.bind(params)
                for point in match_points(at, names):
                    spec.check_point(point)
                    self.point_fns.append((point, fn, f"{kind} hook '{name}' at {point}"))
        self.update_fns = []
        for i, entry in enumerate(cfg.update):
            name, _, _, params = _split_entry("update", entry, with_at=False)
            fn = self.bound[f"update.{i}.{name}"] = registry.get("update", name).bind(params)
            self.update_fns.append(_guard(f"update hook '{name}'", fn))
        # (label, weight, callable, matched points); a weight of 0 is inert: never computed
        self.aux: list[tuple[str, float, Callable, list[str]]] = []
        for i, entry in enumerate(cfg.aux_losses):
            name, at, weight, params = _split_entry("aux_losses", entry, with_at=None)
            spec = registry.get("aux_losses", name)
            fn = self.bound[f"aux_losses.{i}.{name}"] = spec.bind(params)
            at = at or spec.points
            matched = match_points(at, names) if at else []
            for point in matched:
                spec.check_point(point)
            label = name if name not in {a[0] for a in self.aux} else f"{name}_{len(self.aux)}"
            self.aux.append((label, weight, _guard(f"aux loss '{label}'", fn), matched))
        self.run_dir: Path | None = None
        self._acts: dict[str, torch.Tensor] = {}
        self._hooks = PointHooks(adapter.hook_points())
        self._objects: list[Any] = []

    @property
    def empty(self) -> bool:
        return not (self.point_fns or self.update_fns or self.aux)

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def attach(self, run_dir: str | Path | None = None) -> ExperimentHooks:
        """Register every hook; `run_dir` is where hooks that write (record) put their files."""
        if self._hooks:
            raise LmlabError("These hooks are already attached; detach them first.")
        if run_dir is not None:
            self.run_dir = Path(run_dir)
        try:
            for point, fn, where in self.point_fns:
                if hasattr(fn, "attach"):
                    self._hooks.keep(fn.attach(self.adapter, point, self.run_dir))
                    if fn not in self._objects:
                        self._objects.append(fn)
                else:
                    self._hooks.add(point, _wrap(point, fn, where))
            for obj in self._objects:  # e.g. a learning rule whose points held no linear
                if hasattr(obj, "check_attached"):
                    obj.check_attached()
            recorded = {p for _, weight, _, matched in self.aux if weight for p in matched}
            for point in sorted(recorded):
                self._hooks.add(point, self._recorder(point))
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove exactly the handles `attach` made (other hooks on the model stay)."""
        self._hooks.remove()
        for obj in self._objects:
            if hasattr(obj, "close"):
                obj.close()
        self._objects.clear()
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
            if not weight:
                out[label] = torch.zeros(())
                continue
            acts = {p: self._acts[p] for p in matched if p in self._acts}
            if matched and not acts:
                raise LmlabError(f"Aux loss '{label}': none of its points ran in this forward "
                                 f"pass ({', '.join(matched[:4])}...).")
            out[label] = weight * fn(acts, self.adapter)
        self._acts.clear()
        return out

    def transform_grads(self, step: int, lr: float) -> None:
        """Apply the update hooks, in config order, to every parameter that has a gradient."""
        if not self.update_fns:
            return
        named = [(n, p) for n, p in self.adapter.network.named_parameters() if p.grad is not None]
        for fn in self.update_fns:
            fn(named, step=step, lr=lr)

    def state_keys(self) -> list[str]:
        """Keys of the hooks that keep state (those with `state_dict`), in config order."""
        return [k for k, fn in self.bound.items() if hasattr(fn, "state_dict")]

    def state_dict(self) -> dict[str, Any]:
        """{key: state} of every stateful hook; plain values and tensors only (weights_only)."""
        out = {}
        for key in self.state_keys():
            out[key] = state = self.bound[key].state_dict()
            _check_plain(state, key)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved; a stateful hook missing from `state` starts afresh."""
        for key in self.state_keys():
            if key in state:
                self.bound[key].load_state_dict(state[key])

    def describe(self) -> list[dict[str, Any]]:
        """Every hook in force with its parameters and where it came from, for the manifest."""
        out = []
        for kind in registry.KINDS:
            for entry in getattr(self.cfg, kind):
                spec = registry.get(kind, entry["name"])
                item = {"kind": kind, **entry, "source": spec.source}
                for path, digest in self.plugins.items():
                    if Path(path).resolve() == Path(spec.source):
                        item["source"], item["sha256"] = path, digest
                out.append(item)
        return out


def _check_plain(value: Any, key: str) -> None:
    """Refuse state that `torch.load(weights_only=True)` could not read back."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, key)
            _check_plain(v, key)
    elif isinstance(value, list | tuple):
        for v in value:
            _check_plain(v, key)
    elif not isinstance(value, torch.Tensor | int | float | str | bool | type(None)):
        raise LmlabError(
            f"Hook {key}: state_dict() holds a {type(value).__name__}; checkpoints keep only "
            "tensors, numbers, strings and dicts/lists of them (a torch.Generator: save "
            "gen.get_state()).")


def _wrap(point: str, fn: Callable, where: str) -> Callable:
    """The PyTorch forward hook running `fn`: its errors and a changed shape or dtype named.

    A hook that returned another shape would be broadcast silently into the
    residual stream, so its output must have the activation's shape and dtype.
    """
    fn = _guard(where, fn)

    def hook(module, inputs, output):
        out = fn(output, point)
        if out is None or out is output:
            return out
        if not isinstance(out, torch.Tensor):
            raise HookFailed(where, f"it returned {type(out).__name__}, not a tensor")
        if out.shape != output.shape or out.dtype != output.dtype:
            raise HookFailed(where, f"it returned shape {tuple(out.shape)} {out.dtype}, but the "
                             f"activation is {tuple(output.shape)} {output.dtype}; a hook must "
                             "return a tensor of its input's shape and dtype")
        return out

    return hook
