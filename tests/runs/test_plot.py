"""`lmlab runs plot`: any metric, panels per metric, colours per run, log scale, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest

from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.runs.plot import draw, plot, series


def fake_run(root: Path, run_id: str, decay: float, batch: int = 4) -> Path:
    """A run folder as the loop writes it: train/eval/aux lines, telemetry every 5 steps."""
    d = root / run_id
    d.mkdir(parents=True)
    config = {"run": {"name": run_id}, "data": {"block_size": 8},
              "train": {"batch_size": batch, "grad_accum": 2}}
    (d / "manifest.json").write_text(json.dumps({"run_id": run_id, "config": config,
                                                 "world_size": 1}))
    lines = []
    for s in range(1, 21):
        lines.append({"kind": "train", "step": s, "loss": 3 - s * decay, "lr": 1e-3,
                      "tokens_per_s": 1000, "time": 0.5 * s})
        lines.append({"kind": "aux", "step": s, "name": "z_loss", "value": 0.01})
        if s % 5 == 0:
            lines.append({"kind": "telemetry", "step": s,
                          "grad_norm/blocks.0.mlp.fc.weight": 10.0 ** (-s / 5),  # 4 decades
                          "grad_norm/blocks.1.mlp.fc.weight": 0.5 + s / 100,
                          "attn_entropy/blocks.0.head0": 2.0 - s / 20})
    lines.append({"kind": "eval", "step": 20, "val_loss": 2.5, "time": 11.0})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return d


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    return [fake_run(tmp_path, "run-bp", 0.05), fake_run(tmp_path, "run-fa", 0.02, batch=8)]


def test_a_glob_gives_one_panel_per_metric_and_one_colour_per_run(two_runs):
    fig = draw(two_runs, ["grad_norm/blocks.*.mlp.fc.weight", "aux/z_loss"])
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [
        "grad_norm/blocks.0.mlp.fc.weight", "grad_norm/blocks.1.mlp.fc.weight", "aux/z_loss"]
    for ax in panels:
        assert [line.get_color() for line in ax.get_lines()] == ["C0", "C1"]
    # 1e-1 .. 1e-4 spans decades: log; 0.55 .. 0.7 and a constant do not
    assert [ax.get_yscale() for ax in panels] == ["log", "linear", "linear"]
    xs, ys = panels[0].get_lines()[1].get_data()
    assert list(xs) == [5, 10, 15, 20] and ys[-1] == pytest.approx(1e-4)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["run-bp", "run-fa"]


def test_x_axis_in_tokens_or_training_seconds(two_runs):
    tokens = series(two_runs[1], "tokens")["attn_entropy/blocks.0.head0"][0]
    assert list(tokens) == [s * 8 * 2 * 8 for s in (5, 10, 15, 20)]  # batch x accum x window
    seconds = series(two_runs[0], "time")
    assert list(seconds["attn_entropy/blocks.0.head0"][0]) == [2.5, 5.0, 7.5, 10.0]
    assert list(seconds["eval/val_loss"][0]) == [11.0]


def test_the_png_is_written_by_the_cli(two_runs, tmp_path, capsys):
    out = tmp_path / "figs" / "entropy.png"
    assert main(["runs", "--root", str(tmp_path), "plot", "run-bp", "run-fa",
                 "--metric", "attn_entropy/*", "--metric", "train/loss", "--x", "tokens",
                 "--out", str(out)]) == 0
    assert f"Plot: {out}" in capsys.readouterr().out
    height, width, _ = matplotlib.image.imread(out).shape
    assert width == 2 * 420 and height > 300


def test_unknown_metric_lists_the_recorded_ones(two_runs):
    with pytest.raises(LmlabError) as e:
        plot(two_runs, ["grad_nrom/*"])
    message = str(e.value)
    assert "No recorded metric matches 'grad_nrom/*'" in message
    assert "train/loss" in message and "eval/val_loss" in message and "aux/z_loss" in message
    assert "grad_norm/* (2, e.g. grad_norm/blocks.0.mlp.fc.weight)" not in message  # 2 shown
    assert "grad_norm/blocks.1.mlp.fc.weight" in message


def test_no_runs_or_an_unknown_run_is_a_clear_error(tmp_path, two_runs, capsys):
    assert main(["runs", "--root", str(tmp_path), "plot", "--metric", "train/loss"]) == 2
    err = capsys.readouterr().err
    assert "runs plot needs at least one run" in err and "run-bp" in err
    with pytest.raises(LmlabError, match="'nope' is not a run folder or run id"):
        plot(["nope"], ["train/loss"], root=tmp_path)
