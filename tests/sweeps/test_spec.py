"""Sweep files: expansion into runs, strict validation, random search, the set-up guard."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.sweeps.spec import check_setups, load_sweep
from tests.sweeps.conftest import FA, TINY


def test_variants_grid_and_seeds_cross(sweep_file):
    sweep = load_sweep(sweep_file(grid={"model.d_model": [32, 64]}, seeds=[3, 5]))
    assert len(sweep.runs) == 2 * 2 * 2
    assert {(r.variant, r.point["model.d_model"], r.seed) for r in sweep.runs} == {
        (v, d, s) for v in ("backprop", "fa") for d in (32, 64) for s in (3, 5)}
    fa = next(r for r in sweep.runs if r.variant == "fa" and r.point["model.d_model"] == 64)
    assert fa.config["model"]["d_model"] == 64 and fa.config["run"]["seed"] == fa.seed
    assert fa.config["hooks"]["backward"] == FA["hooks"]["backward"]
    assert fa.config["train"]["max_steps"] == TINY["train.max_steps"]
    assert fa.config["train"]["lr"] == 2e-3  # from the base, char-tiny
    bp = next(r for r in sweep.runs if r.variant == "backprop")
    assert bp.config["hooks"]["backward"] == []
    assert fa.key == "fa-g1-s3" and fa.config["run"]["name"] == "t-fa-g1-s3"
    assert len({r.key for r in sweep.runs}) == len(sweep.runs)


def test_seeds_count_and_overrides_by_variant(sweep_file):
    sweep = load_sweep(sweep_file(seeds=3, variants={"backprop": {},
                                                     "muon": {"train.optimizer": "muon"}}))
    assert [r.seed for r in sweep.runs if r.variant == "muon"] == [1, 2, 3]
    assert {r.config["train"]["optimizer"] for r in sweep.runs if r.variant == "muon"} == {
        "muon"}
    assert sweep.baseline == "backprop" and sweep.resolved["seeds"] == [1, 2, 3]


def test_random_search_draws_in_range_and_records(sweep_file):
    grid = {"train.lr": {"log_uniform": [1e-4, 1e-2]}, "train.weight_decay": {"uniform":
            [0.0, 0.2]}, "model.d_model": {"choice": [32, 64]}}
    a = load_sweep(sweep_file(method="random", samples=4, grid=grid, seeds=1))
    b = load_sweep(sweep_file(method="random", samples=4, grid=grid, seeds=1))
    assert a.points == b.points and len(a.points) == 4 and len(a.runs) == 4 * 2
    for p in a.points:
        assert 1e-4 <= p["train.lr"] <= 1e-2 and 0.0 <= p["train.weight_decay"] <= 0.2
        assert p["model.d_model"] in (32, 64)
    assert len({p["train.lr"] for p in a.points}) == 4
    assert a.resolved["points"] == a.points  # the drawn values are recorded
    run = a.runs[0]
    assert run.config["train"]["lr"] == run.point["train.lr"]
    c = load_sweep(sweep_file(method="random", samples=4, grid=grid, seeds=1, sample_seed=9))
    assert c.points != a.points
    logs = [math.log10(p["train.lr"]) for p in load_sweep(sweep_file(
        method="random", samples=60, grid={"train.lr": {"log_uniform": [1e-4, 1e-2]}},
        seeds=1, variants={"backprop": {}})).points]
    assert sum(x < -3 for x in logs) > 15  # log-uniform: half the draws below 1e-3


@pytest.mark.parametrize("top,message", [
    ({"variantz": {}}, "Unknown key 'variantz' in sweep file .* Valid keys: name, base, set"),
    ({"set": {"train.lr_max": 1}}, "Unknown config key 'train.lr_max' in set. Valid keys in "
                                   "train: batch_size"),
    ({"variants": {"backprop": {}, "a": {"optim.lr": 1}}}, "Unknown key 'optim.lr' in variants.a"),
    ({"variants": {"backprop": {}, "a": {"train.optimiser": "sgd"}}},
     "Unknown config key 'train.optimiser' in variants.a.*Did you mean 'optimizer'"),
    ({"grid": {"train.learning_rate": [1, 2]}}, "Unknown config key 'train.learning_rate' in "
                                                "grid"),
    ({"grid": {"hooks": [{}]}}, "Unknown key 'hooks' in grid"),
    ({"grid": {"train.lr": [1e-3, "fast"]}}, "Run backprop-g1-s1 .*train.lr = 'fast' has the "
                                             "wrong type"),
    ({"variants": {"backprop": {}, "a": {"train.optimizer": "adam"}}},
     "Run a-s1 .*train.optimizer"),
    ({"variants": {}}, "`variants` in the sweep file is empty"),
    ({"set": {"run.seed": 3}}, "'run.seed' in set: a sweep sets each run's seed from `seeds:`"),
    ({"grid": {}}, "`grid` in the sweep file is empty"),
    ({"grid": {"train.lr": []}}, "grid.train.lr must be a non-empty list"),
    ({"seeds": 0}, "`seeds` = 0"),
    ({"seeds": -2}, "`seeds` = -2"),
    ({"seeds": []}, "`seeds` is an empty list"),
    ({"seeds": [1, 1]}, "repeats a seed"),
    ({"baseline": "bp"}, "baseline 'bp' is not a variant. Variants: backprop, fa"),
    ({"grid": {"train.lr": {"uniform": [0.1, 0.2]}}}, "ranges need method: random"),
    ({"method": "random", "grid": {"train.lr": [1]}}, "`samples` = None"),
    ({"method": "random", "samples": 2, "grid": {"train.lr": {"log_uniform": [0, 1]}}},
     "low > 0"),
    ({"method": "bayes"}, "`method` = 'bayes'"),
    ({"name": None}, "needs a `name:`"),
    ({"base": "nope"}, "Config 'nope' not found"),
])
def test_bad_sweep_files_name_the_problem(sweep_file, top, message):
    with pytest.raises(LmlabError, match=message):
        load_sweep(sweep_file(**top))


def test_more_than_500_runs_needs_yes(sweep_file):
    path = sweep_file(seeds=251)
    with pytest.raises(LmlabError, match="502 runs .*Pass --yes"):
        load_sweep(path)
    assert len(load_sweep(path, yes=True).runs) == 502


def test_unknown_hook_is_refused_before_any_run(sweep_file):
    sweep = load_sweep(sweep_file(variants={"backprop": {}, "x": {"hooks": {"backward": [
        {"name": "feedback_allignment", "at": "blocks.*.mlp.*"}]}}}))
    with pytest.raises(LmlabError, match="Variant x .*feedback_allignment"):
        check_setups(sweep)


@pytest.mark.parametrize("variant,what", [({"train.dtype": "bfloat16"}, "dtype is float32 for "
                                           "variant backprop but bfloat16 for x"),
                                          ({"train.max_steps": 20}, "token budget is 1280"),
                                          ({"data.block_size": 16}, "token budget")])
def test_guard_refuses_variants_that_mix_setups(sweep_file, variant, what):
    sweep = load_sweep(sweep_file(variants={"backprop": {}, "x": variant}))
    with pytest.raises(LmlabError, match=f"would mix set-ups: {what}"):
        check_setups(sweep)


def test_guard_allows_setup_changes_in_the_grid(sweep_file):
    check_setups(load_sweep(sweep_file(grid={"train.max_steps": [10, 20]})))


def test_cli_bad_input_is_one_line_and_starts_nothing(sweep_file, tmp_path, capsys):
    path = sweep_file(seeds=0)
    proc = subprocess.run([sys.executable, "-m", "lmlab.cli", "sweep", "run", str(path),
                           "--out", str(tmp_path / "sweeps")], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "`seeds` = 0" in proc.stderr
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "runs").exists()
    for args in (["status", str(tmp_path)], ["report", str(tmp_path)],
                 ["resume", str(tmp_path)]):
        assert main(["sweep", *args]) == 2
        err = capsys.readouterr().err
        assert "is not a sweep folder" in err and err.strip().count("\n") == 0
