"""TensorBoard event files, read back with TensorBoard's own reader and its own server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmlab.records import read_metrics, scalars
from lmlab.train.loop import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _events(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0,
                                                               "histograms": 0})
    acc.Reload()
    return acc


def _recorded(run_dir) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every scalar in metrics.jsonl, under the shared names."""
    out: dict[str, dict[int, float]] = {}
    for r in read_metrics(run_dir):
        for tag, value in scalars(r).items():
            out.setdefault(tag, {})[r["step"]] = value
    return out


def test_event_files_hold_every_metric_sample_and_histogram(make_config):
    hooks = {"aux_losses": [{"name": "z_loss", "weight": 1e-4}]}
    cfg = make_config(hooks=hooks, train={"sample_every": 4},
                      telemetry={"every": 4, "activations": ["blocks.*.mlp.hook_post"],
                                 "histograms": True})
    run = train(cfg, progress=False)
    recorded = _recorded(run)
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/val_loss", "eval/val_bpc",
            "aux/z_loss", "grad_norm/blocks.0.mlp.fc.weight",
            "act_frac_nonpos/blocks.1.mlp.hook_post", "attn_entropy/blocks.1.head1",
            "logits_lse_mean"} <= set(recorded)
    acc = _events(run)
    assert set(acc.Tags()["scalars"]) == set(recorded)
    for tag, values in recorded.items():
        events = {e.step: e.value for e in acc.Scalars(tag)}
        assert events.keys() == values.keys(), tag
        for step, value in values.items():  # TensorBoard keeps float32
            assert events[step] == pytest.approx(value, rel=1e-6, abs=1e-30), (tag, step)
    texts = {e.step: e.tensor_proto.string_val[0].decode()
             for e in acc.Tensors("samples/text_summary")}
    samples = (run / "samples.txt").read_text().split("--- step ")[1:]
    assert sorted(texts) == [0, 4, 8] and len(samples) == 3
    first_line = samples[1].split("\n")[1]
    assert "    " + first_line in texts[4]
    assert "weights/blocks.0.mlp.fc.weight" in acc.Tags()["histograms"]
    grads = acc.Histograms("grads/blocks.0.mlp.fc.weight")
    assert [h.step for h in grads] == [4, 8] and grads[0].histogram_value.num == 64 * 32
    h = grads[0].histogram_value
    assert sum(h.bucket) == h.num and h.min < 0 < h.max and h.bucket_limit[-1] == pytest.approx(
        h.max, rel=1e-6)
    ln = acc.Histograms("weights/blocks.0.ln_1.weight")[0].histogram_value  # ones, 3 steps on
    assert ln.num == 32 and sum(ln.bucket) == 32 and 0.9 < ln.min < ln.max < 1.1


def test_tensorboard_off_writes_no_events(make_config):
    run = train(make_config(run={"tensorboard": False}, train={"max_steps": 2}), progress=False)
    assert not (run / "tb").exists() and read_metrics(run)


def test_unwritable_tb_folder_warns_once_and_the_run_goes_on(make_config, capsys):
    trainer = Trainer(make_config(telemetry={"every": 2}), progress=False)
    trainer.state.run_dir.mkdir(parents=True)
    (trainer.state.run_dir / "tb").write_text("a file where the folder should be")
    run = trainer.run()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "TensorBoard" in line]
    assert len(warnings) == 1 and "the run goes on" in warnings[0], warnings
    assert warnings[0].startswith("lmlab: warning: TensorBoard: cannot write event files in")
    assert json.loads((run / "manifest.json").read_text())["status"] == "finished"
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == list(range(1, 9))


def test_resume_hides_what_the_first_attempt_wrote_past_its_checkpoint(make_config):
    from lmlab.train.loop import config_for_resume

    run = train(make_config(), progress=False)
    mid = str(run / "checkpoints" / "ckpt_0000004.pt")
    train(config_for_resume(mid, None, []), resume=mid, progress=False)
    losses = {e.step: e.value for e in _events(run).Scalars("train/loss")}
    assert sorted(losses) == list(range(1, 9))
    recorded = _recorded(run)["train/loss"]
    assert all(losses[s] == pytest.approx(recorded[s], rel=1e-6) for s in recorded)


@pytest.mark.slow
def test_the_tensorboard_server_serves_a_runs_scalars(make_config, tmp_path):
    run = train(make_config(telemetry={"every": 4}), progress=False)
    root = run.parent
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(root), "--host", "127.0.0.1",
         "--port", "0", "--load_fast", "false", "--reload_interval", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        deadline = time.time() + 120
        while url is None and time.time() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            m = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            url = m and m.group(1)
        assert url, "TensorBoard did not start"
        name = f"{run.name}/tb"
        while time.time() < deadline:
            runs = json.loads(urllib.request.urlopen(f"{url}/data/runs", timeout=10).read())
            if name in runs:
                break
            time.sleep(0.5)
        assert name in runs, runs
        recorded = _recorded(run)
        for tag in ("train/loss", "eval/val_loss", "grad_norm/blocks.1.attn.qkv.weight"):
            query = urllib.parse.urlencode({"run": name, "tag": tag})
            rows = json.loads(urllib.request.urlopen(
                f"{url}/data/plugin/scalars/scalars?{query}", timeout=10).read())
            served = {int(step): value for _, step, value in rows}  # [wall time, step, value]
            assert served.keys() == recorded[tag].keys(), tag
            assert all(served[s] == pytest.approx(v, rel=1e-6) for s, v in recorded[tag].items())
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
