"""The training loop: forward -> loss (+ aux losses) -> backward -> update -> log/eval/save.

It sees models only through BaseAdapter and experiments only through
ExperimentHooks, so neither a new architecture nor a new learning rule edits it.
Resuming restores weights, optimizer, step, every RNG, the sampler position and
the state of stateful hooks, so N steps straight and N/2 + resume + N/2 give the
same losses step for step.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lmlab import records as mf
from lmlab.config import Config, diff_configs, dump_yaml, from_dict
from lmlab.data.batcher import RandomBatcher
from lmlab.data.dataset import load_prepared
from lmlab.device import autocast, resolve_device, resolve_dtype
from lmlab.errors import LmlabError
from lmlab.eval.metrics import cross_entropy, evaluate
from lmlab.eval.sampling import generate
from lmlab.fileio import atomic_write_text, clean_stale_temps
from lmlab.hooks.manager import ExperimentHooks
from lmlab.model.adapters import adapter_from_checkpoint
from lmlab.model.build import build_adapter
from lmlab.model.checkpoint import checkpoint_path, load_checkpoint, prune_checkpoints
from lmlab.model.finetune import check_resume, speed_choices, use_activation_checkpointing
from lmlab.train import distributed, faults
from lmlab.train.optim import build_optimizer, lr_multiplier, set_lr
from lmlab.train.telemetry import Telemetry
from lmlab.train.tensorboard import TensorBoardLog


class NonFiniteLoss(LmlabError):
    pass


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _with_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config with keys added since it was saved at their defaults."""
    try:
        return from_dict(raw).to_dict()
    except LmlabError:
        return raw


