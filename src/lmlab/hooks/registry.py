"""The hook registry: one decorator for built-ins and users' plugin files alike.

A hook is registered under a kind and a name; config refers to it by that name
and passes keyword parameters, which are checked against the hook's signature
so a misspelt parameter is an error, not a silent default.

The four kinds and what their functions receive:

- forward / backward: `fn(x, point, **params) -> tensor`, called on the
  activation at each matched hook point (a backward hook returns `x` wrapped in
  a `torch.autograd.Function`, so the forward value is unchanged and only the
  gradient differs). A class registered instead is instantiated once per config
  entry with the params, and its instances are called as `obj(x, point)`:
  that is how a hook keeps state (a random feedback matrix, a running mean).
- update: `fn(named_params, step=..., lr=..., **params)` edits `.grad` in place
  between `backward()` and `optimizer.step()`.
- aux_losses: `fn(acts, model, **params) -> scalar tensor`, where `acts` maps
  each matched point's name to its activation in this forward pass.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmlab.errors import LmlabError, did_you_mean

KINDS = ("forward", "backward", "update", "aux_losses")
# parameters the caller supplies itself, not the config
_SUPPLIED = {"x", "point", "named_params", "step", "lr", "acts", "model", "self"}


@dataclass
class HookSpec:
    kind: str
    name: str
    fn: Callable
    doc: str
    source: str  # "builtin" or the plugin file's path

    def params(self) -> dict[str, inspect.Parameter]:
        target = self.fn.__init__ if inspect.isclass(self.fn) else self.fn
        sig = inspect.signature(target)
        return {n: p for n, p in sig.parameters.items()
                if n not in _SUPPLIED and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    def bind(self, params: dict[str, Any]) -> Callable:
        """The callable with `params` bound, after checking every name and requirement."""
        known = self.params()
        for key in params:
            if key not in known:
                raise LmlabError(
                    f"Hook '{self.name}' ({self.kind}) has no parameter '{key}'. "
                    f"Its parameters: {', '.join(known) or 'none'}." + did_you_mean(key, list(known))
                )
        missing = [n for n, p in known.items() if p.default is p.empty and n not in params]
        if missing:
            raise LmlabError(f"Hook '{self.name}' ({self.kind}) needs: {', '.join(missing)}.")
        if inspect.isclass(self.fn):
            return self.fn(**params)
        fn = self.fn
        return lambda *args, **kw: fn(*args, **kw, **params)

    def signature_text(self) -> str:
        parts = []
        for n, p in self.params().items():
            parts.append(n if p.default is p.empty else f"{n}={p.default!r}")
        return f"{self.name}({', '.join(parts)})"


REGISTRY: dict[str, dict[str, HookSpec]] = {k: {} for k in KINDS}
_current_source = "builtin"


def register(kind: str, name: str | None = None) -> Callable[[Callable], Callable]:
    """Decorator: `@register("forward")` makes a function usable from config by its name."""
    if kind not in KINDS:
        raise LmlabError(f"Unknown hook kind '{kind}'. Kinds: {', '.join(KINDS)}.")

    def deco(fn: Callable) -> Callable:
        key = name or fn.__name__
        doc = inspect.getdoc(fn) or ""
        REGISTRY[kind][key] = HookSpec(kind, key, fn, doc.split("\n")[0], _current_source)
        return fn

    return deco


def get(kind: str, name: str) -> HookSpec:
    load_builtins()
    table = REGISTRY[kind]
    if name not in table:
        raise LmlabError(
            f"Unknown {kind} hook '{name}'. Available: {', '.join(sorted(table))}."
            + did_you_mean(name, list(table))
        )
    return table[name]


def load_builtins() -> None:
    """Import the modules whose decorators fill the registry (idempotent)."""
    from lmlab.hooks import aux, backward, forward, update  # noqa: F401
