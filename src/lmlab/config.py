"""The one config schema: load YAML, apply `--set a.b=c` overrides, validate, hash.

Validation is strict because a silently ignored key is a silently wrong
experiment: an unknown key names the valid ones, a wrong type names the type.
The hash is over the resolved config, so two runs with the same hash ran the
same set-up; the *base* hash leaves out `hooks` and the seed, so runs that
differ only in their hooks can be compared and seeds are replicates of one
set-up. A config file may say `base: NAME|PATH` to inherit from another.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmlab.errors import LmlabError, did_you_mean

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = "default"  # the speedrun recipe on a demo-sized time budget


def added(default: Any) -> Any:
    """A field added after the first release. Declaring it so is not enough: give it a row in
    ADDED (below) with this literal default, or test_config fails and says so."""
    return field(default=default, metadata={"added": True})


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 1337
    out_dir: str = "runs"
    tensorboard: bool = True  # event files in runs/<run_id>/tb/


@dataclass
class DataConfig:
    path: str = "data/shakespeare"
    block_size: int = 256


@dataclass
class ModelConfig:
    model_name: str | None = None
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 512
    dropout: float = 0.0
    bias: bool = False
    pos_encoding: Literal["learned", "sinusoidal", "rotary"] = "learned"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # the speedrun knobs (README "Time to quality"); defaults are nanoGPT's model
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "relu2", "swiglu"] = "gelu"
    qk_norm: bool = False
    tie_embeddings: bool = True
    logit_softcap: float | None = None
    zero_init_proj: bool = False
    value_embed: bool = False
    embed_skip: bool = False


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class FinetuneConfig:
    """How an imported model is fine-tuned: every weight (full), or LoRA adapters through PEFT."""

    method: Literal["full", "lora"] = "full"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class TrainConfig:
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 2000
    lr: float = 1.0e-3
    min_lr: float = 1.0e-4
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    decay_fraction: float = 0.2  # wsd: the last fraction of training decays to min_lr
    time_budget_s: float | None = None  # stop by training wall time; drives the schedule
    optimizer: Literal["adamw", "sgd", "lion", "muon"] = "adamw"
    muon_lr: float | None = None  # lr of Muon's matrices (null: train.lr)
    embed_lr: float | None = None  # lr of the embedding tables (null: train.lr)
    # Muon's Newton-Schulz in bf16 (torch's), fp32, or auto: bf16 only where it is fast
    muon_ns_dtype: Literal["bfloat16", "float32", "auto"] = "bfloat16"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    momentum: float = 0.9
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int | None = 40
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    sample_every: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate, or shard (FSDP2)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    compile: bool = False  # torch.compile: the whole model; an imported one per decoder block
    threads: int | None = None
    # a non-finite loss or gradient: stop, or skip that update (stopping after this many in a row)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite_skips: int = 10
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    activation_checkpointing: bool = False  # imported models: recompute blocks in backward
    # imported models: the head and cross-entropy in row chunks, never the full logits (unless
    # something hooks hook_logits); off: logits, then cross-entropy, as from-scratch models do
    fused_loss: bool = added(True)


@dataclass
class HooksConfig:
    forward: list[dict] = field(default_factory=list)
    backward: list[dict] = field(default_factory=list)
    update: list[dict] = field(default_factory=list)
    aux_losses: list[dict] = field(default_factory=list)
    plugins: list[str] = field(default_factory=list)


@dataclass
class TelemetryConfig:
    """What to measure of the learning dynamics, every `every` steps (0: never)."""

    every: int = 0
    params: bool = True  # per tensor: grad norm, weight norm, update norm / weight norm
    activations: list[str] = field(default_factory=list)  # globs of hook points
    attention: bool = True  # entropy per layer and head
    logits: bool = True  # max logit, mean logsumexp
    histograms: bool = False  # weights and gradients, to TensorBoard
    alignment: bool = added(True)  # learning rules: angles to backprop's gradient, and B to W


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        return config_hash(self.to_dict())

    def base_hash(self) -> str:
        """Hash of the set-up without hooks: runs with equal base hashes are comparable.

        The seed is left out: runs that differ only in it are replicates of one
        set-up, not different set-ups (the manifest keeps the seed). Book-keeping
        that cannot change what is learned (names, folders, how often to log,
        evaluate or save) is left out too, so a baseline and an experiment named
        differently still compare.
        """
        d = self.to_dict()
        d.pop("hooks")
        d.pop("telemetry")  # it measures what is learned, and changes none of it
        for section, key in BOOKKEEPING:
            d[section].pop(key, None)
        return config_hash(d)


BOOKKEEPING = [("run", "name"), ("run", "seed"), ("run", "out_dir"), ("train", "log_every"),
               ("train", "eval_every"), ("train", "checkpoint_every"),
               ("train", "keep_checkpoints"), ("train", "sample_every"), ("train", "threads"),
               ("train", "parallel"), ("run", "tensorboard"),
               ("train", "activation_checkpointing")]

# --- hashing: the schema's history ------------------------------------------------
#
# A config's hash must not move when the schema grows, or every earlier run would stop
# matching its own re-run. So each key added after the first release has a row here: its
# path, the literal default it had when it was added (what every earlier run had in
# effect), and the schema version that added it. A key at that default is left out of the
# hash; one set otherwise is hashed. A row's default is a literal and never changes, even
# if the dataclass default later does: then configs at the new default hash differently
# from earlier runs, as they should, since they differ.
#
# To add a config key: declare the field (any section, nested ones included), append a row
# with the same default and SCHEMA_VERSION + 1, and bump SCHEMA_VERSION. test_config checks
# that every field is either in FIRST_RELEASE or here, with this default.
#
# A whole sub-mapping added at once (train.finetune) has one row holding its default
# mapping: it is hashed whole once set, as it always was. Fields added to it later get rows
# of their own (train.finetune.new_key), which are dropped first.

SCHEMA_VERSION = 8

ADDED: list[tuple[str, Any, int]] = [
    # (path, literal default when added, schema version)
    ("train.finetune", {"method": "full", "r": 16, "alpha": 32.0, "dropout": 0.0,
                        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                           "up_proj", "down_proj"]}, 2),
    ("train.activation_checkpointing", False, 2),
    ("run.tensorboard", True, 3),
    ("telemetry", {}, 3),  # the section, once its keys below are dropped
    ("telemetry.every", 0, 3),
    ("telemetry.params", True, 3),
    ("telemetry.activations", [], 3),
    ("telemetry.attention", True, 3),
    ("telemetry.logits", True, 3),
    ("telemetry.histograms", False, 3),
    ("train.on_nonfinite", "stop", 4),
    ("train.max_nonfinite_skips", 10, 4),
    ("model.norm", "layernorm", 5),
    ("model.mlp", "gelu", 5),
    ("model.qk_norm", False, 5),
    ("model.tie_embeddings", True, 5),
    ("model.logit_softcap", None, 5),
    ("model.zero_init_proj", False, 5),
    ("model.value_embed", False, 5),
    ("model.embed_skip", False, 5),
    ("train.decay_fraction", 0.2, 5),
    ("train.time_budget_s", None, 5),
    ("train.muon_lr", None, 5),
    ("train.muon_ns_dtype", "bfloat16", 6),
    ("train.embed_lr", None, 7),
    ("telemetry.alignment", True, 8),
    ("train.fused_loss", True, 8),
]

# every key of the first release (schema version 1): always hashed
FIRST_RELEASE = {
    "run": ["name", "seed", "out_dir"],
    "data": ["path", "block_size"],
    "model": ["model_name", "n_layer", "n_head", "d_model", "d_ff", "dropout", "bias",
              "pos_encoding", "dtype"],
    "train": ["batch_size", "grad_accum", "max_steps", "lr", "min_lr", "warmup_steps",
              "schedule", "optimizer", "weight_decay", "beta1", "beta2", "momentum", "grad_clip",
              "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "log_every",
              "sample_every", "device", "parallel", "dtype", "compile", "threads"],
    "hooks": ["forward", "backward", "update", "aux_losses", "plugins"],
}


def _drop_added_defaults(d: dict[str, Any]) -> dict[str, Any]:
    """`d` without the later-added keys that hold the default they were added with."""
    d = copy.deepcopy(d)
    for path, default, _ in sorted(ADDED, key=lambda row: -row[0].count(".")):  # deepest first
        *parents, key = path.split(".")
        node = d
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(key, default) == default:
            node.pop(key, None)
    return d


def config_hash(d: dict[str, Any]) -> str:
    """sha256 of the config with its later-added keys at their added defaults left out."""
    blob = json.dumps(_drop_added_defaults(d), sort_keys=True, separators=(",", ":"),
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- validation ---------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is list:
        return "a list"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        choices = [str(a) for a in typing.get_args(tp)]
        raise LmlabError(
            f"Config value {where} = {value!r} is not valid: it must be {_type_name(tp)}."
            + did_you_mean(str(value), choices)
        )
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        return _coerce_union(value, tp, where)
    if origin is list:
        if not isinstance(value, list):
            raise LmlabError(f"Config value {where} must be a list, not {value!r}.")
        (item_tp,) = typing.get_args(tp) or (Any,)
        if item_tp is Any:
            return value
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    return _coerce_plain(value, tp, where)


def _coerce_union(value: Any, tp: Any, where: str) -> Any:
    """The first arm of `tp` (`A | B | None`) that accepts `value`."""
    if value is None and type(None) in typing.get_args(tp):
        return None
    for arg in typing.get_args(tp):
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, where)
        except LmlabError:  # not this arm; the error below names them all
            pass
    raise LmlabError(
        f"Config value {where} = {value!r} has the wrong type: it must be {_type_name(tp)}."
    )


def _coerce_plain(value: Any, tp: Any, where: str) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is dict and isinstance(value, dict):
        return value
    if isinstance(tp, type) and isinstance(value, tp) and not (
        tp is int and isinstance(value, bool)
    ):
        return value
    raise LmlabError(
        f"Config value {where} = {value!r} has the wrong type: it must be {_type_name(tp)}."
    )


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise LmlabError(f"Config section '{where or 'top level'}' must be a mapping, not {raw!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise LmlabError(
                f"Unknown config key '{path}'. Valid keys"
                f"{' in ' + where if where else ''}: {', '.join(names)}."
                + did_you_mean(str(key), names)
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, path)
        else:
            kwargs[key] = _coerce(value, tp, path)
    return cls(**kwargs)


def from_dict(raw: dict[str, Any]) -> Config:
    cfg = _build(Config, raw, "")
    _check_values(cfg)
    return cfg


def _check_values(cfg: Config) -> None:
    for check in (_check_sizes, _check_model, _check_rates, _check_finetune, _check_telemetry,
                  _check_hooks):
        check(cfg)


def _check_sizes(cfg: Config) -> None:
    m, t = cfg.model, cfg.train
    positive = {
        "data.block_size": cfg.data.block_size,
        "train.batch_size": t.batch_size,
        "train.grad_accum": t.grad_accum,
        "train.max_steps": t.max_steps,
        "train.log_every": t.log_every,
    }
    if m.model_name is None:
        positive |= {"model.n_layer": m.n_layer, "model.n_head": m.n_head,
                     "model.d_model": m.d_model, "model.d_ff": m.d_ff}
    for key, value in positive.items():
        if value <= 0:
            raise LmlabError(f"Config value {key} = {value} must be positive.")
    if t.max_nonfinite_skips < 1:
        raise LmlabError(f"train.max_nonfinite_skips = {t.max_nonfinite_skips} must be >= 1.")


def _check_model(cfg: Config) -> None:
    m = cfg.model
    if m.model_name is None and m.d_model % m.n_head:
        raise LmlabError(
            f"model.d_model ({m.d_model}) must be divisible by model.n_head ({m.n_head})."
        )
    if m.pos_encoding == "rotary" and m.model_name is None and (m.d_model // m.n_head) % 2:
        raise LmlabError("Rotary positions need an even head size (model.d_model / model.n_head).")
    if not 0.0 <= m.dropout < 1.0:
        raise LmlabError(f"model.dropout = {m.dropout} must be in [0, 1).")
    if m.model_name is not None:
        for path, default, _ in ADDED:
            section, _, key = path.partition(".")
            if section == "model" and getattr(m, key) != default:
                raise LmlabError(f"model.{key} shapes the from-scratch model only; "
                                 f"{m.model_name} is pretrained: leave it at {default!r}.")


def _check_rates(cfg: Config) -> None:
    m, t = cfg.model, cfg.train
    if t.lr <= 0:
        raise LmlabError(f"train.lr = {t.lr} must be positive.")
    positive = {"model.logit_softcap": m.logit_softcap, "train.muon_lr": t.muon_lr,
                "train.embed_lr": t.embed_lr, "train.time_budget_s": t.time_budget_s}
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise LmlabError(f"Config value {key} = {value} must be positive (or null).")
    if not 0.0 <= t.decay_fraction <= 1.0:
        raise LmlabError(f"train.decay_fraction = {t.decay_fraction} must be in [0, 1].")
    if t.parallel == "fsdp" and t.optimizer == "muon":  # refused here, not on the Nth rank
        raise LmlabError("train.optimizer=muon orthogonalises whole matrices, which "
                         "train.parallel=fsdp splits across ranks; use adamw, sgd or lion "
                         "with fsdp, or train.parallel=ddp with muon.")


def _check_telemetry(cfg: Config) -> None:
    if cfg.telemetry.every < 0:
        raise LmlabError(f"telemetry.every = {cfg.telemetry.every} must be 0 (off) or a "
                         "positive number of steps between measurements.")
    if cfg.telemetry.histograms and not cfg.run.tensorboard:
        raise LmlabError("telemetry.histograms go to TensorBoard only, which run.tensorboard=false "
                         "turns off; set one of them the other way.")


def _check_hooks(cfg: Config) -> None:
    for kind in ("forward", "backward", "update", "aux_losses"):
        for i, entry in enumerate(getattr(cfg.hooks, kind)):
            check_hook_entry(kind, entry, f"hooks.{kind}[{i}]")


def _check_finetune(cfg: Config) -> None:
    t, ft = cfg.train, cfg.train.finetune
    imported = cfg.model.model_name is not None
    if ft.method == "lora":
        if not imported:
            raise LmlabError(
                "train.finetune.method=lora adapts the frozen weights of a pretrained model, "
                "and the from-scratch model (model.model_name: null) has none to keep: set "
                "model.model_name to an imported model, or use train.finetune.method=full.")
        if ft.r <= 0:
            raise LmlabError(f"train.finetune.r = {ft.r} must be a positive rank (e.g. 16).")
        if ft.alpha <= 0:
            raise LmlabError(f"train.finetune.alpha = {ft.alpha} must be positive (e.g. 2 x r).")
        if not 0.0 <= ft.dropout < 1.0:
            raise LmlabError(f"train.finetune.dropout = {ft.dropout} must be in [0, 1).")
        if not ft.target_modules:
            raise LmlabError("train.finetune.target_modules is empty: name the linear layers "
                             f"to adapt, e.g. {LORA_TARGETS}.")
        if t.parallel == "fsdp":
            raise LmlabError("train.finetune.method=lora is not supported with "
                             "train.parallel=fsdp; use train.parallel=ddp (LoRA's optimizer "
                             "state is small, so replicating it costs little).")
    if t.activation_checkpointing:
        if not imported:
            raise LmlabError("train.activation_checkpointing works for imported models "
                             "(model.model_name); the from-scratch model does not support it.")
        if t.parallel == "fsdp":
            raise LmlabError("train.activation_checkpointing is not supported with "
                             "train.parallel=fsdp; use train.parallel=ddp.")
        stateful = [h.get("name") for h in cfg.hooks.forward
                    if isinstance(h, dict) and h.get("name") in ("record", "add_noise")]
        if stateful:
            raise LmlabError(
                f"hooks.forward {stateful[0]} keeps state across calls, and with "
                "train.activation_checkpointing every block's forward hooks run a second time "
                "in backward (the recomputation), so it would record twice or draw other "
                "noise. Turn train.activation_checkpointing off for this run.")


def check_hook_entry(kind: str, entry: Any, where: str) -> None:
    """The types of a hook entry's own fields (its parameters are checked by the hook itself)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise LmlabError(f"{where} = {entry!r} must be a mapping with a 'name' (a hook's name), "
                         "e.g. {name: scale, at: blocks.0.hook_resid_post, factor: 0.5}.")
    at = entry.get("at")
    if at is not None and not isinstance(at, str):
        raise LmlabError(
            f"{where} ('{entry['name']}'): 'at' = {at!r} must be one hook point name or glob "
            "as a string, e.g. 'blocks.*.hook_resid_post'; for several points use a glob or "
            "one entry per point."
        )
    weight = entry.get("weight", 1.0)
    if kind == "aux_losses" and (not isinstance(weight, int | float) or isinstance(weight, bool)):
        raise LmlabError(f"{where} ('{entry['name']}'): weight = {weight!r} must be a number.")


