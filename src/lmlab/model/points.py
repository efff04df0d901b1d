"""Named intervention points: identity modules that hooks attach to.

As in TransformerLens, every place an experiment may touch is a `HookPoint`
module whose forward returns its input. With nothing attached (to it, or
globally to all modules), a call returns its input after four dict checks,
skipping `nn.Module.__call__`'s dispatch, which is what makes an unhooked point
cost nothing measurable even on a launch-bound GPU; with hooks attached,
PyTorch's own hook machinery runs them, so adding and removing hooks never
edits the model's code. A model exposes its points by name via `hook_points()`; the same
names mean the same activations on every architecture.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

from lmlab.errors import LmlabError


class HookPoint(nn.Module):
    """Identity; its forward hooks see and may replace the activation."""

    name: str = ""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return super().__call__(x) if self.hooked else x

    @property
    def hooked(self) -> bool:
        """Whether any hook (its own or a global one) would see this point."""
        return bool(self._forward_hooks or self._forward_pre_hooks or self._backward_hooks
                    or self._backward_pre_hooks or _nn_module._global_forward_hooks
                    or _nn_module._global_forward_pre_hooks
                    or _nn_module._global_backward_hooks
                    or _nn_module._global_backward_pre_hooks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @property
    def active(self) -> bool:
        """True when something is attached, e.g. so attention can leave its fused kernel."""
        return bool(self._forward_hooks)


def collect_hook_points(module: nn.Module) -> dict[str, HookPoint]:
    """All HookPoints below `module`, keyed by their module path, and named in place."""
    points = {}
    for name, sub in module.named_modules():
        if isinstance(sub, HookPoint):
            sub.name = name
            points[name] = sub
    return points


def match_points(pattern: str, names: list[str]) -> list[str]:
    """Point names matching a glob such as `blocks.*.hook_attn_out`.

    A pattern that matches nothing is an error listing the real points, since a
    typo would otherwise turn an experiment into a silent baseline.
    """
    hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not hits:
        raise LmlabError(
            f"Hook point pattern '{pattern}' matches no point of this model. "
            f"Its points are: {', '.join(summarise(names))}."
        )
    return hits


def summarise(names: list[str]) -> list[str]:
    """Collapse `blocks.{i}.x` over layers so the list of points stays readable."""
    out, seen = [], set()
    for n in names:
        parts = n.split(".")
        if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
            n = ".".join(["blocks", "{i}", *parts[2:]])
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


class PointHooks:
    """Forward hooks attached to named points, removed together: lmlab's one way to attach.

    The experiment hooks (hooks.manager), `run_with_cache` and telemetry's probe all
    attach through one of these, so each removes exactly what it added and nothing else.
    Also a context manager: the hooks are removed on leaving the block.
    """

    def __init__(self, points: dict[str, HookPoint]) -> None:
        self.points = points
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def add(self, name: str, hook, prepend: bool = False) -> None:
        """Run `hook(module, inputs, output)` after point `name`'s forward (it may replace it);
        `prepend` runs it before the point's other hooks."""
        self.handles.append(self.points[name].register_forward_hook(hook, prepend=prepend))

    def keep(self, handles: list) -> None:
        """Handles something attached itself (a hook's own `attach`), removed with the rest."""
        self.handles += handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __bool__(self) -> bool:
        return bool(self.handles)

    def __enter__(self) -> PointHooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
