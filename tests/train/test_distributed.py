"""A real 2-process `torchrun` on CPU (gloo), checked against one process.

Why a real launch: DDP's gradient averaging, the rank-seeded samplers, rank-0-only
writing and the gathered sampler states only exist across processes, so a mock
would test nothing of them. One launch (2 steps, a checkpoint after each) feeds
three checks:

(a) one step with batch B on each of 2 ranks gives the same parameters as one
    process with batch 2B on exactly the union of both ranks' windows. The
    single-process run is the real Trainer; only its batcher is replaced by one
    that concatenates the windows of two RandomBatchers seeded as rank 0 and
    rank 1 would be. DDP averages the ranks' mean gradients, which equals the
    mean over 2B, so the steps must agree up to float rounding. A negative
    control (rank 0's windows alone) shows the comparison can fail.
(b) the DDP checkpoint resumes in one process, exactly: restoring both ranks'
    sampler states from it, the single process reproduces DDP's second step.
(c) only rank 0 wrote: one run folder, one metrics record per step, the
    manifest says world_size 2.

The optimizer is SGD for the parameter comparison: its first step is linear in
the gradient, so a wrong average shows up at full size. Adam's first step is
about lr * sign(gradient), which would hide most gradient errors; the AdamW
path under DDP is still run (and compared, more loosely) in a second launch.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lmlab.config import from_dict
from lmlab.data.batcher import RandomBatcher
from lmlab.data.prepare import prepare
from lmlab.train.checkpoint import list_checkpoints, load_checkpoint
from lmlab.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[2]
B, T = 4, 32

pytestmark = pytest.mark.slow


def _corpus(tmp: Path) -> Path:
    """~20 KB of play-like text, prepared (both splits well above one window)."""
    rng = random.Random(0)
    words = ("thou art the king and i am not mine own lord but what say you good sir "
             "to be or not that is all we know of it hence away my heart").split()
    lines = []
    for i in range(500):
        lines.append(("ROMEO:" if i % 2 else "JULIET:") + " " +
                     " ".join(rng.choice(words) for _ in range(rng.randint(3, 8))))
    src = tmp / "play.txt"
    src.write_text("\n".join(lines) + "\n")
    out = tmp / "data"
    prepare([str(src)], out)
    return out


def _raw_config(data: Path, runs: Path, optimizer: str) -> dict:
    return {
        "run": {"name": "ddp", "seed": 7, "out_dir": str(runs)},
        "data": {"path": str(data), "block_size": T},
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64, "dropout": 0.0,
                  "bias": True, "pos_encoding": "learned"},
        "train": {"batch_size": B, "max_steps": 2, "lr": 0.5 if optimizer == "sgd" else 1e-2,
                  "min_lr": 1e-3, "warmup_steps": 1, "optimizer": optimizer, "momentum": 0.9,
                  "weight_decay": 0.1, "grad_clip": 1.0, "eval_every": 1, "eval_batches": 2,
                  "checkpoint_every": 1, "log_every": 1, "device": "cpu", "dtype": "float32"},
    }


def _torchrun(cfg_path: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "main.py"), "train", "--config", str(cfg_path), "--quiet"]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


class UnionBatcher:
    """Rank 0's B windows then rank 1's: the 2B windows the DDP step saw, in one batch."""

    def __init__(self, parts: list[RandomBatcher]) -> None:
        self.parts = parts

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(p.next() for p in self.parts), strict=True)
        return torch.cat(xs), torch.cat(ys)

    def state_dict(self) -> dict:
        return self.parts[0].state_dict()


_COUNTER = itertools.count()


def _single(raw: dict, ranks: int, resume: str | None = None,
            sampler_states: list[dict] | None = None, max_steps: int = 1) -> Trainer:
    """The real Trainer in this process, batch ranks*B, fed the ranks' windows."""
    raw = json.loads(json.dumps(raw))
    raw["train"].update(batch_size=B * ranks, max_steps=max_steps)
    raw["run"]["out_dir"] = str(Path(raw["run"]["out_dir"]).parent / f"single-{next(_COUNTER)}")
    cfg = from_dict(raw)
    trainer = Trainer(cfg, resume=resume, allow_config_change=resume is not None, progress=False)
    parts = [RandomBatcher(trainer.data.train, T, B, "cpu", cfg.run.seed, r) for r in range(ranks)]
    for part, state in zip(parts, sampler_states or [], strict=False):
        part.load_state_dict(state)
    trainer.batcher = UnionBatcher(parts)
    trainer.run()
    return trainer


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.adapter.network.state_dict().items()}


def _max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                  base: dict[str, torch.Tensor]) -> float:
    """max |a - b| over the size of the step taken (a - base), over all tensors."""
    worst = 0.0
    for k in base:
        step = (a[k] - base[k]).abs().max().item()
        if step == 0:
            assert torch.equal(a[k], b[k]), k
            continue
        worst = max(worst, (a[k] - b[k]).abs().max().item() / step)
    return worst


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("ddp")
    data = _corpus(tmp)
    raw = _raw_config(data, tmp / "runs", "sgd")
    cfg_path = tmp / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    proc = _torchrun(cfg_path, tmp)
    return {"tmp": tmp, "data": data, "raw": raw, "runs": tmp / "runs", "proc": proc}


