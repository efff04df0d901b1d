"""HParams read back with TensorBoard's own reader: one row per sweep run, in the run's folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata

from lmlab.records import read_manifest
from lmlab.runs.hparams import write_hparams
from lmlab.train.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def read_hparams(tb: Path) -> tuple[dict, dict, dict, str]:
    """(hparams, metric scalars, experiment's columns, end status) as TensorBoard reads them."""
    ea = EventAccumulator(str(tb), size_guidance={"tensors": 0, "scalars": 0})
    ea.Reload()
    content = ea.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(
        content[metadata.SESSION_START_INFO_TAG])
    hp = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert start.group_name == tb.parent.name  # the table's trial id is the run id
    exp = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    columns = {"hparams": [h.name for h in exp.hparam_infos],
               "metrics": [m.name.tag for m in exp.metric_infos]}
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    scalars = {t: ea.Scalars(t)[-1].value for t in ea.Tags()["scalars"] if t.startswith("hparams/")}
    return hp, scalars, columns, end.status


def test_a_sweep_run_writes_its_hparams_and_final_metrics_into_its_own_tb(make_config,
                                                                            tmp_path: Path):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "index.json").write_text("{}")
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "t", "set": {"train.max_steps": 8, "model.d_model": 32},
        "grid": {"train.lr": [3e-3]},
        "variants": {"backprop": {}, "fa": {"hooks": {"backward": []}}}}))
    label = {"id": "s", "key": "fa-s7", "variant": "fa", "point_id": 0,
             "point": {"train.lr": 3e-3}, "seed": 7}
    run_dir = Trainer(make_config(), progress=False, manifest={"sweep": label}).run()
    hp = write_hparams(run_dir, sweep_dir)
    final = read_manifest(run_dir)["final"]

    got, scalars, columns, status = read_hparams(run_dir / "tb")
    assert got == hp == {"variant": "fa", "seed": 7, "train.lr": 3e-3,
                         "train.max_steps": 8, "model.d_model": 32}
    assert scalars == pytest.approx({"hparams/final_val_loss": final["last_val_loss"],
                                     "hparams/best_val_loss": final["best_val_loss"],
                                     "hparams/tokens_per_s": final["tokens_per_s"]})
    assert columns["hparams"] == list(hp) and set(columns["metrics"]) == set(scalars)
    assert status == 1  # STATUS_SUCCESS
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["checkpoints", "tb"]


def test_a_run_outside_a_sweep_writes_none(make_config):
    run_dir = Trainer(make_config(), progress=False).run()
    assert write_hparams(run_dir) is None
    ea = EventAccumulator(str(run_dir / "tb"))
    ea.Reload()
    tags = ea.Tags()
    assert tags["scalars"] and not [t for t in tags["scalars"] + tags["tensors"]
                                    if t.startswith(("hparams/", "_hparams_/"))]
