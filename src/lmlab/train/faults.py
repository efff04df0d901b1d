"""Turning a failure mid-run into one line a user can act on.

The loop catches what escapes a training step and hands it here: an OS
failure (disk full, permission denied, read-only folder) names the file and
the cause; a hook's failure names the hook, its point, the step and the
plugin's own line; each says which checkpoint is the last good one, after
checking that it loads, matches its hash and is finite, and that the eval
recorded at its step, if any, was finite (weights can be finite and useless:
after repeated skipped updates a checkpoint may evaluate to NaN).
"""

from __future__ import annotations

import errno as errno_codes
import math
import traceback
from pathlib import Path

import torch

from lmlab.errors import LmlabError
from lmlab.fileio import os_cause
from lmlab.hooks.manager import ExperimentHooks, HookFailed
from lmlab.model.checkpoint import list_checkpoints, load_checkpoint
from lmlab.records import read_metrics

_TORCH_DIR = str(Path(torch.__file__).parent)


def last_good_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint that loads, matches its hash, is finite, and whose recorded
    eval (in the run's metrics.jsonl, if one was made at its step) was finite."""
    evals = {r["step"]: r["val_loss"] for r in read_metrics(checkpoints.parent, quiet=True)
             if r["kind"] == "eval"}
    for p in reversed(list_checkpoints(checkpoints) if checkpoints.is_dir() else []):
        try:
            step = load_checkpoint(p).get("step")
        except LmlabError:
            continue
        if math.isfinite(evals.get(step, 0.0)):
            return p
    return None


def last_good(checkpoints: Path) -> str:
    """A sentence naming the run's last good checkpoint, or saying there is none."""
    good = last_good_checkpoint(checkpoints)
    if good is None:
        return "The run has no good checkpoint yet."
    return f"The last good checkpoint is {good} (resume with `lmlab train --resume {good}`)."


def plugin_frame(e: BaseException, plugins: dict[str, str]) -> str | None:
    """'file:line in function' of the deepest frame of `e` inside one of the plugin files."""
    files = {str(Path(p).resolve()) for p in plugins}
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if str(Path(f.filename).resolve()) in files]
    return f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else None


def explain(e: BaseException, step: int, hooks: ExperimentHooks,
            checkpoints: Path) -> BaseException:
    """The one-line error for `e` raised at training step `step`, or `e` itself."""
    if isinstance(e, HookFailed):
        return LmlabError(f"{e.where} failed at step {step}: {e.detail}. {last_good(checkpoints)}")
    if isinstance(e, LmlabError) or not isinstance(e, Exception):
        return e  # already a clear message, or Ctrl-C
    os_err = os_cause(e)
    if os_err is not None:
        code = errno_codes.errorcode.get(os_err.errno, str(os_err.errno))
        what = f"'{os_err.filename}'" if os_err.filename else "a file"
        return LmlabError(f"Could not write {what}: {os_err.strerror} ({code}). Training stopped "
                          f"after step {step - 1}. {last_good(checkpoints)}")
    first = str(e).splitlines()[0] if str(e) else ""
    frame = plugin_frame(e, hooks.plugins)
    if frame is not None:  # raised by plugin code outside a wrapped call (a custom backward)
        return LmlabError(f"A hook from a plugin failed at step {step}: {type(e).__name__}: "
                          f"{first} ({frame}). {last_good(checkpoints)}")
    in_backward = any(f.name == "_engine_run_backward"
                      for f in traceback.extract_tb(e.__traceback__))
    if in_backward and hooks.cfg.backward:  # e.g. a gradient of the wrong shape
        names = ", ".join(f"'{h.get('name')}' at {h.get('at')}" for h in hooks.cfg.backward)
        return LmlabError(f"The backward pass failed at step {step} with backward hooks in "
                          f"force ({names}): {type(e).__name__}: {first}. "
                          f"{last_good(checkpoints)}")
    return e
