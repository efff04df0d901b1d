"""The hook registry: one decorator for built-ins and users' plugin files alike.

A hook is registered under a kind and a name; config refers to it by that name
and passes keyword parameters, which are checked against the hook's signature
(names, required ones, and the annotated types, `Literal` choices included) so
a misspelt or mistyped parameter is an error at config load, not a silent
default or a crash at step 1000.

The four kinds and what their functions receive:

- forward / backward: `fn(x, point, **params) -> tensor`, called on the
  activation at each matched hook point (a backward hook returns `x` wrapped in
  a `torch.autograd.Function`, so the forward value is unchanged and only the
  gradient differs). A class registered instead is instantiated once per config
  entry with the params, and its instances are called as `obj(x, point)`:
  that is how a hook keeps state (a random generator, a file counter).
  A class that keeps state defines `state_dict()` (tensors and plain values
  only) and `load_state_dict(state)`: the loop saves it in every checkpoint and
  restores it on resume, which is what makes a resumed run exact. Any kind
  (update and aux_losses too) may be such a class.
  An instance may instead define `attach(adapter, point, run_dir) -> handles`:
  it is then handed each matched point and hooks whatever it needs itself (the
  modules around the point, as feedback alignment does); the manager removes
  the returned handles on detach and calls the instance's `close()` if any.
- update: `fn(named_params, step=..., lr=..., **params)` edits `.grad` in place
  between `backward()` and `optimizer.step()`.
- aux_losses: `fn(acts, model, **params) -> scalar tensor`, where `acts` maps
  each matched point's name to its activation in this forward pass and `model`
  is the adapter.

`@register(kind, points="*.hook_attn_scores")` restricts where a hook may act
(matching any other point is an error) and, for an aux loss, is the default
`at` when config gives none.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import typing
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
    points: str | None = None  # glob of the points this hook may act on

    def _target(self) -> Callable:
        return self.fn.__init__ if inspect.isclass(self.fn) else self.fn

    def params(self) -> dict[str, inspect.Parameter]:
        sig = inspect.signature(self._target())
        return {n: p for n, p in sig.parameters.items()
                if n not in _SUPPLIED and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    def bind(self, params: dict[str, Any]) -> Callable:
        """The callable with `params` bound, after checking every name, requirement and type."""
        from lmlab.config import _coerce  # the config schema's own type check

        known = self.params()
        for key in params:
            if key not in known:
                raise LmlabError(
                    f"Hook '{self.name}' ({self.kind}) has no parameter '{key}'. "
                    f"Its parameters: {', '.join(known) or 'none'}."
                    + did_you_mean(key, list(known))
                )
        missing = [n for n, p in known.items() if p.default is p.empty and n not in params]
        if missing:
            raise LmlabError(f"Hook '{self.name}' ({self.kind}) needs: {', '.join(missing)}.")
        try:
            hints = typing.get_type_hints(self._target())
        except Exception:  # an annotation a plugin cannot resolve: names are still checked
            hints = {}
        params = {k: _coerce(v, hints[k], f"hooks.{self.kind}.{self.name}.{k}")
                  if k in hints and v is not None else v for k, v in params.items()}
        if inspect.isclass(self.fn):
            return self.fn(**params)
        fn = self.fn
        return lambda *args, **kw: fn(*args, **kw, **params)

    def check_point(self, point: str) -> None:
        if self.points and not fnmatch.fnmatchcase(point, self.points):
            raise LmlabError(
                f"Hook '{self.name}' ({self.kind}) acts only on points matching "
                f"'{self.points}', but its 'at' also matches '{point}'. Narrow the pattern."
            )

    def signature_text(self) -> str:
        parts = []
        for n, p in self.params().items():
            parts.append(n if p.default is p.empty else f"{n}={p.default!r}")
        return f"{self.name}({', '.join(parts)})"


REGISTRY: dict[str, dict[str, HookSpec]] = {k: {} for k in KINDS}
_current_source: str | None = None  # the plugin file being executed, set by plugins.py


def _source_of(fn: Callable) -> str:
    if _current_source is not None:
        return _current_source
    module = getattr(fn, "__module__", "") or ""
    return "builtin" if module.startswith("lmlab.hooks.") else f"python module {module}"


def register(kind: str, name: str | None = None, *, points: str | None = None
             ) -> Callable[[Callable], Callable]:
    """Decorator: `@register("forward")` makes a function usable from config by its name.

    A name already taken by another source (a built-in, another plugin file) is
    an error: a plugin silently replacing `scale` would change every later run.
    """
    if kind not in KINDS:
        raise LmlabError(f"Unknown hook kind '{kind}'. Kinds: {', '.join(KINDS)}.")

    def deco(fn: Callable) -> Callable:
        key = name or fn.__name__
        source = _source_of(fn)
        old = REGISTRY[kind].get(key)
        if old is not None and old.source != source:
            raise LmlabError(
                f"{kind} hook '{key}' is already registered by {old.source}; "
                f"{source} must choose another name."
            )
        doc = inspect.getdoc(fn) or ""
        REGISTRY[kind][key] = HookSpec(kind, key, fn, doc.split("\n")[0], source, points)
        return fn

    return deco


def get(kind: str, name: str) -> HookSpec:
    load_builtins()
    if kind not in KINDS:
        raise LmlabError(f"Unknown hook kind '{kind}'. Kinds: {', '.join(KINDS)}.")
    table = REGISTRY[kind]
    if name not in table:
        raise LmlabError(
            f"Unknown {kind} hook '{name}'. Available: {', '.join(sorted(table))}."
            + did_you_mean(name, list(table))
        )
    return table[name]


def load_builtins() -> None:
    """Import the modules whose decorators fill the registry (idempotent).

    By name, as plugins are loaded: those modules import this one to register.
    """
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


BUILTIN_MODULES = [f"lmlab.hooks.{m}" for m in ("forward", "backward", "rules", "update", "aux")]
