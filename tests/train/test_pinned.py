"""Behaviour pinned bit for bit: per-step losses, config hashes, and an old checkpoint's resume.

The expected values in `pinned.json` (and the checkpoint in `pinned_ckpt/`)
were written by the code as it stood before the training loop was redesigned
(issue 18), with `python tests/train/test_pinned.py --write`. A refactor must
leave every one of them equal (`==`, not approx): same losses step for step on
the same machine in fp32 on one thread, same `config_hash` and `base_hash` for
every shipped config and for configs that set each later-added key, and a
checkpoint written then still resumes to the same losses as a straight run.
Rewrite the fixture only for a change that is meant to move behaviour, and say
so in the commit.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "pinned.json"
CKPT_FIXTURE = HERE / "pinned_ckpt"

pytestmark = pytest.mark.usefixtures("one_thread")

# --- the runs whose losses are pinned (on top of tests/conftest.py's tiny_config) -----

SPEEDRUN_MODEL = {"pos_encoding": "rotary", "norm": "rmsnorm", "mlp": "relu2", "qk_norm": True,
                  "tie_embeddings": False, "zero_init_proj": True, "logit_softcap": 30.0,
                  "value_embed": True, "embed_skip": True}
SPEEDRUN_TRAIN = {"optimizer": "muon", "muon_lr": 1e-2, "embed_lr": 3e-2, "schedule": "wsd",
                  "decay_fraction": 0.5, "min_lr": 0.0, "muon_ns_dtype": "float32"}
RUNS: dict[str, dict[str, dict[str, Any]]] = {
    "plain": {},
    "dropout_grad_accum": {"model": {"dropout": 0.1}, "train": {"grad_accum": 2}},
    "muon": {"train": {"optimizer": "muon", "muon_lr": 2e-2, "muon_ns_dtype": "float32"}},
    "feedback_alignment": {"hooks": {"backward": [{"name": "feedback_alignment",
                                                    "at": "blocks.*.mlp.*"}]}},
    "speedrun": {"model": SPEEDRUN_MODEL, "train": SPEEDRUN_TRAIN},
    "swiglu_sinusoidal_lion": {"model": {"mlp": "swiglu", "pos_encoding": "sinusoidal",
                                         "bias": True},
                               "train": {"optimizer": "lion", "lr": 1e-3, "schedule": "linear"}},
    "sgd_constant": {"train": {"optimizer": "sgd", "lr": 0.3, "schedule": "constant",
                               "grad_clip": 0.0}},
    "hooks_and_telemetry": {
        "hooks": {"forward": [{"name": "scale", "at": "blocks.0.hook_attn_out", "factor": 0.5}],
                  "update": [{"name": "clip_per_param", "max_norm": 0.5}],
                  "aux_losses": [{"name": "attn_entropy", "weight": 0.01}]},
        "telemetry": {"every": 2, "activations": ["blocks.*.hook_resid_post"]}},
}


def run_losses(data_dir: Path, out_dir: Path, sections: dict[str, dict[str, Any]]) -> dict:
    """The train losses and eval losses of one pinned run, as exact float hex strings."""
    from lmlab.records import read_metrics
    from lmlab.train.loop import train
    from tests.conftest import tiny_config

    cfg = tiny_config(data_dir, out_dir, run={"tensorboard": False}, **sections)
    run = train(cfg, progress=False)
    return _curve(read_metrics(run))


def _curve(records: list[dict]) -> dict[str, list[list]]:
    return {"train": [[r["step"], float(r["loss"]).hex()] for r in records if r["kind"] == "train"],
            "eval": [[r["step"], float(r["val_loss"]).hex()]
                     for r in records if r["kind"] == "eval"]}


# --- the configs whose hashes are pinned --------------------------------------------

# each key added after the first release, set away from its default (a valid config each)
LATER_SET = {
    "model.norm": "rmsnorm", "model.mlp": "relu2", "model.qk_norm": True,
    "model.tie_embeddings": False, "model.logit_softcap": 15.0, "model.zero_init_proj": True,
    "model.value_embed": True, "model.embed_skip": True,
    "train.decay_fraction": 0.3, "train.time_budget_s": 60.0, "train.muon_lr": 0.02,
    "train.embed_lr": 0.01, "train.muon_ns_dtype": "float32", "train.on_nonfinite": "skip",
    "train.max_nonfinite_skips": 3, "run.tensorboard": False,
    "telemetry.every": 5, "telemetry.params": False,
    "telemetry.activations": ["blocks.*.hook_resid_post"], "telemetry.attention": False,
    "telemetry.logits": False, "telemetry.histograms": True,
}
IMPORTED = {"model": {"model_name": "smollm2-135m-instruct"}}
FINETUNE_SET = {"method": "lora", "r": 8, "alpha": 16.0, "dropout": 0.1,
                "target_modules": ["q_proj", "v_proj"]}


def hash_cases() -> dict[str, dict[str, Any]]:
    """name -> a raw config mapping (a `base:`-resolved shipped config, or a variation)."""
    from lmlab.config import CONFIG_DIR, apply_overrides, load_raw
    from lmlab.sweeps.spec import load_sweep

    cases: dict[str, dict[str, Any]] = {"default": {}}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        cases[f"configs/{path.name}"] = load_raw(str(path))
    for path in sorted((CONFIG_DIR / "sweeps").glob("*.yaml")):
        for r in load_sweep(path).runs:
            cases[f"configs/sweeps/{path.name}:{r.key}"] = r.config
    for key, value in LATER_SET.items():
        section, name = key.split(".")
        raw = {section: {name: value}}
        if key == "telemetry.histograms":
            raw["run"] = {"tensorboard": True}
        cases[f"set {key}"] = raw
    cases["set train.activation_checkpointing"] = {
        **IMPORTED, "train": {"activation_checkpointing": True}}
    cases["imported, full"] = IMPORTED
    for key, value in FINETUNE_SET.items():
        ft = {"method": "lora", key: value}
        cases[f"set train.finetune.{key}"] = {**IMPORTED, "train": {"finetune": ft}}
    cases["every later key at once"] = apply_overrides(
        {}, [f"{k}={json.dumps(v)}" for k, v in LATER_SET.items() if k != "telemetry.histograms"])
    cases["every original key changed"] = {
        "run": {"name": "x", "seed": 1, "out_dir": "elsewhere"},
        "data": {"path": "data/x", "block_size": 64},
        "model": {"n_layer": 2, "n_head": 2, "d_model": 64, "d_ff": 128, "dropout": 0.1,
                  "bias": True, "pos_encoding": "sinusoidal", "dtype": "bfloat16"},
        "train": {"batch_size": 8, "grad_accum": 2, "max_steps": 10, "lr": 2e-3, "min_lr": 0.0,
                  "warmup_steps": 3, "schedule": "linear", "optimizer": "sgd",
                  "weight_decay": 0.0, "beta1": 0.8, "beta2": 0.95, "momentum": 0.5,
                  "grad_clip": 0.0, "eval_every": 5, "eval_batches": None,
                  "checkpoint_every": 5, "keep_checkpoints": 1, "log_every": 2,
                  "sample_every": 5, "device": "cpu", "parallel": "fsdp", "dtype": "bfloat16",
                  "compile": True, "threads": 2},
        "hooks": {"forward": [{"name": "scale", "at": "blocks.0.hook_attn_out", "factor": 0.5}],
                  "plugins": ["my_rules.py"]},
    }
    return cases


def config_hashes(raw: dict[str, Any]) -> list[str]:
    from lmlab.config import from_dict

    cfg = from_dict(raw)
    return [cfg.hash(), cfg.base_hash()]


def old_dict_hashes() -> dict[str, str]:
    """config_hash of dicts saved before later keys existed (old manifests and checkpoints)."""
    from lmlab.config import Config, config_hash

    full = Config().to_dict()
    no_later = json.loads(json.dumps(full))
    for key in (*LATER_SET, "train.activation_checkpointing", "train.finetune"):
        section, name = key.split(".")
        no_later[section].pop(name, None)
    no_telemetry = json.loads(json.dumps(no_later))
    no_telemetry.pop("telemetry")
    return {"full": config_hash(full), "without later keys": config_hash(no_later),
            "without later keys or telemetry": config_hash(no_telemetry)}


# --- the checkpoint written by the old code -------------------------------------------

CKPT_SECTIONS = {"run": {"name": "pinned", "seed": 3, "out_dir": "runs", "tensorboard": False},
                 "data": {"path": "corpus", "block_size": 16},
                 "model": {"n_layer": 1, "n_head": 2, "d_model": 16, "d_ff": 32,
                           "dropout": 0.1},
                 "train": {"batch_size": 2, "max_steps": 8, "lr": 3e-3, "warmup_steps": 2,
                           "eval_every": 4, "eval_batches": 2, "checkpoint_every": 4,
                           "keep_checkpoints": 5, "log_every": 1, "device": "cpu",
                           "dtype": "float32"}}


def _ckpt_workdir(tmp: Path, corpus: Path) -> Path:
    """`tmp` with `corpus` linked to the prepared data, so the run's relative paths work."""
    (tmp / "corpus").symlink_to(corpus, target_is_directory=True)
    return tmp


