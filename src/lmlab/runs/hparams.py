"""A sweep run's hyperparameters and final metrics in its own TensorBoard folder.

TensorBoard's HParams tab makes one row per run that holds a session-start
summary (the hyperparameter values) and takes each metric column from that
same run's scalars. `SummaryWriter.add_hparams` writes them into a new run
folder beside the run, so the table's rows hold no curves and, as users of
Optuna's and Ray's TensorBoard callbacks report, often no metric values.
Here every finished sweep run writes, into `runs/<run_id>/tb/`:

- the experiment (which hparams and metrics there are), a session start with
  its values (variant, seed, every key of the sweep's grid, `set` and
  variants whose value is a number, string or bool) and a session end;
- the metrics as scalars of the same run: `hparams/final_val_loss`,
  `hparams/best_val_loss`, `hparams/tokens_per_s`.

`tensorboard --logdir runs` then shows a sweep as one table, next to the curves.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lmlab.records import read_manifest, warn

METRICS = {"hparams/final_val_loss": "last_val_loss", "hparams/best_val_loss": "best_val_loss",
           "hparams/tokens_per_s": "tokens_per_s"}
Value = bool | int | float | str


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _keys(sweep: dict[str, Any]) -> list[str]:
    """Dotted keys the sweep sets: its grid, `set` and every variant's (same for each run)."""
    keys = list(sweep.get("grid") or {})
    keys += list(sweep.get("set") or {})
    for over in (sweep.get("variants") or {}).values():
        keys += list(over or {})
    return list(dict.fromkeys(keys))


def sweep_hparams(manifest: dict[str, Any], sweep: dict[str, Any] | None) -> dict[str, Value]:
    """variant, seed and the run's value of each key the sweep sets (sections left out)."""
    label = manifest.get("sweep") or {}
    hp: dict[str, Value] = {"variant": str(label.get("variant")),
                            "seed": int(label.get("seed", manifest.get("seed", 0)))}
    point = label.get("point") or {}
    for key in [*point, *_keys(sweep or {})]:
        value = point[key] if key in point else _lookup(manifest.get("config", {}), key)
        if value is None:
            hp[key] = "null"
        elif isinstance(value, bool | int | float | str):
            hp[key] = value
        # a section (e.g. a variant's hooks) is what the variant's name stands for
    return hp


def write_hparams(run_dir: Path, sweep_dir: Path | None = None) -> dict[str, Value] | None:
    """Write a finished sweep run's hparams and final metrics into its tb/ (once; a view, so
    a failure costs a warning). Returns the hparams written, None if the run has none."""
    m = read_manifest(run_dir)
    final = m.get("final") or {}
    if not m.get("sweep") or m.get("status") != "finished":
        return None
    sweep = None
    if sweep_dir is not None and (Path(sweep_dir) / "index.json").is_file():  # a sweep folder
        import yaml

        sweep = yaml.safe_load((Path(sweep_dir) / "sweep.yaml").read_text())
    hp = sweep_hparams(m, sweep)
    try:
        _write(Path(run_dir) / "tb", hp, {tag: final.get(key) for tag, key in METRICS.items()},
               int(final.get("step") or 0), str(m.get("run_id", Path(run_dir).name)))
    except Exception as e:  # TensorBoard is a view: the run and its records are intact
        warn(f"TensorBoard HParams for {run_dir} not written ({type(e).__name__}: {e}).")
    return hp


def _write(folder: Path, hp: dict[str, Value], metrics: dict[str, Any], step: int,
           trial_id: str) -> None:
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2, summary_v2
    from torch.utils.tensorboard import SummaryWriter

    experiment = summary_v2.hparams_config_pb(
        [summary_v2.HParam(k) for k in hp],
        [summary_v2.Metric(tag, display_name=tag.split("/")[1]) for tag in metrics])
    end = summary_pb2.Summary()
    end.value.add(tag=metadata.SESSION_END_INFO_TAG,
                  metadata=metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(
                      session_end_info=plugin_data_pb2.SessionEndInfo(
                          status="STATUS_SUCCESS", end_time_secs=time.time()))),
                  tensor=metadata.NULL_TENSOR)
    w = SummaryWriter(log_dir=str(folder))
    try:
        for summary in (experiment, summary_v2.hparams_pb(hp, trial_id=trial_id)):
            w.file_writer.add_summary(summary, step)
        for tag, value in metrics.items():
            if isinstance(value, int | float):
                w.add_scalar(tag, value, step)
        w.file_writer.add_summary(end, step)
    finally:
        w.close()
