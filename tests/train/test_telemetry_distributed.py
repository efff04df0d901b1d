"""Telemetry under a real 2-process torchrun (gloo): figures of the whole model and batch.

Rank 0 alone records, but every rank measures its own windows and (under FSDP)
its own shards, and the sums and maxima are reduced over ranks. So one step
on 2 ranks with batch B each must record what one process records with batch
2B on the union of both ranks' windows (the same comparison as
test_distributed.py makes of the weights), here with gradient accumulation and
clipping on. (Under FSDP the attention pass, a forward pass of the root, must
leave the root's weights sharded again: otherwise clipping, which came next,
saw gathered copies and left the embeddings unclipped; this test caught it.)
"""

from __future__ import annotations

import json

import pytest
import yaml

from lmlab.records import read_metrics
from tests.train.test_distributed import _corpus, _raw_config, _single, _torchrun

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_rank_zero_records_the_whole_models_telemetry(parallel, tmp_path):
    data = _corpus(tmp_path)
    raw = _raw_config(data, tmp_path / "runs", "sgd", parallel)
    raw["train"].update(max_steps=1, grad_accum=2, sample_every=0, eval_every=100,
                        checkpoint_every=100)
    raw["telemetry"] = {"every": 1, "activations": ["blocks.*.hook_resid_post",
                                                    "blocks.*.mlp.hook_post"]}
    cfg_path = tmp_path / "telemetry.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    _torchrun(["--config", str(cfg_path)], tmp_path)
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    (launched,) = [r for r in read_metrics(run_dir) if r["kind"] == "telemetry"]
    assert json.loads((run_dir / "manifest.json").read_text())["world_size"] == 2
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1  # rank 0's alone

    single = _single(raw, ranks=2)  # one process, batch 2B, both ranks' windows
    (reference,) = [r for r in read_metrics(single.state.run_dir) if r["kind"] == "telemetry"]
    assert launched.keys() == reference.keys()
    assert any(k.startswith("attn_entropy/") for k in launched)
    # clipping is on: the step must see the whole model again after the attention pass
    grad_norm = sum(v * v for k, v in reference.items() if k.startswith("grad_norm/")) ** 0.5
    assert grad_norm > raw["train"]["grad_clip"]
    for key, value in reference.items():
        if key in ("kind", "step"):
            assert launched[key] == value
        else:
            assert launched[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
