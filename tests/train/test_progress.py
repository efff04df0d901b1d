"""Progress: a bar on a terminal, one plain line per log point anywhere else."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from lmlab.train.progress import Progress, choose_mode

ROOT = Path(__file__).resolve().parents[2]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_mode_follows_the_stream() -> None:
    assert choose_mode(io.StringIO()) == "lines"
    assert choose_mode(Terminal()) == "tty"


def test_lines_mode_writes_one_plain_line_per_report_with_eta() -> None:
    now = [0.0]
    out, err = io.StringIO(), io.StringIO()
    p = Progress(100, 0, clock=lambda: now[0], bar_stream=err, line_stream=out)
    for step in range(1, 21):
        now[0] = step * 0.5
        p.update(step)
        if step % 10 == 0:
            p.report(step, 2.5, 3e-3, 12345.6)
    p.close()
    lines = out.getvalue().splitlines()
    assert lines == ["step 10/100  loss 2.5000  lr 3.00e-03  12,346 tok/s  ETA 0:45",
                     "step 20/100  loss 2.5000  lr 3.00e-03  12,346 tok/s  ETA 0:40"]
    assert err.getvalue() == "" and "\r" not in out.getvalue()


def test_a_time_budget_gives_the_budget_left_as_eta() -> None:
    out = io.StringIO()
    p = Progress(100_000, 0, budget_s=150, clock=lambda: 30.0, bar_stream=io.StringIO(),
                 line_stream=out)
    p.report(25, 1.9, 1e-2, 1000)
    assert out.getvalue() == "step 25  loss 1.9000  lr 1.00e-02  1,000 tok/s  ETA 2:00\n"


def test_a_terminal_gets_a_tqdm_bar_and_no_plain_lines() -> None:
    out, term = io.StringIO(), Terminal()
    p = Progress(10, 0, bar_stream=term, line_stream=out)
    for step in range(1, 11):
        p.update(step)
    p.report(10, 2.0, 1e-3, 500)
    p.close()
    assert out.getvalue() == "" and "\r" in term.getvalue() and "10/10" in term.getvalue()


def test_disabled_writes_nothing() -> None:
    out, term = io.StringIO(), Terminal()
    p = Progress(10, 0, enabled=False, bar_stream=term, line_stream=out)
    p.update(1)
    p.report(1, 2.0, 1e-3, 500)
    assert out.getvalue() == term.getvalue() == ""


@pytest.mark.slow
def test_lmlab_train_into_a_log_has_no_carriage_returns(corpus_dir: Path, tmp_path: Path) -> None:
    argv = [sys.executable, "main.py", "train", "--config", "char-tiny",
            "--set", f"data.path={corpus_dir}", "--set", f"run.out_dir={tmp_path}",
            "--set", "data.block_size=32", "--set", "model.n_layer=1",
            "--set", "train.max_steps=10", "--set", "train.log_every=5",
            "--set", "train.eval_every=10", "--set", "train.checkpoint_every=10",
            "--set", "train.eval_batches=2", "--set", "train.device=cpu",
            "--set", "train.dtype=float32"]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stdout + r.stderr
    steps = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("step ")
             and "tok/s" in line]
    assert steps == ["5/10", "10/10"]
