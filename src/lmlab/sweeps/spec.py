"""Sweep files: the schema, strict validation, and expansion into runs.

A sweep is variants x grid points x seeds over one base config. Every key is
checked like a config key (an unknown one is named with the valid ones), and
every expanded run's config is built and validated before any run starts, so a
typo in the 40th run cannot waste the first 39. `method: random` draws grid
points from ranges instead of crossing lists; the drawn values are recorded.

The guard: at one grid point, variants must differ only in what the sweep file
says, so their set-ups (resolved device and dtype, data, world size, token
budget) must match. Set-up changes belong in the grid, where each point is
compared only with itself.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lmlab.config import Config, deep_merge, from_dict, load_raw, read_yaml
from lmlab.device import resolve_device, resolve_dtype
from lmlab.errors import LmlabError, did_you_mean

KEYS = ("name", "base", "set", "seeds", "baseline", "variants", "grid", "method", "samples",
        "sample_seed")
RANGES = ("log_uniform", "uniform", "choice")
MAX_RUNS = 500


@dataclass
class SweepRun:
    """One run of a sweep: its variant, grid point and seed, and its validated config."""

    key: str
    variant: str
    point_id: int
    point: dict[str, Any]
    seed: int
    config: dict[str, Any]

    def label(self) -> dict[str, Any]:
        return {"key": self.key, "variant": self.variant, "point_id": self.point_id,
                "point": self.point, "seed": self.seed}


@dataclass
class Sweep:
    name: str
    baseline: str
    variants: list[str]
    points: list[dict[str, Any]]
    seeds: list[int]
    runs: list[SweepRun]
    resolved: dict[str, Any]  # the sweep file as it ran: seeds listed, drawn points recorded


def config_keys() -> dict[str, list[str]]:
    """Section -> its field names, from the config schema itself."""
    return {name: [f.name for f in dataclasses.fields(tp)]
            for name, tp in typing.get_type_hints(Config).items()}


def check_key(key: str, where: str, allow_hooks: bool = True) -> None:
    """A dotted config key (`train.lr`) or `hooks`; anything else is named with the valid ones."""
    sections = config_keys()
    if allow_hooks and key == "hooks":
        return
    if key in ("run.seed", "run.name"):
        raise LmlabError(f"'{key}' in {where}: a sweep sets each run's seed from `seeds:` and "
                         "names runs after the sweep, variant and seed; remove it.")
    section, _, field = str(key).partition(".")
    if section not in sections or section == "hooks":
        valid = [s for s in sections if s != "hooks"]
        raise LmlabError(f"Unknown key '{key}' in {where}: a key is section.field with section "
                         f"one of {', '.join(valid)}" + (" (or `hooks`)" if allow_hooks else "")
                         + "." + did_you_mean(section, valid))
    if field not in sections[section]:
        raise LmlabError(f"Unknown config key '{key}' in {where}. Valid keys in {section}: "
                         f"{', '.join(sections[section])}." +
                         did_you_mean(field, sections[section]))


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'train.lr': 1, 'hooks': {...}} -> {'train': {'lr': 1}, 'hooks': {...}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key == "hooks":
            out["hooks"] = copy.deepcopy(value)
            continue
        section, _, field = key.partition(".")
        out.setdefault(section, {})[field] = copy.deepcopy(value)
    return out


def _mapping(raw: Any, where: str, empty_ok: bool = True) -> dict[str, Any]:
    if raw is None and empty_ok:
        return {}
    if not isinstance(raw, dict):
        raise LmlabError(f"`{where}` in the sweep file must be a mapping, not {raw!r}.")
    if not raw and not empty_ok:
        raise LmlabError(f"`{where}` in the sweep file is empty: give at least one entry.")
    return raw


def _seeds(raw: Any) -> list[int]:
    if isinstance(raw, bool) or raw is None:
        raise LmlabError("`seeds` must be a positive number of seeds or a list of seeds.")
    if isinstance(raw, int):
        if raw <= 0:
            raise LmlabError(f"`seeds` = {raw}: a sweep needs at least 1 seed (2+ for intervals).")
        return list(range(1, raw + 1))
    if isinstance(raw, list):
        if not raw:
            raise LmlabError("`seeds` is an empty list: give at least one seed.")
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in raw):
            raise LmlabError(f"`seeds` = {raw}: every seed must be a whole number >= 0.")
        if len(set(raw)) != len(raw):
            raise LmlabError(f"`seeds` = {raw} repeats a seed; replicates need distinct seeds.")
        return list(raw)
    raise LmlabError(f"`seeds` = {raw!r} must be a positive number or a list of seeds.")


def _draw(spec: Any, key: str, rng: np.random.Generator) -> Any:
    if isinstance(spec, list):
        spec = {"choice": spec}
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in RANGES):
        raise LmlabError(f"grid.{key} = {spec!r}: with method: random a value is a list or one "
                         f"of {{log_uniform: [a, b]}}, {{uniform: [a, b]}}, {{choice: [...]}}.")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise LmlabError(f"grid.{key}: {kind} needs a non-empty list, not {args!r}.")
    if kind == "choice":
        return copy.deepcopy(args[int(rng.integers(len(args)))])
    ok = (len(args) == 2 and all(isinstance(a, int | float) and not isinstance(a, bool)
                                 for a in args) and args[0] < args[1])
    if not ok or (kind == "log_uniform" and args[0] <= 0):
        raise LmlabError(f"grid.{key}: {kind} needs [low, high] with low < high"
                         + (" and low > 0" if kind == "log_uniform" else "") + f", not {args}.")
    if kind == "uniform":
        return float(rng.uniform(*args))
    return float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))


def _points(raw: dict[str, Any]) -> list[dict[str, Any]]:
    method = raw.get("method", "grid")
    if method not in ("grid", "random"):
        raise LmlabError(f"`method` = {method!r}: use grid (cross the lists) or random "
                         "(draw `samples` points from ranges).")
    grid = raw.get("grid")
    if grid is None and method == "grid":
        return [{}]
    grid = _mapping(grid, "grid", empty_ok=False)
    for key in grid:
        check_key(key, "grid", allow_hooks=False)
    if method == "random":
        samples = raw.get("samples")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples <= 0:
            raise LmlabError(f"`samples` = {samples!r}: method: random needs a positive number "
                             "of points to draw.")
        seed = raw.get("sample_seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise LmlabError(f"`sample_seed` = {seed!r} must be a whole number.")
        rng = np.random.default_rng(seed)
        return [{k: _draw(v, k, rng) for k, v in grid.items()} for _ in range(samples)]
    if "samples" in raw:
        raise LmlabError("`samples` only applies to method: random.")
    for key, values in grid.items():
        if isinstance(values, dict):
            raise LmlabError(f"grid.{key} = {values!r} is a range: ranges need method: random "
                             "(with samples: N); a grid lists values.")
        if not isinstance(values, list) or not values:
            raise LmlabError(f"grid.{key} must be a non-empty list of values, not {values!r}.")
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def folds_case(folder: Path) -> bool:
    """Whether the file system at `folder` treats `a` and `A` as one name (macOS, Windows)."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(prefix=".lmlab-case-", dir=folder) as f:
            return Path(f.name).with_name(Path(f.name).name.upper()).exists()
    except OSError:
        return False