def _run_dir(ddp_run: dict) -> Path:
    dirs = [p for p in ddp_run["runs"].iterdir() if p.is_dir()]
    assert len(dirs) == 1, f"expected one run folder (rank 0's), found {dirs}"
    return dirs[0]


def _ckpt_params(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_ddp_step_equals_single_process_with_double_batch(ddp_run: dict) -> None:
    run_dir = _run_dir(ddp_run)
    ckpts = list_checkpoints(run_dir / "checkpoints")
    assert [load_checkpoint(c)["step"] for c in ckpts] == [1, 2]
    ddp1 = _ckpt_params(ckpts[0])

    raw = ddp_run["raw"]
    cfg = from_dict(raw)
    torch.manual_seed(cfg.run.seed)
    from lmlab.model.build import build_adapter
    init = {k: v.detach().clone() for k, v in build_adapter(cfg, 97).network.state_dict().items()}

    both = _single(raw, ranks=2)
    assert both.step == 1
    rel = _max_rel_diff(ddp1, _params(both), init)
    assert rel < 1e-4, f"DDP step differs from the single-process 2B step by {rel:.2e} of a step"

    # negative control: rank 0's windows alone give a clearly different step
    alone = _single(raw, ranks=1)
    assert _max_rel_diff(ddp1, _params(alone), init) > 1e-2


def test_ddp_checkpoint_resumes_exactly_in_one_process(ddp_run: dict) -> None:
    original = _run_dir(ddp_run)
    ddp_last = _ckpt_params(list_checkpoints(original / "checkpoints")[-1])
    # resume copies: a resume writes into its run folder, and the other tests read the original
    run_dir = ddp_run["tmp"] / "copy-a" / original.name
    shutil.copytree(original, run_dir)
    first, last = list_checkpoints(run_dir / "checkpoints")
    ckpt = load_checkpoint(first)
    assert len(ckpt["sampler"]) == 2, "every rank's sampler state must be in the checkpoint"
    assert ckpt["sampler"][0]["batches_drawn"] == ckpt["sampler"][1]["batches_drawn"] == 1
    assert not torch.equal(ckpt["sampler"][0]["generator"], ckpt["sampler"][1]["generator"])

    # one process, batch 2B, both ranks' samplers restored: DDP's step 2 exactly
    resumed = _single(ddp_run["raw"], ranks=2, resume=str(first),
                      sampler_states=ckpt["sampler"], max_steps=2)
    assert resumed.step == 2
    assert resumed.run_dir == run_dir
    rel = _max_rel_diff(ddp_last, _params(resumed), ckpt["model"])
    assert rel < 1e-4, f"resumed step 2 differs from DDP's by {rel:.2e} of a step"

    # and the plain resume (what `lmlab train --resume RUN_DIR` does) continues the run
    raw = json.loads(json.dumps(ddp_run["raw"]))
    raw["train"]["max_steps"] = 3
    run_dir = ddp_run["tmp"] / "copy-b" / original.name
    shutil.copytree(original, run_dir)
    plain = Trainer(from_dict(raw), resume=str(run_dir), allow_config_change=True,
                    progress=False)
    assert plain.step == 2 and plain.run_dir == run_dir
    state = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])["sampler"][0]
    assert plain.batcher.state_dict()["batches_drawn"] == state["batches_drawn"] == 2
    plain.run()
    assert [load_checkpoint(c)["step"] for c in list_checkpoints(run_dir / "checkpoints")][-1] == 3
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["world_size"] == 1
    assert manifest["resumes"][-1]["at_step"] == 2


def test_only_rank_zero_writes(ddp_run: dict) -> None:
    run_dir = _run_dir(ddp_run)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    eval_steps = [r["step"] for r in records if r["kind"] == "eval"]
    assert train_steps == [1, 2], f"each step logged once, by rank 0 only: {train_steps}"
    assert eval_steps == [0, 1, 2], f"each eval logged once, by rank 0 only: {eval_steps}"
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert all(not n.startswith(".") for n in names), f"stray temp files: {names}"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["status"] == "finished"
    assert list(ddp_run["tmp"].glob("runs/*/checkpoints/*.pt")), "rank 0 wrote checkpoints"
    assert len(list(ddp_run["runs"].iterdir())) == 1, "rank 1 made no run folder of its own"


def test_adamw_under_ddp_matches_single_process(tmp_path: Path, ddp_run: dict) -> None:
    """The default optimizer (fused AdamW) under DDP: same step as one process with 2B."""
    raw = _raw_config(ddp_run["data"], tmp_path / "runs", "adamw")
    raw["train"]["max_steps"] = 1
    cfg_path = tmp_path / "adamw.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    _torchrun(cfg_path, tmp_path)
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    (ckpt,) = list_checkpoints(run_dir / "checkpoints")
    ddp = _ckpt_params(ckpt)
    single = _params(_single(raw, ranks=2))
    # Adam's first step is ~lr*sign(g): compare absolutely, allowing a few coordinates whose
    # gradient is ~0 (where rounding can move g/(|g|+eps) by up to 2*lr)
    lr = raw["train"]["lr"] * 1.0
    for k in ddp:
        diff = (ddp[k] - single[k]).abs()
        assert (diff > 1e-3 * lr).float().mean().item() < 0.01, k
