"""A run's state: built fresh from a config, or restored from a typed checkpoint.

`build(cfg, checkpoint)` makes everything a run holds between steps, in an
order that fixes the random draws (seed, data, model init, optimizer, sampler),
then, on resume, checks that the checkpoint's set-up is this one and restores
weights, optimizer, step, every RNG, the sampler position, the state of
stateful hooks and the clock. So N steps straight and N/2 + resume + N/2 give
the same losses step for step. `RunState.checkpoint()` captures the same things
back into a `Checkpoint`.

A checkpoint file is loaded and hash-checked once (`Checkpoint.load`); the CLI
hands that object to `config_for_resume` and to the Trainer.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmlab import records
from lmlab.config import Config, apply_overrides, diff_configs, from_dict
from lmlab.data.batcher import RandomBatcher
from lmlab.data.dataset import PreparedData, load_prepared
from lmlab.device import autocast, resolve_device, resolve_dtype
from lmlab.errors import LmlabError
from lmlab.hooks.manager import ExperimentHooks
from lmlab.model.adapters import adapter_from_checkpoint
from lmlab.model.adapters.base import BaseAdapter
from lmlab.model.build import build_adapter
from lmlab.model.checkpoint import (
    FORMAT,
    VERSION,
    checkpoint_path,
    load_checkpoint,
    prune_checkpoints,
)
from lmlab.model.finetune import check_resume as check_finetune_resume
from lmlab.model.finetune import speed_choices, use_activation_checkpointing
from lmlab.train import distributed
from lmlab.train.distributed import DistInfo
from lmlab.train.optim import build_optimizer, lr_multiplier
from lmlab.train.telemetry import Telemetry
from lmlab.train.tensorboard import TensorBoardLog


@dataclass
class Checkpoint:
    """One checkpoint's content, typed. `to_dict()` gives the file's keys as they always were.

    `version` is the file format's (model/checkpoint.py). Every field a file
    written by an older lmlab may lack has the default that file implies, so
    `from_dict` reads every checkpoint ever written.
    """

    model: dict[str, Any]
    optimizer: dict[str, Any]
    step: int
    rng: dict[str, Any]
    config: dict[str, Any]
    run_id: str
    model_config: dict[str, Any]
    model_meta: dict[str, Any]
    sampler: list[Any] = field(default_factory=lambda: [None])  # one state per rank
    hooks: list[dict[str, Any]] = field(default_factory=lambda: [{}])  # one state per rank
    best_val: float = math.inf
    plugins: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0
    data_hash: str | None = None
    saved_at: str | None = None
    format: str = FORMAT
    version: int = VERSION
    path: str | None = None  # where it was loaded from (not saved)
    sha256: str | None = None  # set by the writer, checked by the loader
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a newer writer, kept as they are

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Checkpoint:
        """A checkpoint's dict (the 17 keys every lmlab so far wrote, or fewer) -> Checkpoint."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        for key in ("sampler", "hooks", "best_val", "plugins", "elapsed_s"):
            if known.get(key) is None:  # absent or null in an older file: the default
                known.pop(key, None)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in known
                   and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise LmlabError(f"Checkpoint {d.get('path', '')} lacks {', '.join(missing)}: it "
                             "holds weights only, not a run to resume (start a new run).")
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        """Load a checkpoint file (or a run's newest), refusing a corrupt one (its sha256)."""
        return cls.from_dict(load_checkpoint(path))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d = {k: v for k, v in d.items() if not (k in ("path", "sha256") and v is None)}
        return {**d, **self.extra}

    def loop_state(self) -> dict[str, Any]:
        """What the loop adds to the adapter's part of a checkpoint (save_checkpoint's state)."""
        d = self.to_dict()
        for key in ("format", "version", "model_config", "model_meta", "path", "sha256"):
            d.pop(key, None)
        return d

    def of_rank(self, states: list[Any], rank: int) -> Any:
        """A rank's entry of a per-rank list (the last one for ranks the run did not have)."""
        return states[min(rank, len(states) - 1)]