# --- loading and overrides ------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (['a', 'b'], value), the value parsed as YAML so `0.5`, `null`, `[1]` work."""
    if "=" not in text:
        raise LmlabError(f"--set expects key=value (like train.lr=3e-4), got '{text}'.")
    key, _, raw = text.partition("=")
    value = load_yaml(raw) if raw.strip() else ""
    if isinstance(value, str):  # YAML reads 3e-4 as a string; numbers are friendlier
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise LmlabError(f"--set {text}: '{k}' is not a section.")
        node[keys[-1]] = value
    return raw


def resolve_config_path(name_or_path: str | None) -> Path:
    """A file path, or the name of a ready config in configs/ (with or without .yaml)."""
    if name_or_path is None:
        name_or_path = DEFAULT_CONFIG
    p = Path(name_or_path)
    if p.is_file():
        return p
    for candidate in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    ready = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))
    raise LmlabError(
        f"Config '{name_or_path}' not found: it is neither a file nor a ready config. "
        f"Ready configs: {', '.join(ready)}."
    )


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last,
    silently) and reads `1e-4` as the number it is (YAML 1.2's float, not 1.1's string)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (lines {seen[key]} and {line}); "
                    "YAML would silently keep only the last: remove or rename one",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)


StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """Parse YAML the one way lmlab does (StrictLoader); yaml.YAMLError on bad input."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = load_yaml(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise LmlabError(f"Config file {path} is not UTF-8 text (byte {e.start}); save it as "
                         "UTF-8.") from None
    except yaml.YAMLError as e:
        raise LmlabError(f"Config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise LmlabError(f"Config file {path} must hold a mapping of sections.")
    return raw


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_raw(name_or_path: str | None, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping with its `base:` chain merged in (the file wins over its base).

    A base is a path (relative to the file that names it) or a ready config's name.
    """
    path = resolve_config_path(name_or_path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise LmlabError(f"Config files inherit from each other in a cycle: {chain}. "
                         "Remove one of these `base:` lines.")
    raw = read_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise LmlabError(f"`base:` in {path} must be a config name or path, not {base!r}.")
    near = path.parent / base
    return deep_merge(load_raw(str(near) if near.is_file() else base, (*_seen, path)), raw)


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    return from_dict(apply_overrides(load_raw(name_or_path), overrides or []))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def diff_configs(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Lines `key: a -> b` for every leaf that differs."""
    lines = []
    for key in sorted(set(a) | set(b)):
        path = f"{prefix}{key}"
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            lines += diff_configs(va, vb, path + ".")
        elif va != vb:
            lines.append(f"{path}: {va!r} -> {vb!r}")
    return lines
