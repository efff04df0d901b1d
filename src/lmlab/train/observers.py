"""What watches a run: its folder, manifest, metrics and progress, evaluation, samples,
checkpoints and telemetry, each one observer reacting to the loop's events.

Events, in order: `on_open` (before the loop: folder, manifest), `on_start`
(inside it, before step 1: the curve's starting point), `on_step` (after each
step), `on_end` (always, with the run's status: finished, interrupted, failed).
A new metric or sink is one more observer in `default_observers`; the loop
does not change.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import time
from typing import Any

from tqdm import tqdm

from lmlab import records
from lmlab.config import SCHEMA_VERSION, dump_yaml
from lmlab.device import autocast
from lmlab.errors import LmlabError
from lmlab.eval.metrics import evaluate
from lmlab.eval.sampling import generate
from lmlab.fileio import atomic_write_text, clean_stale_temps
from lmlab.train.progress import Progress
from lmlab.train.state import RunState, save
from lmlab.train.step import StepResult


class Observer:
    """Does nothing on every event; an observer overrides the events it reacts to."""

    def on_open(self, s: RunState) -> None:
        pass

    def on_start(self, s: RunState) -> None:
        pass

    def on_step(self, s: RunState, result: StepResult, lr: float, last: bool) -> None:
        pass

    def on_end(self, s: RunState, status: str) -> None:
        pass


def default_observers(s: RunState, progress: bool, manifest: dict[str, Any]) -> list[Observer]:
    """The order is the order of their effects at each step: log, evaluate, sample, save."""
    return [RunFolder(), Manifest(s, manifest), Metrics(s, progress), Evaluation(progress),
            Samples(), Checkpoints(), TelemetryClose()]


def tokens_per_step(s: RunState) -> int:
    t = s.cfg.train
    return t.batch_size * t.grad_accum * s.cfg.data.block_size * s.dist.world_size


class RunFolder(Observer):
    """runs/<run_id>/ with config.yaml; on resume, the metrics log cut back to the checkpoint."""

    def on_open(self, s: RunState) -> None:
        if not s.dist.is_main:
            return
        s.run_dir.mkdir(parents=True, exist_ok=True)
        for folder in (s.run_dir, s.run_dir / "checkpoints"):
            clean_stale_temps(folder)
        atomic_write_text(s.run_dir / "config.yaml", dump_yaml(s.cfg))
        path = s.metrics.path
        if path.exists():  # one consistent curve: drop records past the checkpoint
            kept = [r for r in records.read_metrics(s.run_dir) if r["step"] <= s.step]
            atomic_write_text(path, "".join(records.metrics_line(r) for r in kept))


class Manifest(Observer):
    """manifest.json: the set-up, 'running' while it runs, then the status and final figures."""

    def __init__(self, s: RunState, extra: dict[str, Any]) -> None:
        self.extra, self.started = dict(extra), s.step
        self.last_loss, self.step_time = float("nan"), 0.0

    def on_open(self, s: RunState) -> None:
        extra = {}
        if s.step > 0 and s.dist.is_main:
            try:
                m = records.read_manifest(s.run_dir)
            except LmlabError:
                m = {}
            extra["resumes"] = m.get("resumes", []) + [{
                "at_step": s.step, "config_changes": s.changes,
                "time": dt.datetime.now().isoformat(timespec="seconds")}]
        self.write(s, "running", extra)

    def on_step(self, s: RunState, result: StepResult, lr: float, last: bool) -> None:
        self.last_loss, self.step_time = result.loss, self.step_time + result.seconds

    def on_end(self, s: RunState, status: str) -> None:
        done = s.step - self.started
        final = {"step": s.step, "train_loss": self.last_loss, "best_val_loss": s.best_val,
                 "last_val_loss": s.last_val, "nonfinite_skips": s.skipped,
                 "tokens_per_s": round(tokens_per_step(s) * done / self.step_time)
                 if done else None,
                 "wall_s": round(time.perf_counter() - s.t0, 2) if s.t0 else 0.0,
                 "train_clock_s": round(s.clock(), 2),
                 "stopped_by": "time_budget" if s.out_of_time else None}
        try:
            self.write(s, status, {"final": final})
        except OSError as e:
            if status != "failed":
                raise
            records.warn(f"could not record status 'failed' in the manifest: {e}")

    def write(self, s: RunState, status: str, extra: dict[str, Any]) -> None:
        if not s.dist.is_main:
            return
        path = s.run_dir / "manifest.json"
        try:
            m = records.read_manifest(s.run_dir) if path.exists() else {}
        except LmlabError as e:
            records.warn(f"{e} Writing a new one.")
            m = {}
        m.update(self.setup(s, status))
        m.setdefault("created_at", m["updated_at"])
        m.update({**self.extra, **extra})
        records.write_manifest(path, m)

    @staticmethod
    def setup(s: RunState, status: str) -> dict[str, Any]:
        cfg, adapter = s.cfg, s.adapter
        return {
            "run_id": s.run_id, "status": status,
            "updated_at": dt.datetime.now().isoformat(timespec="seconds"),
            "config": cfg.to_dict(), "config_hash": cfg.hash(), "base_hash": cfg.base_hash(),
            "config_schema": SCHEMA_VERSION,
            "data_hash": s.data.meta.get("data_hash"), "data_path": cfg.data.path,
            "hooks": s.hooks.describe(), "plugins": s.hooks.plugins,
            "model": {**adapter.meta, "params": adapter.num_params(),
                      "trainable_params": sum(p.numel() for p in adapter.parameters()
                                              if p.requires_grad)},
            "code": records.code_version(), "libraries": records.library_versions(),
            "seed": cfg.run.seed, "device": str(s.device), "dtype": s.dtype,
            "world_size": s.dist.world_size, "pid": os.getpid(), "host": socket.gethostname(),
            **({"speed": s.speed} if s.speed else {}),
        }


class Metrics(Observer):
    """Train loss, lr, tokens/s and aux losses every log_every steps; the progress bar."""

    def __init__(self, s: RunState, progress: bool) -> None:
        self.progress = progress
        self.window_time, self.window_start = 0.0, s.step  # tokens/s counts step time only

    def on_open(self, s: RunState) -> None:
        if self.progress and s.speed:  # what an imported model's step chose, said once
            print("fine-tuning step: " + "; ".join(s.speed), flush=True)
        self.bar = Progress(s.cfg.train.max_steps, s.step, self.progress,
                            s.cfg.train.time_budget_s, s.clock)

    def on_step(self, s: RunState, result: StepResult, lr: float, last: bool) -> None:
        self.window_time += result.seconds
        self.bar.update(s.step)
        if s.step % s.cfg.train.log_every and not last:
            return
        tps = tokens_per_step(s) * (s.step - self.window_start) / max(self.window_time, 1e-9)
        self.window_time, self.window_start = 0.0, s.step
        s.metrics.write(kind="train", step=s.step, loss=result.loss, lr=lr,
                        tokens_per_s=round(tps), time=round(s.clock(), 3))
        for name, value in result.aux.items():
            s.metrics.write(kind="aux", step=s.step, name=name, value=value)
        self.bar.report(s.step, result.loss, lr, tps)

    def on_end(self, s: RunState, status: str) -> None:
        self.bar.close()


def evaluate_run(s: RunState) -> dict[str, float]:
    """Validation loss, perplexity and bits per char of the model as it is now."""
    meta, t = s.data.meta, s.cfg.train
    cpt = meta.get("val_chars", len(s.data.val)) / max(1, meta.get("val_tokens", 1))
    result = evaluate(s.adapter, s.data.val, s.cfg.data.block_size, t.batch_size, s.device,
                      s.dtype, t.eval_batches and t.eval_batches * t.batch_size, cpt)
    s.best_val = min(s.best_val, result["val_loss"])
    return result


class Evaluation(Observer):
    """The val loss at step 0 (what training improves on), every eval_every steps and last."""

    def __init__(self, progress: bool) -> None:
        self.progress = progress

    def on_start(self, s: RunState) -> None:
        if s.step == 0:
            self.evaluate(s, 0.0)

    def on_step(self, s: RunState, result: StepResult, lr: float, last: bool) -> None:
        if s.step % s.cfg.train.eval_every == 0 or last:
            self.evaluate(s, s.clock())

    def evaluate(self, s: RunState, elapsed: float) -> None:
        # a sharded model needs every rank for a forward pass; a replicated one only rank 0
        if s.dist.is_main or s.dist.sharded:
            result = evaluate_run(s)
            s.last_val = result["val_loss"]
            s.metrics.write(kind="eval", step=s.step, time=round(elapsed, 3), **result)
            if self.progress:
                tqdm.write(f"step {s.step}: val loss {result['val_loss']:.4f}, "
                           f"bpc {result['val_bpc']:.3f}")
        s.dist.barrier()


class Samples(Observer):
    """200 tokens sampled at step 0 and every sample_every steps, to samples.txt and TensorBoard."""

    def on_start(self, s: RunState) -> None:
        if s.step == 0 and s.cfg.train.sample_every:
            self.write(s)

    def on_step(self, s: RunState, result: StepResult, lr: float, last: bool) -> None:
        if s.cfg.train.sample_every and s.step % s.cfg.train.sample_every == 0:
            self.write(s)

    @staticmethod
    def write(s: RunState) -> None:
        if not (s.dist.is_main or s.dist.sharded):
            return
        tok = s.adapter.tokenizer
        # an imported model samples under the run's autocast: its frozen weights may be bf16
        with autocast(s.device, s.dtype) if s.speed else contextlib.nullcontext():
            text = tok.decode(generate(s.adapter, tok.encode("\n"), 200, temperature=0.8,
                                       top_k=40, seed=s.cfg.run.seed))
        if s.dist.is_main:
            with open(s.run_dir / "samples.txt", "a") as f:
                f.write(f"--- step {s.step}\n{text}\n")
            s.tb.text("samples", text, s.step)


class Checkpoints(Observer):
    """A checkpoint every checkpoint_every steps (the loop saves the last one itself)."""

    def on_step(self, s: RunState, result: StepResult, lr: float, last: bool) -> None:
        if s.step % s.cfg.train.checkpoint_every == 0 and not last:
            save(s)


class TelemetryClose(Observer):
    """Telemetry measures inside the step (its probe); here it only lets go of its hooks."""

    def on_end(self, s: RunState, status: str) -> None:
        s.telemetry.close()
