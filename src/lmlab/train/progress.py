"""Training progress that fits where it goes.

- a terminal: a tqdm bar, redrawn in place;
- a notebook: tqdm.auto's widget;
- anything else (a log file, a pipe, a CI console): one plain line every
  `log_every` steps with the step, loss, tokens/s and ETA, since a redrawn bar
  there is thousands of carriage-return updates in one line.

With a time budget the ETA is the budget left (training stops by the clock);
otherwise the steps left at the rate of this session so far.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where tqdm.auto draws a widget)."""
    shell = sys.modules.get("IPython")
    ip = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def choose_mode(stream: TextIO) -> str:
    """'notebook', 'tty' or 'lines'."""
    if in_notebook():
        return "notebook"
    isatty = getattr(stream, "isatty", None)
    return "tty" if isatty is not None and isatty() else "lines"


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class Progress:
    """The loop's progress display: `update` after every step, `report` at each log point."""

    def __init__(self, total_steps: int, initial: int, enabled: bool = True,
                 budget_s: float | None = None, clock: Callable[[], float] | None = None,
                 bar_stream: TextIO | None = None, line_stream: TextIO | None = None,
                 mode: str | None = None) -> None:
        self.total, self.initial, self.budget = total_steps, initial, budget_s
        self.clock = clock or time.perf_counter
        self.started = self.clock()
        self.lines = line_stream or sys.stdout
        bar_stream = bar_stream or sys.stderr
        self.mode = "off" if not enabled else (mode or choose_mode(bar_stream))
        self.bar: Any = None
        if self.mode in ("tty", "notebook"):
            if self.mode == "notebook":
                from tqdm.auto import tqdm
            else:
                from tqdm import tqdm
            # with a budget the step count is only a cap: no bar towards it
            self.bar = tqdm(total=None if budget_s else total_steps, initial=initial,
                            dynamic_ncols=True, unit="step", file=bar_stream)

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def eta(self, step: int) -> float | None:
        """Seconds left: the budget's rest, or the steps left at this session's rate."""
        now = self.clock()
        if self.budget:
            return max(0.0, self.budget - now)
        done = step - self.initial
        return (self.total - step) * (now - self.started) / done if done > 0 else None

    def report(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        elif self.mode == "lines":
            eta = self.eta(step)
            of = "" if self.budget else f"/{self.total}"
            self.lines.write(f"step {step}{of}  loss {loss:.4f}  lr {lr:.2e}  "
                             f"{tokens_per_s:,.0f} tok/s  ETA "
                             f"{'?' if eta is None else _duration(eta)}\n")
            self.lines.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