@dataclass(eq=False)
class RunState:
    """Everything a run holds between steps. The loop advances `step`; observers read it."""

    cfg: Config
    dist: DistInfo
    device: torch.device
    dtype: str
    data: PreparedData
    adapter: BaseAdapter
    model: torch.nn.Module  # the adapter, wrapped for DDP/FSDP and compiled as config says
    hooks: ExperimentHooks
    optimizer: torch.optim.Optimizer
    lr_mult: Callable[..., float]
    batcher: RandomBatcher
    run_id: str
    run_dir: Path
    metrics: records.MetricsLog
    tb: TensorBoardLog
    telemetry: Telemetry
    step: int = 0
    best_val: float = math.inf
    last_val: float | None = None
    elapsed_before: float = 0.0  # training wall time of earlier sessions (resume continues it)
    t0: float | None = None  # when this session's loop started
    changes: list[str] = field(default_factory=list)  # config changes accepted on resume
    skipped: int = 0  # updates skipped for a non-finite loss or gradient
    skips_in_row: int = 0
    out_of_time: bool = False
    fused_loss: bool = False  # the model returns the loss itself (chunked head, no logits)
    speed: list[str] = field(default_factory=list)  # what an imported model's step chose

    def clock(self) -> float:
        """Seconds of training loop so far, over every session of this run."""
        return self.elapsed_before + (time.perf_counter() - self.t0 if self.t0 else 0.0)

    def lr(self) -> float:
        """This step's learning rate: the schedule at the step, or at the budget's fraction used."""
        budget = self.cfg.train.time_budget_s
        return self.cfg.train.lr * self.lr_mult(self.step, budget and self.clock() / budget)

    def checkpoint(self) -> Checkpoint:
        """The run as it stands, gathered from every rank (every rank must call it)."""
        samplers = self.dist.gather_objects(self.batcher.state_dict())
        hook_states = self.dist.gather_objects(self.hooks.state_dict())
        weights = self.dist.full_state(self.adapter.trained_state())
        optimizer = self.dist.full_state(self.optimizer.state_dict())
        return Checkpoint(
            model=weights, optimizer=optimizer, step=self.step, rng=rng_state(self.device),
            sampler=samplers, hooks=hook_states, config=self.cfg.to_dict(), run_id=self.run_id,
            best_val=self.best_val, plugins=self.hooks.plugins, elapsed_s=self.clock(),
            data_hash=self.data.meta.get("data_hash"),
            saved_at=dt.datetime.now().isoformat(timespec="seconds"),
            model_config=self.adapter.get_config(), model_meta=dict(self.adapter.meta))


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def build(cfg: Config, checkpoint: Checkpoint | None = None,
          allow_config_change: bool = False) -> RunState:
    """A run's state from its config; with a checkpoint, restored to where that one stopped."""
    t = cfg.train
    dist = distributed.setup(t.device, t.parallel)
    device = dist.device or resolve_device(t.device)
    dtype = resolve_dtype(t.dtype, device)
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(cfg.run.seed)
    data = load_prepared(cfg.data.path)
    adapter = _adapter(cfg, data, checkpoint)
    fused_loss = t.fused_loss and getattr(adapter, "fuses_loss", False)
    speed = speed_choices(adapter, dtype, fused_loss, t.compile)  # [] for a from-scratch model
    if not dist.sharded:  # FSDP moves each rank's shards to its device itself
        adapter.to(device)
    hooks = ExperimentHooks(cfg.hooks, adapter)
    model = dist.wrap(adapter)
    if t.compile and not speed:  # an imported model compiles per block (speed_choices)
        model = torch.compile(model)
    optimizer = build_optimizer(adapter, t, device)
    batcher = RandomBatcher(data.train, cfg.data.block_size, t.batch_size, device, cfg.run.seed,
                            dist.rank)
    parts = dict(cfg=cfg, dist=dist, device=device, dtype=dtype, data=data, adapter=adapter,
                 model=model, hooks=hooks, optimizer=optimizer, lr_mult=lr_multiplier(t),
                 batcher=batcher)
    if checkpoint is not None:
        resumed = restore(parts, checkpoint, allow_config_change)
        run_id, run_dir = checkpoint.run_id, Path(checkpoint.path or ".").parents[1]
    else:
        resumed, run_id = {}, records.new_run_id(cfg.run.name, cfg.hash(), Path(cfg.run.out_dir))
    run_id = dist.broadcast_str(run_id)
    if checkpoint is None:
        run_dir = Path(cfg.run.out_dir) / run_id
    tb = TensorBoardLog(run_dir / "tb", dist.is_main and cfg.run.tensorboard,
                        resumed_at=resumed.get("step", 0))
    metrics = records.MetricsLog(run_dir / "metrics.jsonl", dist.is_main, tb)
    telemetry = Telemetry(cfg.telemetry, adapter, dist, metrics, tb.histogram,
                          lambda: autocast(device, dtype))
    return RunState(**parts, **resumed, run_id=run_id, run_dir=run_dir, metrics=metrics, tb=tb,
                    telemetry=telemetry, fused_loss=fused_loss, speed=speed)


def _adapter(cfg: Config, data: PreparedData, checkpoint: Checkpoint | None) -> BaseAdapter:
    """The model: the checkpoint's, or a new one (its init draws from the seeded RNG)."""
    if checkpoint is not None:
        check_finetune_resume(checkpoint.model_meta, cfg.train.finetune)
        adapter = adapter_from_checkpoint(checkpoint.to_dict())
        adapter.block_size = cfg.data.block_size
    else:
        adapter = build_adapter(cfg, data.meta["vocab_size"])
    check_data_fits(cfg, data, adapter)
    if cfg.train.activation_checkpointing:
        use_activation_checkpointing(adapter)
    if cfg.model.dtype != "float32":
        adapter.to(getattr(torch, cfg.model.dtype))
    return adapter


