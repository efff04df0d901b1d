"""train.time_budget_s: stop by wall time, schedule by the fraction used, resume continues it."""

from __future__ import annotations

from lmlab.model.checkpoint import list_checkpoints, load_checkpoint
from lmlab.records import read_manifest, read_metrics
from lmlab.train.loop import config_for_resume, train

BUDGET = 3.0


def train_records(run):
    return [r for r in read_metrics(run) if r["kind"] == "train"]


def test_time_budget_stops_drives_the_lr_and_resume_continues_the_clock(make_config):
    # linear decay to zero over the whole budget: lr / peak = 1 - clock / budget
    cfg = make_config(train={"max_steps": 10 ** 6, "time_budget_s": BUDGET, "warmup_steps": 0,
                             "schedule": "wsd", "decay_fraction": 1.0, "min_lr": 0.0,
                             "eval_every": 10 ** 6, "eval_batches": 1, "checkpoint_every": 2,
                             "log_every": 1, "keep_checkpoints": 10 ** 6, "threads": 1})
    run = train(cfg, progress=False)
    final = read_manifest(run)["final"]
    assert final["stopped_by"] == "time_budget" and 2 < final["step"] < 10 ** 6
    assert final["train_clock_s"] >= BUDGET
    records = train_records(run)
    assert records[-1]["step"] == final["step"]
    for r in records:  # the lr follows the clock: it is never above 1 - time / budget
        assert r["lr"] <= cfg.train.lr * (1 - (r["time"] - 0.5) / BUDGET) + 1e-12
    assert records[-1]["lr"] < 0.5 * cfg.train.lr
    assert [r["kind"] for r in read_metrics(run)][-1] == "eval"  # evaluated where it stopped
    assert load_checkpoint(run)["elapsed_s"] >= BUDGET

    first = list_checkpoints(run / "checkpoints")[0]
    saved = load_checkpoint(first)
    assert saved["step"] == 2 and 0 < saved["elapsed_s"] < BUDGET
    train(config_for_resume(str(first), None, []), resume=str(first), progress=False)
    resumed = [r for r in train_records(run) if r["step"] > 2]
    assert resumed[0]["time"] >= saved["elapsed_s"]  # the clock went on from the checkpoint
    assert resumed[0]["lr"] <= cfg.train.lr * (1 - saved["elapsed_s"] / BUDGET) + 1e-12
    assert read_manifest(run)["final"]["stopped_by"] == "time_budget"

    # resuming a run whose budget is spent takes no further step
    last = load_checkpoint(run)
    train(config_for_resume(str(run), None, []), resume=str(run), progress=False)
    assert read_manifest(run)["final"]["step"] == last["step"]
