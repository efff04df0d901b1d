"""TensorBoard event files for a run (`runs/<run_id>/tb/`), mirroring metrics.jsonl.

The writer is the MetricsLog's mirror: every record written to metrics.jsonl
becomes TensorBoard scalars under the names `records.scalars` gives it, so
TensorBoard and `metrics.jsonl` cannot disagree. Samples go in as text, and
telemetry's weight and gradient histograms as histograms. `tensorboard --logdir
runs` then shows and overlays every run.

TensorBoard is a view, not the record: a `tb/` folder that cannot be written
costs one warning and the run goes on without it. The writer is opened on the
first record, once the run folder exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmlab.records import scalars, warn


class TensorBoardLog:
    """One SummaryWriter for one run; every method is a no-op when disabled or broken."""

    def __init__(self, folder: Path, enabled: bool = True, resumed_at: int = 0) -> None:
        self.folder, self.enabled, self.resumed_at = Path(folder), enabled, resumed_at
        self._writer: Any = None

    def _open(self) -> Any:
        if self._writer is None and self.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # a resumed run hides what the first attempt wrote past its checkpoint,
                # as metrics.jsonl drops those lines
                purge = self.resumed_at + 1 if self.resumed_at else None
                self._writer = SummaryWriter(log_dir=str(self.folder), flush_secs=10,
                                             purge_step=purge)
            except Exception as e:  # an unwritable folder, a full disk, a broken install
                self._fail(e)
        return self._writer

    def _fail(self, e: BaseException) -> None:
        self.enabled, self._writer = False, None
        warn(f"TensorBoard: cannot write event files in {self.folder} ({type(e).__name__}: "
             f"{e}); the run goes on without them (metrics.jsonl has every number). Set "
             "run.tensorboard=false to silence this.")

    def __call__(self, record: dict[str, Any]) -> None:
        """Write one metrics.jsonl record as scalars at its step."""
        w = self._open()
        if w is None:
            return
        try:
            for tag, value in scalars(record).items():
                w.add_scalar(tag, value, record.get("step", 0))
        except Exception as e:
            self._fail(e)

    def text(self, tag: str, text: str, step: int) -> None:
        w = self._open()
        if w is None:
            return
        try:  # indented: TensorBoard renders text as Markdown, and a sample is verbatim
            w.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)
        except Exception as e:
            self._fail(e)

    def histogram(self, tag: str, values: torch.Tensor, step: int, bins: int = 64) -> None:
        """A histogram of `values` in `bins` equal bins.

        Counted by torch and written with `add_histogram_raw`: `add_histogram`'s
        numpy path took ~25 ms a tensor here (its BLAS threads compete with
        training's), a second per telemetry step on char-tiny.
        """
        w = self._open()
        if w is None:
            return
        try:
            with torch.no_grad():
                v = values.detach().float().flatten().cpu()
                lo, hi = v.min().item(), v.max().item()
                top = hi if hi > lo else lo + max(abs(lo), 1.0) * 1e-6  # one bin for a constant
                counts = torch.histc(v, bins, lo, top)
                limits = torch.linspace(lo, top, bins + 1)[1:]
                w.add_histogram_raw(tag, min=lo, max=hi, num=v.numel(), sum=v.sum().item(),
                                    sum_squares=v.dot(v).item(), bucket_limits=limits.tolist(),
                                    bucket_counts=counts.tolist(), global_step=step)
        except Exception as e:
            self._fail(e)

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as e:
                self._fail(e)
            self._writer = None