def check_names(variants: dict[Any, Any], fold: bool) -> None:
    """Refuse two variants whose names become one run name once sanitised (and case-folded
    where the file system folds case): one run would stand for both, compared with itself."""
    seen: dict[str, Any] = {}
    for vname in variants:
        if not isinstance(vname, str | int) or isinstance(vname, bool):
            raise LmlabError(f"Variant name {vname!r} must be a word (a string).")
        safe = _safe(str(vname))
        k = safe.casefold() if fold else safe
        if k in seen:
            raise LmlabError(f"Variants {seen[k]!r} and {vname!r} both become the run name "
                             f"'{safe}'" + (" (this file system ignores case)" if fold else "")
                             + ": their runs would share one folder. Rename one of them.")
        seen[k] = vname


def load_sweep(path: str | Path, yes: bool = False) -> Sweep:
    """Read, validate and expand a sweep file; every run's config is validated here."""
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"Sweep file {path} does not exist.")
    raw = read_yaml(path)
    for key in raw:
        if key not in KEYS:
            raise LmlabError(f"Unknown key '{key}' in sweep file {path}. Valid keys: "
                             f"{', '.join(KEYS)}." + did_you_mean(str(key), KEYS))
    return expand(raw, path.parent, yes)


def expand(raw: dict[str, Any], here: Path = Path("."), yes: bool = False) -> Sweep:
    """variants x points x seeds -> runs, each config built from base + set + variant + point."""
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise LmlabError("The sweep file needs a `name:` (a short word, used in run names).")
    base = raw.get("base", "char-tiny")
    if not isinstance(base, str):
        raise LmlabError(f"`base` = {base!r} must be a ready config name or a path.")
    near = here / base
    base_ref = str(near) if near.is_file() else base
    base_raw = load_raw(base_ref)
    common = _mapping(raw.get("set"), "set")
    for key in common:
        check_key(key, "set")
    variants = _mapping(raw.get("variants"), "variants", empty_ok=False)
    check_names(variants, folds_case(Path.cwd()))
    for vname, over in variants.items():
        over = _mapping(over, f"variants.{vname}")
        for key in over:
            check_key(key, f"variants.{vname}")
    baseline = raw.get("baseline", next(iter(variants)))
    if not isinstance(baseline, str | int) or isinstance(baseline, bool):
        raise LmlabError(f"baseline = {baseline!r} must be the name of one variant: "
                         f"{', '.join(map(str, variants))}.")
    if baseline not in variants:
        raise LmlabError(f"baseline '{baseline}' is not a variant. Variants: "
                         f"{', '.join(map(str, variants))}." + did_you_mean(str(baseline),
                                                                            list(variants)))
    seeds = _seeds(raw.get("seeds", 1))
    points = raw["points"] if "points" in raw else _points(raw)  # a resolved file: as drawn
    n = len(variants) * len(points) * len(seeds)
    if n > MAX_RUNS and not yes:
        raise LmlabError(f"This sweep expands to {n} runs ({len(variants)} variants x "
                         f"{len(points)} points x {len(seeds)} seeds), more than {MAX_RUNS}. "
                         "Pass --yes if you mean it.")
    sweep_name = _safe(name)
    start = deep_merge(base_raw, nest(common))
    runs = []
    for seed, (pid, point), vname in itertools.product(seeds, enumerate(points), variants):
        key = f"{_safe(str(vname))}" + (f"-g{pid}" if len(points) > 1 else "") + f"-s{seed}"
        cfg = deep_merge(deep_merge(start, nest(variants[vname] or {})), nest(point))
        cfg = deep_merge(cfg, {"run": {"seed": seed, "name": f"{sweep_name}-{key}"}})
        try:
            cfg = from_dict(cfg).to_dict()
        except LmlabError as e:
            raise LmlabError(f"Run {key} of the sweep (variant {vname}, seed {seed}"
                             + (f", grid point {point}" if point else "") + f"): {e}") from None
        runs.append(SweepRun(key, str(vname), pid, point, seed, cfg))
    resolved = {"name": name, "base": base_ref, "set": common, "seeds": seeds,
                "baseline": baseline, "variants": variants, "points": points}
    if "grid" in raw:
        resolved |= {"grid": raw["grid"], "method": raw.get("method", "grid")}
    return Sweep(sweep_name, str(baseline), [str(v) for v in variants], points, seeds, runs,
                 json.loads(json.dumps(resolved, default=str)))


