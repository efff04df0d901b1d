"""The Python API (lmlab.train, Run, load_model, sweep) on tiny runs of the real loop."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import lmlab
from lmlab.errors import LmlabError
from lmlab.hooks.api import hooked, run_with_cache
from lmlab.records import read_metrics
from tests.runs.test_hparams import read_hparams
from tests.sweeps.conftest import sweep_file  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny(corpus_dir: Path, tmp_path: Path) -> dict:
    """The tiny test config as a nested mapping (lmlab.train takes mappings too)."""
    from tests.conftest import tiny_config

    return tiny_config(corpus_dir, tmp_path / "runs").to_dict()


def test_import_lmlab_config_stays_light() -> None:
    code = ("import sys, lmlab, lmlab.config; "
            "print(any(m in sys.modules for m in ('torch', 'pandas', 'lmlab.api')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(Path(lmlab.__file__).parents[1])})
    assert out.stdout.strip() == "False"
    assert lmlab.Run is lmlab.api.Run and "Run" in dir(lmlab)
    # importing lmlab.train.loop binds the package to lmlab.train, which stays callable
    loop = importlib.import_module("lmlab.train.loop")
    assert callable(lmlab.train) and lmlab.train.loop is loop


def test_train_returns_a_run_with_metrics_config_and_checkpoints(tiny, capsys) -> None:
    run = lmlab.train(tiny, {"train.max_steps": 6, "run": {"name": "api"}}, progress=False)
    assert isinstance(run, lmlab.Run) and run.status == "finished"
    assert f"Run {run.id}" in capsys.readouterr().out  # as `lmlab train` says it
    assert run.config.train.max_steps == 6 and run.config.run.name == "api"
    assert run.manifest["config_hash"] == run.config.hash()
    df = run.metrics
    assert isinstance(df, pd.DataFrame) and len(df) == len(read_metrics(run.path))
    assert set(df["kind"]) >= {"train", "eval"}
    assert df.query("kind == 'train'")["step"].tolist() == list(range(1, 7))
    assert [p.name for p in run.checkpoints] == ["ckpt_0000004.pt", "ckpt_0000006.pt"]
    assert lmlab.Run(run.id, root=run.path.parent).path == run.path  # a run id works too


def test_load_model_is_hookable_and_generates(tiny) -> None:
    run = lmlab.train(tiny, progress=False)
    model = run.load_model()
    assert not model.training and model.block_size == 32
    idx = torch.tensor([model.tokenizer.encode("KING: the lord")])
    logits, cache = run_with_cache(model, idx, names=["blocks.*.hook_resid_post"])
    assert set(cache) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}
    with hooked(model, forward=[{"name": "scale", "at": "blocks.0.hook_attn_out",
                                 "factor": 0.0}]):
        ablated = model(idx)
    assert not torch.allclose(ablated, logits)
    assert torch.equal(model(idx), logits)  # the hook is gone again
    text = model.generate("KING:", max_new_tokens=40, seed=1)
    assert len(text) == 40 and text == lmlab.load_model(run.checkpoints[-1]).generate(
        "KING:", max_new_tokens=40, seed=1)


def test_unknown_key_is_one_line_naming_the_valid_ones(tiny) -> None:
    with pytest.raises(LmlabError, match=r"Unknown config key 'train.lrr'.*Did you mean") as e:
        lmlab.train(tiny, {"train.lrr": 1e-3})
    assert "\n" not in str(e.value)


def test_run_on_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(LmlabError, match="is not a run folder .*lmlab train") as e:
        lmlab.Run(tmp_path)
    assert "\n" not in str(e.value)


def test_load_model_on_an_unregistered_name_lists_the_registered(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LMLAB_MODELS_DIR", str(tmp_path / "models"))
    with pytest.raises(LmlabError, match="Registered models in .*: none yet; import one"):
        lmlab.load_model("no-such-model")


@pytest.mark.slow
def test_sweep_runs_and_reports_a_dataframe(sweep_file,  # noqa: F811
                                            tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = lmlab.sweep(sweep_file(), jobs=2, out=tmp_path / "sweeps", quiet=True)
    assert len(s.runs) == 4 and all(r.status == "finished" for r in s.runs)
    df = s.report()
    assert df["variant"].tolist() == ["backprop", "fa"] and df["n"].tolist() == [2, 2]
    fa = df.set_index("variant").loc["fa"]
    assert fa["diff"] == pytest.approx(fa["mean"] - df.set_index("variant").loc[
        "backprop", "mean"])
    assert 0 <= fa["p"] <= 1 and isinstance(fa["verdict"], str)
    for r in s.runs:  # the worker wrote each run's row of TensorBoard's HParams table
        hp, scalars, _, _ = read_hparams(r.path / "tb")
        assert hp["variant"] == r.manifest["sweep"]["variant"] and hp["seed"] == r.config.run.seed
        assert scalars["hparams/final_val_loss"] == pytest.approx(
            r.metrics.query("kind == 'eval'")["val_loss"].iloc[-1])
    with pytest.raises(LmlabError, match="not a sweep folder"):
        lmlab.Sweep(tmp_path)