def write_checkpoint_fixture(corpus: Path, tmp: Path) -> dict:
    """Run the checkpoint config straight; keep its folder with only the step-4 checkpoint."""
    import os

    from lmlab.config import from_dict
    from lmlab.records import read_metrics
    from lmlab.train.loop import train

    work = _ckpt_workdir(tmp, corpus)
    here = os.getcwd()
    os.chdir(work)
    try:
        run = work / train(from_dict(CKPT_SECTIONS), progress=False)
        if CKPT_FIXTURE.exists():
            shutil.rmtree(CKPT_FIXTURE)
        (CKPT_FIXTURE / "checkpoints").mkdir(parents=True)
        for name in ("manifest.json", "config.yaml", "metrics.jsonl",
                     "checkpoints/ckpt_0000004.pt"):
            shutil.copy(run / name, CKPT_FIXTURE / name)
        return {"run_id": run.name, **_curve(read_metrics(run))}
    finally:
        os.chdir(here)


# --- the tests ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pinned() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("name", list(RUNS))
def test_losses_are_bit_identical(name, pinned, corpus_dir, tmp_path):
    assert run_losses(corpus_dir, tmp_path, RUNS[name]) == pinned["losses"][name]


def test_every_hash_is_unchanged(pinned):
    cases = hash_cases()
    assert set(cases) == set(pinned["hashes"])
    changed = {name: (config_hashes(raw), pinned["hashes"][name])
               for name, raw in cases.items() if config_hashes(raw) != pinned["hashes"][name]}
    assert changed == {}


