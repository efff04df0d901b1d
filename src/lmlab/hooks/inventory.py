"""What `lmlab hooks list` prints: the points a config's model has, and every hook config can name.

Each point is listed with its shape and its TransformerLens twin (the name TL
caches the same activation under, `lmlab.model.vocabulary`), so a recording or an
intervention can be carried between lmlab and TL.

The model is built from the config alone (no prepared data is needed), so the
points printed are exactly those `at:` globs are matched against in training.
"""

from __future__ import annotations

from lmlab.hooks import registry
from lmlab.hooks import standard as _standard  # noqa: F401  (registers the built-ins)
from lmlab.model.points import summarise
from lmlab.model.vocabulary import VOCABULARY, describe

KIND_HELP = {
    "forward": "change activations at a point: at: POINT-GLOB",
    "backward": "change only the gradient through a point: at: POINT-GLOB",
    "update": "transform gradients before optimizer.step(): no 'at'",
    "aux_losses": "add weight * loss to the training loss: weight: W, at: POINT-GLOB (if it reads "
                  "activations)",
}


def points_text(names: list[str]) -> list[str]:
    """The point names with block indices collapsed to `{i}`, each with its shape and TL twin."""
    layers = sorted({int(n.split(".")[1]) for n in names
                     if n.startswith("blocks.") and n.split(".")[1].isdigit()})
    lines = [f"{len(names)} hook points"
             + (f"; blocks.{{i}} for i = {layers[0]}..{layers[-1]}" if layers else "")
             + " (shape; TransformerLens's name for the same activation):"]
    rows = []
    order = list(VOCABULARY)
    for n in sorted(summarise(names), key=lambda n: order.index(n) if n in order else len(order)):
        point = describe(n)
        shape = point.shape if point else "?"
        twin = ("none" if point is None or point.tl is None
                else "same name" if point.tl == n else point.tl)
        if point is not None and point.tl_note:
            twin += f" ({point.tl_note})"
        note = ("   (hooking it leaves the fused attention kernel)"
                if n.endswith(("hook_attn_scores", "hook_pattern")) else "")
        rows.append((n, shape, f"TL: {twin}{note}"))
    width = [max(len(r[k]) for r in rows) for k in (0, 1)] if rows else [0, 0]
    lines += [f"  {a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in rows]
    return lines


def hooks_text() -> list[str]:
    """Every registered hook by kind: its signature, where it may act, and its one-line doc."""
    lines = []
    for kind in registry.KINDS:
        lines.append(f"{kind} hooks ({KIND_HELP[kind]}):")
        for name in sorted(registry.REGISTRY[kind]):
            spec = registry.REGISTRY[kind][name]
            where = f" [at {spec.points}]" if spec.points else ""
            source = "" if spec.source == "builtin" else f" [from {spec.source}]"
            lines.append(f"  {spec.signature_text()}{where}{source}")
            lines.append(f"      {spec.doc}")
    return lines


def hooks_list(config: str | None, overrides: list[str]) -> str:
    """The model's points and every hook (the config's plugins loaded), as `hooks list` prints."""
    from lmlab.config import load_config
    from lmlab.hooks.plugins import load_plugin
    from lmlab.model.build import build_adapter

    cfg = load_config(config, overrides)
    for path in cfg.hooks.plugins:
        load_plugin(path)
    adapter = build_adapter(cfg)  # the character model's vocab is fixed: no data needed
    model = cfg.model.model_name or "from-scratch Transformer"
    return "\n".join([f"Model: {model} ({adapter.num_params():,} parameters)",
                      *points_text(list(adapter.hook_points())), "", *hooks_text()])
