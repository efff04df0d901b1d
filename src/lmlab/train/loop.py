"""The training loop: set the lr, take a step, let the observers log, evaluate, sample and save.

Everything else lives beside it: the run's state and its checkpoint in
`state.py`, the step itself in `step.py`, what watches the run in
`observers.py`. The loop sees models only through BaseAdapter and experiments
only through ExperimentHooks, so neither a new architecture nor a new learning
rule edits it.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmlab.config import Config
from lmlab.train import faults
from lmlab.train.observers import Observer, default_observers, evaluate_run
from lmlab.train.optim import set_lr
from lmlab.train.state import Checkpoint, RunState, build, config_for_resume, save
from lmlab.train.step import (
    NonFiniteLoss,
    StepResult,
    micro_batches,
    nonfinite_policy,
    train_step,
)

__all__ = ["NonFiniteLoss", "Trainer", "config_for_resume", "train"]


class Trainer:
    def __init__(self, cfg: Config, resume: str | Path | Checkpoint | None = None,
                 allow_config_change: bool = False, progress: bool = True,
                 manifest: dict[str, Any] | None = None) -> None:
        """`resume`: a checkpoint (loaded once, by the caller) or its path; `manifest`: extra
        fields for the run's manifest (e.g. a sweep's variant and seed)."""
        if resume is not None and not isinstance(resume, Checkpoint):
            resume = Checkpoint.load(resume)
        self.state: RunState = build(cfg, resume, allow_config_change)
        self.progress = progress and self.state.dist.is_main
        self.observers: list[Observer] = default_observers(self.state, self.progress,
                                                           manifest or {})
        self.interrupted = False

    def run(self) -> Path:
        s, t = self.state, self.state.cfg.train
        self._notify("on_open")
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        s.hooks.attach(s.run_dir)
        s.t0 = time.perf_counter()
        status = "finished"
        try:
            s.out_of_time = self._over_budget()  # a resume after the budget
            self._notify("on_start")
            s.model.train()
            while s.step < t.max_steps and not s.out_of_time:
                if s.dist.any_rank(self.interrupted):  # all ranks stop at the same step
                    self.interrupted = True
                    break
                lr = s.lr()
                set_lr(s.optimizer, lr)
                result = self.step(lr)
                s.step += 1
                s.out_of_time = self._over_budget()
                self._notify("on_step", result, lr, s.step == t.max_steps or s.out_of_time)
            if self.interrupted:
                status = "interrupted"
            save(s)
        except BaseException as e:
            status = "failed"
            err = faults.explain(e, s.step + 1, s.hooks, s.run_dir / "checkpoints")
            if err is e:
                raise
            raise err from e
        finally:
            s.hooks.detach()
            signal.signal(signal.SIGINT, previous)
            try:
                self._notify("on_end", status)
            finally:
                s.tb.close()
                s.dist.cleanup(ok=status != "failed")
        return s.run_dir

    def step(self, lr: float) -> StepResult:
        """One step as the loop takes it: telemetry if due, the update, the non-finite policy."""
        s, t0 = self.state, time.perf_counter()
        result = train_step(s, micro_batches(s), lr, s.telemetry.probe(s.step + 1))
        nonfinite_policy(s, result)
        result.seconds = time.perf_counter() - t0
        return result

    def evaluate(self) -> dict[str, float]:
        return evaluate_run(self.state)

    def _over_budget(self) -> bool:
        """Every rank stops at the same step: rank 0's clock decides."""
        s, budget = self.state, self.state.cfg.train.time_budget_s
        return bool(budget) and s.dist.any_rank(s.dist.is_main and s.clock() >= budget)

    def _notify(self, event: str, *args: Any) -> None:
        for observer in self.observers:
            getattr(observer, event)(self.state, *args)

    def _on_sigint(self, signum, frame) -> None:
        if self.interrupted:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.interrupted = True
        if self.progress:
            tqdm.write("Interrupted: finishing this step and saving a checkpoint "
                       "(Ctrl-C again to abort without saving).")


def train(cfg: Config, resume: str | Path | Checkpoint | None = None,
          allow_config_change: bool = False, progress: bool = True) -> Path:
    return Trainer(cfg, resume, allow_config_change, progress).run()