def test_configs_saved_before_later_keys_hash_as_they_did(pinned):
    assert old_dict_hashes() == pinned["old_dicts"]


def test_a_checkpoint_from_before_the_redesign_resumes_exactly(pinned, corpus_dir, tmp_path,
                                                               monkeypatch):
    from lmlab.config import from_dict
    from lmlab.records import read_manifest, read_metrics
    from lmlab.train.loop import config_for_resume, train

    expected = pinned["checkpoint"]
    work = _ckpt_workdir(tmp_path, corpus_dir)
    monkeypatch.chdir(work)
    # straight, today: the same curve as the old code's
    straight = train(from_dict(CKPT_SECTIONS), progress=False)
    assert _curve(read_metrics(straight)) == {k: expected[k] for k in ("train", "eval")}
    # the old code's run folder, resumed from its step-4 checkpoint: steps 5..8 the same
    old = work / "runs" / expected["run_id"]
    shutil.copytree(CKPT_FIXTURE, old)
    ckpt = str(old / "checkpoints" / "ckpt_0000004.pt")
    run = train(config_for_resume(ckpt, None, []), resume=ckpt, progress=False)
    assert run.resolve() == old.resolve()
    assert _curve(read_metrics(run)) == {k: expected[k] for k in ("train", "eval")}
    m = read_manifest(run)
    assert m["status"] == "finished" and m["resumes"][0]["config_changes"] == []


def main() -> None:
    """Write pinned.json and pinned_ckpt/ with the code as it is (only on purpose)."""
    import tempfile

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "src"))
    from lmlab.data.prepare import prepare
    from tests.conftest import play_text

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = root / "corpus" / "play.txt"
        src.parent.mkdir()
        src.write_text(play_text(40_000))
        prepare([str(src)], root / "corpus" / "data")
        corpus = root / "corpus" / "data"
        out = {"losses": {name: run_losses(corpus, root / name, s) for name, s in RUNS.items()},
               "hashes": {name: config_hashes(raw) for name, raw in hash_cases().items()},
               "old_dicts": old_dict_hashes()}
        (root / "ckpt").mkdir()
        out["checkpoint"] = write_checkpoint_fixture(corpus, root / "ckpt")
    text = json.dumps(out, indent=1)
    FIXTURE.write_text(re.sub(r"\[\s+([^\[\]{}]*?)\s+\]",  # each innermost list on one line
                              lambda m: "[" + re.sub(r"\s*\n\s*", " ", m[1]) + "]", text) + "\n")
    print(f"wrote {FIXTURE} and {CKPT_FIXTURE}")


if __name__ == "__main__" and "--write" in sys.argv:
    main()