def _check_resume(ckpt: dict, cfg: Config, hooks: ExperimentHooks, data_hash: str | None,
                  world_size: int, allow: bool) -> list[str]:
    """Differences between the checkpoint's set-up and this one; refused unless allowed."""
    changes = diff_configs(_with_defaults(ckpt["config"]), cfg.to_dict())
    saved_hooks = (ckpt.get("hooks") or [{}])[0]
    changes += [f"hook {key}: the checkpoint holds no state for it (it would start afresh)"
                for key in hooks.state_keys() if key not in saved_hooks]
    plugins = hooks.plugins
    if ckpt.get("data_hash") != data_hash:  # same path, but the corpus was prepared anew
        changes.append(f"data hash: {ckpt.get('data_hash')} -> {data_hash}")
    saved_world = len(ckpt.get("sampler") or [None])  # one sampler state per rank
    if saved_world != world_size:
        changes.append(f"world size: {saved_world} -> {world_size} processes (the effective "
                       "batch is batch_size x grad_accum x world size)")
    old_plugins = ckpt.get("plugins", {})
    for path in sorted(set(old_plugins) | set(plugins)):
        if old_plugins.get(path) != plugins.get(path):
            changes.append(f"plugin {path}: sha256 {old_plugins.get(path, '<absent>')} -> "
                           f"{plugins.get(path, '<absent>')}")
    if changes and not allow:
        raise LmlabError(
            "Refusing to resume: this set-up differs from the checkpoint's, so the run would "
            "silently mix two experiments:\n  " + "\n  ".join(changes) +
            "\nResume with the checkpoint's own config (no --config/--set), start a new run, "
            "or pass --allow-config-change to record the change in the manifest."
        )
    return changes


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None,
                 allow_config_change: bool = False, progress: bool = True,
                 manifest: dict[str, Any] | None = None) -> None:
        """`manifest`: extra fields for the run's manifest (e.g. a sweep's variant and seed)."""
        self.cfg, t = cfg, cfg.train
        self.manifest_extra = dict(manifest or {})
        self.dist = distributed.setup(t.device, t.parallel)
        self.device = self.dist.device or resolve_device(t.device)
        self.dtype = resolve_dtype(t.dtype, self.device)
        if t.threads:
            torch.set_num_threads(t.threads)
        torch.manual_seed(cfg.run.seed)
        self.data = load_prepared(cfg.data.path)
        ckpt = load_checkpoint(resume) if resume else None
        if ckpt is not None:
            check_resume(ckpt["model_meta"], t.finetune)
            self.adapter = adapter_from_checkpoint(ckpt)
            self.adapter.block_size = cfg.data.block_size
        else:
            self.adapter = build_adapter(cfg, self.data.meta["vocab_size"])
        self._check_data_fits()
        if t.activation_checkpointing:
            use_activation_checkpointing(self.adapter)
        if cfg.model.dtype != "float32":
            self.adapter.to(getattr(torch, cfg.model.dtype))
        self.fused_loss = t.fused_loss and getattr(self.adapter, "fuses_loss", False)
        self.speed = speed_choices(self.adapter, self.dtype, self.fused_loss)  # [] if from scratch
        if self.speed:
            self.manifest_extra["speed"] = self.speed
            if progress and self.dist.is_main:
                print("fine-tuning step: " + "; ".join(self.speed), flush=True)
        if not self.dist.sharded:  # FSDP moves each rank's shards to its device itself
            self.adapter.to(self.device)
        self.hooks = ExperimentHooks(cfg.hooks, self.adapter)
        self.model = self.dist.wrap(self.adapter)
        if t.compile:
            self.model = torch.compile(self.model)
        self.optimizer = build_optimizer(self.adapter, t, self.device)
        self.lr_mult = lr_multiplier(t)
        self.batcher = RandomBatcher(self.data.train, cfg.data.block_size, t.batch_size,
                                     self.device, cfg.run.seed, self.dist.rank)
        self.step, self.best_val, self.last_val = 0, math.inf, None
        self.elapsed_before = 0.0  # training wall time of earlier sessions (resume continues it)
        self.t0: float | None = None  # when this session's loop started
        self.progress = progress and self.dist.is_main
        self.changes: list[str] = []
        if ckpt is not None:
            self.changes = _check_resume(ckpt, cfg, self.hooks,
                                         self.data.meta.get("data_hash"),
                                         self.dist.world_size, allow_config_change)
            self.optimizer.load_state_dict(
                self.dist.shard_optimizer_state(ckpt["optimizer"], self.optimizer))
            self.batcher.load_state_dict(ckpt["sampler"][min(self.dist.rank,
                                                             len(ckpt["sampler"]) - 1)])
            _set_rng_state(ckpt["rng"], self.device)
            hook_states = ckpt.get("hooks") or [{}]  # one per rank, as the sampler's
            self.hooks.load_state_dict(hook_states[min(self.dist.rank, len(hook_states) - 1)])
            self.step, self.best_val = ckpt["step"], ckpt.get("best_val", math.inf)
            self.elapsed_before = ckpt.get("elapsed_s", 0.0)
            self.run_id, self.run_dir = ckpt["run_id"], Path(ckpt["path"]).parents[1]
        else:
            self.run_id = mf.new_run_id(cfg.run.name, cfg.hash(), Path(cfg.run.out_dir))
        self.run_id = self.dist.broadcast_str(self.run_id)
        if ckpt is None:
            self.run_dir = Path(cfg.run.out_dir) / self.run_id
        self.tb = TensorBoardLog(self.run_dir / "tb", self.dist.is_main and cfg.run.tensorboard,
                                 resumed_at=self.step)
        self.metrics = mf.MetricsLog(self.run_dir / "metrics.jsonl", self.dist.is_main, self.tb)
        self.telemetry = Telemetry(cfg.telemetry, self.adapter, self.dist, self.metrics,
                                   self.tb.histogram, lambda: autocast(self.device, self.dtype))
        self.interrupted = self.out_of_time = False
        self.skipped, self.skips_in_row = 0, 0  # updates skipped for a non-finite loss/gradient

    def _check_data_fits(self) -> None:
        spec = self.adapter.tokenizer.spec()
        if self.data.meta["tokenizer"] != spec:
            raise LmlabError(
                f"The data in {self.cfg.data.path} was tokenized with "
                f"{self.data.meta['tokenizer'].get('kind')} tokenizer "
                f"{self.data.meta['tokenizer'].get('model_name') or ''} but the model uses "
                f"{spec.get('kind')} {spec.get('model_name') or ''}. Prepare the data for this "
                "model: `lmlab prepare --out DIR` (character model) or "
                "`lmlab prepare --tokenizer MODEL_NAME --out DIR` (imported model)."
            )
        for split in ("train", "val"):
            n = len(getattr(self.data, split))
            if n < self.cfg.data.block_size + 1:
                raise LmlabError(
                    f"The {split} split of {self.cfg.data.path} has {n} tokens, fewer than one "
                    f"window of data.block_size={self.cfg.data.block_size} needs. Use more text or "
                    "a smaller data.block_size."
                )

    # --- bookkeeping -----------------------------------------------------------------

    def _manifest(self, status: str, extra: dict[str, Any] | None = None) -> None:
        if not self.dist.is_main:
            return
        path = self.run_dir / "manifest.json"
        try:
            m = mf.read_manifest(self.run_dir) if path.exists() else {}
        except LmlabError as e:
            mf.warn(f"{e} Writing a new one.")
            m = {}
        cfg = self.cfg
        m.update({
            "run_id": self.run_id, "status": status,
            "updated_at": dt.datetime.now().isoformat(timespec="seconds"),
            "config": cfg.to_dict(), "config_hash": cfg.hash(), "base_hash": cfg.base_hash(),
            "data_hash": self.data.meta.get("data_hash"), "data_path": cfg.data.path,
            "hooks": self.hooks.describe(), "plugins": self.hooks.plugins,
            "model": {**self.adapter.meta, "params": self.adapter.num_params(),
                      "trainable_params": sum(p.numel() for p in self.adapter.parameters()
                                              if p.requires_grad)},
            "code": mf.code_version(), "libraries": mf.library_versions(),
            "seed": cfg.run.seed, "device": str(self.device), "dtype": self.dtype,
            "world_size": self.dist.world_size, "pid": os.getpid(),
            "host": socket.gethostname(),
        })
        m.setdefault("created_at", m["updated_at"])
        m.update({**self.manifest_extra, **(extra or {})})
        mf.write_json(path, m)

    def save(self) -> Path:
        path = checkpoint_path(self.run_dir, self.step)
        samplers = self.dist.gather_objects(self.batcher.state_dict())
        hook_states = self.dist.gather_objects(self.hooks.state_dict())
        weights = self.dist.full_state(self.adapter.trained_state())
        optimizer = self.dist.full_state(self.optimizer.state_dict())
        error = None
        if self.dist.is_main:
            try:
                self.adapter.save_checkpoint(
                    path, model=weights, optimizer=optimizer, step=self.step,
                    rng=_rng_state(self.device), sampler=samplers, hooks=hook_states,
                    config=self.cfg.to_dict(),
                    run_id=self.run_id, best_val=self.best_val, plugins=self.hooks.plugins,
                    elapsed_s=self.clock(), data_hash=self.data.meta.get("data_hash"),
                    saved_at=dt.datetime.now().isoformat(timespec="seconds"))
                prune_checkpoints(path.parent, self.cfg.train.keep_checkpoints)
            except Exception as e:  # every rank must stop, not wait for rank 0 at the barrier
                error = e
        if self.dist.any_rank(error is not None):
            raise error or LmlabError(f"Rank 0 could not write {path}; its message says why.")
        self.dist.barrier()
        return path

    def evaluate(self) -> dict[str, float]:
        meta = self.data.meta
        cpt = meta.get("val_chars", len(self.data.val)) / max(1, meta.get("val_tokens", 1))
        result = evaluate(self.adapter, self.data.val, self.cfg.data.block_size,
                          self.cfg.train.batch_size, self.device, self.dtype,
                          self.cfg.train.eval_batches and
                          self.cfg.train.eval_batches * self.cfg.train.batch_size, cpt)
        self.best_val = min(self.best_val, result["val_loss"])
        return result

    def clock(self) -> float:
        """Seconds of training loop so far, over every session of this run."""
        return self.elapsed_before + (time.perf_counter() - self.t0 if self.t0 else 0.0)

    def _truncate_metrics(self) -> None:
        """On resume, drop records past the checkpoint, so the log is one consistent curve."""
        path = self.metrics.path
        if not self.dist.is_main or not path.exists():
            return
        kept = [r for r in mf.read_metrics(self.run_dir) if r["step"] <= self.step]
        atomic_write_text(path, "".join(mf.json.dumps(r) + "\n" for r in kept))

    # --- the loop ----------------------------------------------------------------------

    def run(self) -> Path:
        cfg, t = self.cfg, self.cfg.train
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for folder in (self.run_dir, self.run_dir / "checkpoints"):
                clean_stale_temps(folder)
            atomic_write_text(self.run_dir / "config.yaml", dump_yaml(cfg))
            self._truncate_metrics()
        resumed = self.step > 0
        extra = {}
        if resumed and self.dist.is_main:
            try:
                m = mf.read_manifest(self.run_dir)
            except LmlabError:
                m = {}
            extra["resumes"] = m.get("resumes", []) + [{
                "at_step": self.step, "config_changes": self.changes,
                "time": dt.datetime.now().isoformat(timespec="seconds")}]
        self._manifest("running", extra)
        tokens_per_step = t.batch_size * t.grad_accum * cfg.data.block_size * self.dist.world_size
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        self.hooks.attach(self.run_dir)
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not self.progress,
                   dynamic_ncols=True, unit="step")
        status, started = "finished", self.step
        self.t0 = t0 = time.perf_counter()
        budget, clock = t.time_budget_s, self.clock
        self.out_of_time = bool(budget) and clock() >= budget  # a resume after the budget
        # tokens/s counts time in training steps only, not evaluation or checkpointing
        step_time, window_time, step_window = 0.0, 0.0, self.step
        last_loss = math.nan
        try:
            if self.step == 0:  # the starting point of the curve: what training improves on
                self._eval_and_log(0.0)
                if t.sample_every:
                    self._write_sample()
            self.model.train()
            while self.step < t.max_steps and not self.out_of_time:
                if self.dist.any_rank(self.interrupted):  # all ranks stop at the same step
                    self.interrupted = True
                    break
                lr = t.lr * self.lr_mult(self.step, budget and clock() / budget)
                set_lr(self.optimizer, lr)
                t_step = time.perf_counter()
                loss, aux = self._train_step()
                elapsed = time.perf_counter() - t_step
                step_time, window_time = step_time + elapsed, window_time + elapsed
                self.step += 1
                last_loss = loss
                bar.update(1)
                # every rank stops at the same step: rank 0's clock decides
                self.out_of_time = bool(budget) and self.dist.any_rank(
                    self.dist.is_main and clock() >= budget)
                last = self.step == t.max_steps or self.out_of_time
                if self.step % t.log_every == 0 or last:
                    tps = tokens_per_step * (self.step - step_window) / max(window_time, 1e-9)
                    window_time, step_window = 0.0, self.step
                    self.metrics.write(kind="train", step=self.step, loss=loss, lr=lr,
                                       tokens_per_s=round(tps),
                                       time=round(clock(), 3))
                    for name, value in aux.items():
                        self.metrics.write(kind="aux", step=self.step, name=name, value=value)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                if self.step % t.eval_every == 0 or last:
                    self._eval_and_log(clock())
                if t.sample_every and self.step % t.sample_every == 0:
                    self._write_sample()
                if self.step % t.checkpoint_every == 0 and not last:
                    self.save()
            if self.interrupted:
                status = "interrupted"
            self.save()
        except BaseException as e:
            status = "failed"
            err = faults.explain(e, self.step + 1, self.hooks, self.run_dir / "checkpoints")
            if err is e:
                raise
            raise err from e
        finally:
            bar.close()
            self.hooks.detach()
            self.telemetry.close()
            signal.signal(signal.SIGINT, previous)
            wall = time.perf_counter() - t0
            steps_done = self.step - started
            try:
                self._manifest(status, {"final": {
                    "step": self.step, "train_loss": last_loss, "best_val_loss": self.best_val,
                    "last_val_loss": self.last_val, "nonfinite_skips": self.skipped,
                    "tokens_per_s": round(tokens_per_step * steps_done / step_time)
                    if steps_done else None,
                    "wall_s": round(wall, 2), "train_clock_s": round(clock(), 2),
                    "stopped_by": "time_budget" if self.out_of_time else None}})
            except OSError as e:
                if status != "failed":
                    raise
                mf.warn(f"could not record status 'failed' in the manifest: {e}")
            finally:
                self.tb.close()
                self.dist.cleanup(ok=status != "failed")
        return self.run_dir

    def _train_step(self) -> tuple[float, dict[str, float]]:
        t = self.cfg.train
        total_loss, aux_totals = 0.0, {}
        probe = self.telemetry.probe(self.step + 1)  # hooks on for this step, if it is due
        for micro in range(t.grad_accum):
            x, y = self.batcher.next()
            with self.dist.no_sync(self.model, last=micro == t.grad_accum - 1):
                with autocast(self.device, self.dtype):
                    out = self.model(x, targets=y) if self.fused_loss else self.model(x)
                loss = out if self.fused_loss else cross_entropy(out, y)
                aux = self.hooks.aux_losses()
                total = loss + sum(aux.values()) if aux else loss
                value = loss.item()
                checked = value if total is loss else total.item()
                bad = not math.isfinite(checked)
                if self.dist.any_rank(bad):
                    what = "loss" if total is loss else "loss with aux losses"
                    return self._nonfinite(what, checked if bad else "non-finite on another "
                                           "rank"), {}
                (total / t.grad_accum).backward()
            total_loss += value / t.grad_accum
            for name, v in aux.items():
                aux_totals[name] = aux_totals.get(name, 0.0) + v.item() / t.grad_accum
        probe.before_update(x)
        if t.grad_clip:  # the norm comes free with clipping; without it, one pass more
            norm = torch.nn.utils.clip_grad_norm_(self.adapter.parameters(), t.grad_clip)
        else:
            norm = _grad_norm(self.adapter)
        if self.hooks.update_fns:  # they may change the gradient: check what the update uses
            self.hooks.transform_grads(self.step, self.optimizer.param_groups[0]["lr"])
            norm = _grad_norm(self.adapter)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if self.dist.any_rank(not bool(torch.isfinite(norm))):
            return self._nonfinite("gradient norm", norm.item()), {}
        self.optimizer.step()
        probe.after_update()
        self.optimizer.zero_grad(set_to_none=True)
        self.skips_in_row = 0
        return total_loss, aux_totals

    def _nonfinite(self, what: str, value: Any) -> float:
        """Stop, or (train.on_nonfinite=skip) drop this update and count it; the step's loss."""
        t = self.cfg.train
        self.optimizer.zero_grad(set_to_none=True)
        advice = ("Lower train.lr, enable train.grad_clip, check the hooks in force, or set "
                  "train.on_nonfinite=skip to skip such updates.")
        if t.on_nonfinite == "stop":
            raise NonFiniteLoss(
                f"The {what} became {value} at step {self.step + 1}; stopping before the update "
                f"so no weights are damaged. {faults.last_good(self.run_dir / 'checkpoints')} "
                + advice)
        self.skipped, self.skips_in_row = self.skipped + 1, self.skips_in_row + 1
        self.metrics.write(kind="skipped", step=self.step + 1, reason=f"{what} {value}")
        if self.skips_in_row >= t.max_nonfinite_skips:
            raise NonFiniteLoss(
                f"{self.skips_in_row} updates in a row were skipped for a non-finite loss or "
                f"gradient (the last: {what} {value} at step {self.step + 1}); stopping, as "
                f"train.max_nonfinite_skips={t.max_nonfinite_skips} says. "
                f"{faults.last_good(self.run_dir / 'checkpoints')} " + advice)
        return math.nan

    def _eval_and_log(self, elapsed: float) -> None:
        # a sharded model needs every rank for a forward pass; a replicated one only rank 0
        if self.dist.is_main or self.dist.sharded:
            result = self.evaluate()
            self.last_val = result["val_loss"]
            self.metrics.write(kind="eval", step=self.step, time=round(elapsed, 3), **result)
            if self.progress:
                tqdm.write(f"step {self.step}: val loss {result['val_loss']:.4f}, "
                           f"bpc {result['val_bpc']:.3f}")
        self.dist.barrier()

    def _write_sample(self) -> None:
        if not (self.dist.is_main or self.dist.sharded):
            return
        tok = self.adapter.tokenizer
        # an imported model samples under the run's autocast: its frozen weights may be bf16
        with autocast(self.device, self.dtype) if self.speed else contextlib.nullcontext():
            text = tok.decode(generate(self.adapter, tok.encode("\n"), 200, temperature=0.8,
                                       top_k=40, seed=self.cfg.run.seed))
        if self.dist.is_main:
            with open(self.run_dir / "samples.txt", "a") as f:
                f.write(f"--- step {self.step}\n{text}\n")
            self.tb.text("samples", text, self.step)

    def _on_sigint(self, signum, frame) -> None:
        if self.interrupted:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.interrupted = True
        if self.progress:
            tqdm.write("Interrupted: finishing this step and saving a checkpoint "
                       "(Ctrl-C again to abort without saving).")


def _grad_norm(adapter: torch.nn.Module) -> torch.Tensor:
    grads = [p.grad for p in adapter.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def train(cfg: Config, resume: str | None = None, allow_config_change: bool = False,
          progress: bool = True) -> Path:
    return Trainer(cfg, resume, allow_config_change, progress).run()


def config_for_resume(resume: str, base: dict[str, Any] | None, overrides: list[str]) -> Config:
    """The config a resume runs with: the checkpoint's own, unless a config file is given."""
    from lmlab.config import apply_overrides

    ckpt = load_checkpoint(resume)
    raw = base if base is not None else ckpt["config"]
    return from_dict(apply_overrides(raw, overrides))