def setup_of(cfg: dict[str, Any]) -> dict[str, Any]:
    """What a run's set-up resolves to on this machine (the guard compares these)."""
    from lmlab.runs.aggregate import token_budget

    t = cfg["train"]
    device = resolve_device(t["device"])
    meta = Path(cfg["data"]["path"]) / "meta.json"
    if not meta.is_file():
        raise LmlabError(f"Prepared data folder {cfg['data']['path']} (data.path) has no "
                         f"meta.json. Run `lmlab prepare --out {cfg['data']['path']}` first.")
    return {"device": str(device), "dtype": resolve_dtype(t["dtype"], device),
            "data": json.loads(meta.read_text()).get("data_hash"), "world size": 1,
            "token budget": token_budget({"config": cfg, "world_size": 1})}


def check_hooks(sweep: Sweep) -> None:
    """Build each distinct from-scratch model with its hooks once, so an unknown hook name or
    parameter stops the sweep before any run starts (imported models are checked by their run).
    """
    from lmlab.hooks.manager import ExperimentHooks
    from lmlab.model.build import build_adapter

    seen = set()
    for run in sweep.runs:
        c = run.config
        blob = json.dumps([c["model"], c["hooks"], c["data"]["path"]], sort_keys=True)
        if c["model"]["model_name"] is not None or blob in seen:
            continue
        seen.add(blob)
        meta = json.loads((Path(c["data"]["path"]) / "meta.json").read_text())
        cfg = from_dict(c)
        try:
            ExperimentHooks(cfg.hooks, build_adapter(cfg, meta["vocab_size"]))
        except LmlabError as e:
            raise LmlabError(f"Variant {run.variant} of the sweep: {e}") from None


def check_setups(sweep: Sweep) -> None:
    """Refuse a sweep whose variants would run different set-ups at one grid point."""
    cache: dict[str, dict[str, Any]] = {}
    for pid, point in enumerate(sweep.points):
        seen: dict[str, tuple[str, Any]] = {}
        for run in (r for r in sweep.runs if r.point_id == pid):
            blob = json.dumps(run.config, sort_keys=True)
            setup = cache.setdefault(blob, setup_of(run.config))
            for what, value in setup.items():
                first = seen.setdefault(what, (run.variant, value))
                if first[1] != value:
                    where = f" at grid point {point}" if point else ""
                    raise LmlabError(
                        f"This sweep would mix set-ups{where}: {what} is {first[1]} for "
                        f"variant {first[0]} but {value} for {run.variant}. Variants must "
                        "differ only in how the model learns; put set-up changes in `grid:` "
                        "(or set train.device / train.dtype explicitly in `set:`).")
    check_hooks(sweep)


def dump_resolved(sweep: Sweep) -> str:
    return yaml.safe_dump(sweep.resolved, sort_keys=False)