def restore(parts: dict[str, Any], ckpt: Checkpoint, allow_config_change: bool
            ) -> dict[str, Any]:
    """Check the resume; load optimizer, sampler, RNG and hook states; RunState's other fields."""
    cfg, dist, hooks = parts["cfg"], parts["dist"], parts["hooks"]
    changes = check_resume(ckpt, cfg, hooks, parts["data"].meta.get("data_hash"),
                           dist.world_size, allow_config_change)
    optimizer = parts["optimizer"]
    optimizer.load_state_dict(dist.shard_optimizer_state(ckpt.optimizer, optimizer))
    parts["batcher"].load_state_dict(ckpt.of_rank(ckpt.sampler, dist.rank))
    set_rng_state(ckpt.rng, parts["device"])
    hooks.load_state_dict(ckpt.of_rank(ckpt.hooks or [{}], dist.rank))
    return {"step": ckpt.step, "best_val": ckpt.best_val, "elapsed_before": ckpt.elapsed_s,
            "changes": changes}


def check_data_fits(cfg: Config, data: PreparedData, adapter: BaseAdapter) -> None:
    spec = adapter.tokenizer.spec()
    if data.meta["tokenizer"] != spec:
        raise LmlabError(
            f"The data in {cfg.data.path} was tokenized with "
            f"{data.meta['tokenizer'].get('kind')} tokenizer "
            f"{data.meta['tokenizer'].get('model_name') or ''} but the model uses "
            f"{spec.get('kind')} {spec.get('model_name') or ''}. Prepare the data for this "
            "model: `lmlab prepare --out DIR` (character model) or "
            "`lmlab prepare --tokenizer MODEL_NAME --out DIR` (imported model)."
        )
    for split in ("train", "val"):
        n = len(getattr(data, split))
        if n < cfg.data.block_size + 1:
            raise LmlabError(
                f"The {split} split of {cfg.data.path} has {n} tokens, fewer than one "
                f"window of data.block_size={cfg.data.block_size} needs. Use more text or "
                "a smaller data.block_size."
            )


def check_resume(ckpt: Checkpoint, cfg: Config, hooks: ExperimentHooks, data_hash: str | None,
                 world_size: int, allow: bool) -> list[str]:
    """Differences between the checkpoint's set-up and this one; refused unless allowed."""
    try:  # keys added since it was saved read as their defaults
        saved = from_dict(ckpt.config).to_dict()
    except LmlabError as e:
        raise LmlabError(f"The config saved in {ckpt.path} is not valid in this lmlab ({e}); "
                         "it cannot be compared with this run's: start a new run.") from None
    changes = diff_configs(saved, cfg.to_dict())
    saved_hooks = (ckpt.hooks or [{}])[0]
    changes += [f"hook {key}: the checkpoint holds no state for it (it would start afresh)"
                for key in hooks.state_keys() if key not in saved_hooks]
    if ckpt.data_hash != data_hash:  # same path, but the corpus was prepared anew
        changes.append(f"data hash: {ckpt.data_hash} -> {data_hash}")
    saved_world = len(ckpt.sampler or [None])
    if saved_world != world_size:
        changes.append(f"world size: {saved_world} -> {world_size} processes (the effective "
                       "batch is batch_size x grad_accum x world size)")
    old, new = ckpt.plugins, hooks.plugins
    for path in sorted(set(old) | set(new)):
        if old.get(path) != new.get(path):
            changes.append(f"plugin {path}: sha256 {old.get(path, '<absent>')} -> "
                           f"{new.get(path, '<absent>')}")
    if changes and not allow:
        raise LmlabError(
            "Refusing to resume: this set-up differs from the checkpoint's, so the run would "
            "silently mix two experiments:\n  " + "\n  ".join(changes) +
            "\nResume with the checkpoint's own config (no --config/--set), start a new run, "
            "or pass --allow-config-change to record the change in the manifest."
        )
    return changes


def config_for_resume(checkpoint: Checkpoint | str, base: dict[str, Any] | None,
                      overrides: list[str]) -> Config:
    """The config a resume runs with: the checkpoint's own, unless a config file is given."""
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = Checkpoint.load(checkpoint)
    raw = base if base is not None else checkpoint.config
    return from_dict(apply_overrides(raw, overrides))


def save(state: RunState) -> Path:
    """Write this step's checkpoint (rank 0) and keep the newest few; every rank calls it."""
    path = checkpoint_path(state.run_dir, state.step)
    ckpt = state.checkpoint()
    error = None
    if state.dist.is_main:
        try:
            state.adapter.save_checkpoint(path, **ckpt.loop_state())
            prune_checkpoints(path.parent, state.cfg.train.keep_checkpoints)
        except Exception as e:  # every rank must stop, not wait for rank 0 at the barrier
            error = e
    if state.dist.any_rank(error is not None):
        raise error or LmlabError(f"Rank 0 could not write {path}; its message says why.")
    state.dist.barrier()
    return path
