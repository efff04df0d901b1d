"""`lmlab runs compare`: the headline never hides a base or data mismatch; the PNG is real."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from lmlab.cli.runs import add_compare
from lmlab.errors import LmlabError
from lmlab.runs.compare import compare


def fake_run(root: Path, run_id: str, base="b1", data="d1", lr=1e-3, hooks=None,
             val=(2.5, 2.1, 2.2), tps=5000, world=1, seed=1, name=None, dtype="float32",
             device="cpu", steps=30, status="finished", sweep=None) -> Path:
    d = root / run_id
    d.mkdir(parents=True)
    config = {"run": {"name": name or run_id, "seed": seed},
              "train": {"lr": lr, "max_steps": steps, "batch_size": 4, "grad_accum": 1},
              "data": {"block_size": 8}, "hooks": {"forward": hooks or []}}
    manifest = {"run_id": run_id, "status": status, "config": config, "base_hash": base,
                "data_hash": data, "hooks": hooks or [], "plugins": {},
                "code": {"git_commit": "abc", "git_dirty": False}, "device": device,
                "dtype": dtype, "world_size": world, "seed": seed,
                "final": {"step": 30, "tokens_per_s": tps}}
    if sweep:
        manifest["sweep"] = sweep
    (d / "manifest.json").write_text(json.dumps(manifest))
    lines = [{"kind": "train", "step": s, "loss": 3.0 - s / 20, "tokens_per_s": tps}
             for s in range(1, 31)]
    lines += [{"kind": "eval", "step": 10 * (i + 1), "val_loss": v} for i, v in enumerate(val)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return d


def test_matching_runs_say_comparable_and_show_figures_and_diff(tmp_path):
    hooks = [{"name": "scale", "at": "blocks.*.hook_attn_out", "factor": 0.5}]
    a = fake_run(tmp_path, "run-a")
    fake_run(tmp_path, "run-b", hooks=hooks, val=(2.4, 2.0, 1.9), tps=4800)
    out = compare([str(a), "run-b"], root=tmp_path)
    lines = out.splitlines()
    assert lines[0].startswith("Comparable: same base config")
    row_b = next(line for line in lines if line.startswith("run-b"))
    assert "1.9000" in row_b and "4800" in row_b  # final val, and tokens/s
    row_a = next(line for line in lines if line.startswith("run-a"))
    assert "2.2000" in row_a and "2.1000" in row_a  # final and best val
    assert "hooks.forward: [] -> [{'name': 'scale'" in out


@pytest.mark.parametrize("changes,words", [({"base": "b2"}, "BASE CONFIGS"),
                                           ({"data": "d2"}, "DATA"),
                                           ({"base": "b2", "data": "d2"}, "BASE CONFIGS AND DATA"),
                                           ({"world": 2}, "WORLD SIZES AND TOKEN BUDGETS"),
                                           ({"dtype": "bfloat16"}, "DTYPES"),
                                           ({"device": "cuda"}, "DEVICES"),
                                           ({"steps": 60}, "TOKEN BUDGETS")])
def test_mismatched_hashes_are_announced_on_line_one(tmp_path, changes, words):
    a = fake_run(tmp_path, "run-a")
    b = fake_run(tmp_path, "run-b", lr=3e-3, **changes)
    first, *rest = compare([a, b], root=tmp_path).splitlines()
    assert first.startswith("!!! NOT COMPARABLE") and f"{words} DIFFER" in first
    if "base" in changes:
        assert any("train.lr: 0.001 -> 0.003" in line for line in rest[:4])


def test_plot_is_a_real_png(tmp_path):
    a = fake_run(tmp_path, "run-a")
    b = fake_run(tmp_path, "run-b", base="other")
    png = tmp_path / "plots" / "curves.png"
    out = compare([a, b], root=tmp_path, plot=png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert str(png) in out


def test_needs_two_runs_and_real_ones(tmp_path):
    a = fake_run(tmp_path, "run-a")
    with pytest.raises(LmlabError, match="at least two"):
        compare([a], root=tmp_path)
    with pytest.raises(LmlabError, match="run-a"):
        compare([a, "nope"], root=tmp_path)


def test_cli_wiring(tmp_path, capsys):
    fake_run(tmp_path, "run-a")
    fake_run(tmp_path, "run-b", data="d9")
    parser = argparse.ArgumentParser(prog="lmlab")
    runs = parser.add_subparsers(dest="command").add_parser("runs")
    runs.add_argument("--root", default="runs")
    add_compare(runs.add_subparsers(dest="runs_command"))
    runs.set_defaults(func=None)  # as cli.py does: the action's own func must win
    args = parser.parse_args(["runs", "--root", str(tmp_path), "compare", "run-a", "run-b"])
    args.func(args)
    assert capsys.readouterr().out.startswith("!!! NOT COMPARABLE: DATA DIFFER")


def test_seeds_of_one_setup_are_headlined_as_replicates(tmp_path):
    runs = [fake_run(tmp_path, f"run-{s}", seed=s, name="bp") for s in (1, 2, 3)]
    first = compare(runs, root=tmp_path).splitlines()[0]
    assert first.startswith("Replicates: same base config") and "seeds (1, 2, 3)" in first


def test_group_by_variant_aggregates_replicates(tmp_path):
    runs = [fake_run(tmp_path, f"bp-{i}", name="bp", seed=i, val=(2.5, v))
            for i, v in enumerate((2.0, 2.2, 2.4))]
    runs += [fake_run(tmp_path, f"fa-{i}", name="fa", seed=i, val=(2.5, v),
                      hooks=[{"name": "scale"}]) for i, v in enumerate((2.5, 2.6, 2.7, 2.8))]
    runs.append(fake_run(tmp_path, "fa-crashed", name="fa", status="failed", val=(2.5,)))
    png = tmp_path / "bands.png"
    out = compare(runs, root=tmp_path, plot=png, group_by="variant")
    assert "bp  3      2.2000   0.2000  [1.7032, 2.6968]" in out
    assert "fa vs bp: higher by 0.450 ± 0.404 nats, p = 0.038 (n = 4 vs 3)" in out
    assert "warning: left out fa-crashed, variant fa: status failed" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_group_by_variant_refuses_mixed_setups(tmp_path):
    a = fake_run(tmp_path, "a", name="bp")
    b = fake_run(tmp_path, "b", name="bp", seed=2)
    c = fake_run(tmp_path, "c", name="fa", dtype="bfloat16", sweep={"variant": "fa"})
    with pytest.raises(LmlabError, match="mixed set-up.*dtype differs: float32 in bp \\(a\\), "
                                         "bfloat16 in fa \\(c\\)"):
        compare([a, b, c], root=tmp_path, group_by="variant")
    d = fake_run(tmp_path, "d", name="bp", seed=3, base="other")
    with pytest.raises(LmlabError, match="runs of bp are not replicates"):
        compare([a, b, d], root=tmp_path, group_by="variant")
