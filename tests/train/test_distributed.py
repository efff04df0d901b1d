"""A real 2-process `torchrun` on CPU (gloo), checked against one process.

Why a real launch: DDP's gradient averaging, FSDP's sharding and gathering, the
rank-seeded samplers, rank-0-only writing and the gathered sampler states only
exist across processes, so a mock would test nothing of them. Every check runs
for both `train.parallel` strategies: `ddp` (replicas) and `fsdp` (each rank
holds half of every tensor; checkpoints gather whole ones). One launch (2 steps,
a checkpoint after each, a sample at steps 0 and 2) feeds three checks:

(a) one step with batch B on each of 2 ranks gives the same parameters as one
    process with batch 2B on exactly the union of both ranks' windows. The
    single-process run is the real Trainer; only its batcher is replaced by one
    that concatenates the windows of two RandomBatchers seeded as rank 0 and
    rank 1 would be. DDP averages the ranks' mean gradients, which equals the
    mean over 2B, so the steps must agree up to float rounding. A negative
    control (rank 0's windows alone) shows the comparison can fail.
(b) the DDP checkpoint resumes in one process, exactly: restoring both ranks'
    sampler states from it, the single process reproduces DDP's second step.
(c) only rank 0 wrote: one run folder, one metrics record per step, one
    sample per sampling step (under FSDP both ranks must run that forward pass,
    or the launch hangs), the manifest says world_size 2.

The optimizer is SGD for the parameter comparison: its first step is linear in
the gradient, so a wrong average shows up at full size. Adam's first step is
about lr * sign(gradient), which would hide most gradient errors; the AdamW
path under DDP is still run (and compared, more loosely) in a second launch.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lmlab.config import from_dict
from lmlab.data.batcher import RandomBatcher
from lmlab.data.prepare import prepare
from lmlab.errors import LmlabError
from lmlab.model.checkpoint import list_checkpoints, load_checkpoint
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


def _raw_config(data: Path, runs: Path, optimizer: str, parallel: str) -> dict:
    return {
        "run": {"name": "ddp", "seed": 7, "out_dir": str(runs)},
        "data": {"path": str(data), "block_size": T},
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64, "dropout": 0.0,
                  "bias": True, "pos_encoding": "learned"},
        "train": {"batch_size": B, "max_steps": 2, "lr": 0.5 if optimizer == "sgd" else 1e-2,
                  "min_lr": 1e-3, "warmup_steps": 1, "optimizer": optimizer, "momentum": 0.9,
                  "weight_decay": 0.1, "grad_clip": 1.0, "eval_every": 1, "eval_batches": 2,
                  "checkpoint_every": 1, "log_every": 1, "sample_every": 2, "device": "cpu",
                  "dtype": "float32", "parallel": parallel},
    }


def _torchrun_cmd(args: list[str]) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(ROOT / "main.py"), "train", *args, "--quiet"], env


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd, env = _torchrun_cmd(args)
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
    tokens = trainer.state.data.train
    parts = [RandomBatcher(tokens, T, B, "cpu", cfg.run.seed, r) for r in range(ranks)]
    for part, state in zip(parts, sampler_states or [], strict=False):
        part.load_state_dict(state)
    trainer.state.batcher = UnionBatcher(parts)
    trainer.run()
    return trainer


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.state.adapter.network.state_dict().items()}


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


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def ddp_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp(request.param)
    data = _corpus(tmp)
    raw = _raw_config(data, tmp / "runs", "sgd", request.param)
    cfg_path = tmp / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    proc = _torchrun(["--config", str(cfg_path)], tmp)
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
    assert both.state.step == 1
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
    assert resumed.state.step == 2
    assert resumed.state.run_dir == run_dir
    rel = _max_rel_diff(ddp_last, _params(resumed), ckpt["model"])
    assert rel < 1e-4, f"resumed step 2 differs from DDP's by {rel:.2e} of a step"

    # the plain resume (what `lmlab train --resume RUN_DIR` does): one process instead of two
    # halves the effective batch, so it is refused unless allowed, and then recorded
    raw = json.loads(json.dumps(ddp_run["raw"]))
    raw["train"]["max_steps"] = 3
    run_dir = ddp_run["tmp"] / "copy-b" / original.name
    shutil.copytree(original, run_dir)
    with pytest.raises(LmlabError, match="world size: 2 -> 1 processes"):
        Trainer(from_dict(ddp_run["raw"]), resume=str(run_dir), progress=False)
    plain = Trainer(from_dict(raw), resume=str(run_dir), allow_config_change=True,
                    progress=False)
    assert plain.state.step == 2 and plain.state.run_dir == run_dir
    state = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])["sampler"][0]
    assert plain.state.batcher.state_dict()["batches_drawn"] == state["batches_drawn"] == 2
    plain.run()
    assert [load_checkpoint(c)["step"] for c in list_checkpoints(run_dir / "checkpoints")][-1] == 3
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["world_size"] == 1
    assert manifest["resumes"][-1]["at_step"] == 2
    changes = manifest["resumes"][-1]["config_changes"]
    assert any(c.startswith("world size: 2 -> 1") for c in changes), changes


def test_checkpoint_resumes_under_torchrun(ddp_run: dict) -> None:
    """Step 1's checkpoint, resumed by 2 ranks, gives the launch's own step 2.

    SGD with momentum: step 2 uses the momentum buffer saved at step 1, which
    under FSDP is gathered whole into the checkpoint and cut back into shards.
    """
    original = _run_dir(ddp_run)
    straight = _ckpt_params(list_checkpoints(original / "checkpoints")[-1])
    run_dir = ddp_run["tmp"] / "copy-c" / original.name
    shutil.copytree(original, run_dir)
    first = list_checkpoints(run_dir / "checkpoints")[0]
    _torchrun(["--resume", str(first)], ddp_run["tmp"])
    resumed = _ckpt_params(list_checkpoints(run_dir / "checkpoints")[-1])
    rel = _max_rel_diff(straight, resumed, load_checkpoint(first)["model"])
    assert rel < 1e-5, f"resumed step 2 differs from the straight run's by {rel:.2e} of a step"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["resumes"][-1]["at_step"] == 1 and manifest["world_size"] == 2


def test_only_rank_zero_writes(ddp_run: dict) -> None:
    run_dir = _run_dir(ddp_run)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    eval_steps = [r["step"] for r in records if r["kind"] == "eval"]
    assert train_steps == [1, 2], f"each step logged once, by rank 0 only: {train_steps}"
    assert eval_steps == [0, 1, 2], f"each eval logged once, by rank 0 only: {eval_steps}"
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert all(not n.startswith(".") for n in names), f"stray temp files: {names}"
    samples = (run_dir / "samples.txt").read_text()
    assert [line for line in samples.splitlines() if line.startswith("--- step")] == [
        "--- step 0", "--- step 2"], "each sample written once, by rank 0 only"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["status"] == "finished"
    assert manifest["config"]["train"]["parallel"] == ddp_run["raw"]["train"]["parallel"]
    assert list(ddp_run["tmp"].glob("runs/*/checkpoints/*.pt")), "rank 0 wrote checkpoints"
    assert len(list(ddp_run["runs"].iterdir())) == 1, "rank 1 made no run folder of its own"


def test_adamw_under_ddp_matches_single_process(tmp_path: Path, ddp_run: dict) -> None:
    """The default optimizer (fused AdamW, on shards under FSDP): as one process with 2B."""
    raw = _raw_config(ddp_run["data"], tmp_path / "runs", "adamw",
                      ddp_run["raw"]["train"]["parallel"])
    raw["train"]["max_steps"] = 1
    cfg_path = tmp_path / "adamw.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    _torchrun(["--config", str(cfg_path)], tmp_path)
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


def test_hooks_act_alike_on_shards_and_replicas(tmp_path: Path) -> None:
    """Hooks of every kind give the same 2 steps under FSDP as under DDP (with accumulation).

    Under FSDP a parameter (and its gradient) outside the forward pass is a
    shard: per-tensor norms, orthogonalisation, seeded noise and Gram matrices
    must still mean the whole tensor, or the two launches part ways.
    """
    data = _corpus(tmp_path)
    hooks = {"forward": [{"name": "scale", "at": "blocks.*.hook_attn_out", "factor": 0.7}],
             "backward": [{"name": "feedback_alignment", "at": "blocks.0.mlp.*"}],
             "update": [{"name": "noise", "std": 1e-3, "seed": 1}, {"name": "orthogonalise"},
                        {"name": "clip_per_param", "max_norm": 0.05}],
             "aux_losses": [{"name": "weight_orthogonality", "weight": 0.1}]}
    params = {}
    for parallel in ("ddp", "fsdp"):
        raw = _raw_config(data, tmp_path / parallel, "sgd", parallel) | {"hooks": hooks}
        raw["train"].update(sample_every=0, checkpoint_every=2, grad_accum=2)
        cfg_path = tmp_path / f"{parallel}.yaml"
        cfg_path.write_text(yaml.safe_dump(raw))
        _torchrun(["--config", str(cfg_path)], tmp_path)
        (ckpt,) = list_checkpoints(next((tmp_path / parallel).iterdir()) / "checkpoints")
        params[parallel] = _ckpt_params(ckpt)
    torch.manual_seed(7)
    from lmlab.model.build import build_adapter
    init = build_adapter(from_dict(raw), 97).network.state_dict()
    rel = _max_rel_diff(params["fsdp"], params["ddp"], init)
    assert rel < 1e-4, f"FSDP and DDP differ by {rel:.2e} of the distance travelled"


def _worker_with_rank(launcher: int, rank: int) -> int:
    """The pid of the torchrun worker (a child of `launcher`) whose RANK is `rank`."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher}")


def test_ctrl_c_reaching_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    """A SIGINT that reaches rank 1 alone still ends the run cleanly with a checkpoint.

    Rank 1 must tell rank 0, which alone writes: the ranks agree on stopping
    before each step. Without that, rank 1 would stop and wait in the
    checkpoint's collectives while rank 0 waited in the next step's all-reduce.
    """
    data = _corpus(tmp_path)
    raw = _raw_config(data, tmp_path / "runs", "adamw", "ddp")
    raw["train"].update(max_steps=100_000, eval_every=100_000, checkpoint_every=100_000,
                        sample_every=0)
    cfg_path = tmp_path / "long.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    cmd, env = _torchrun_cmd(["--config", str(cfg_path)])
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline, run_dir = time.time() + 120, None
        while time.time() < deadline and run_dir is None:
            found = list((tmp_path / "runs").glob("*/metrics.jsonl"))
            if found and found[0].read_text().count('"train"') >= 3:
                run_dir = found[0].parent
            time.sleep(0.1)
        assert run_dir is not None, "the run never logged 3 steps"
        os.kill(_worker_with_rank(proc.pid, 1), signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:  # on failure, no worker may outlive the test (hung ranks wait 30 min)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    (ckpt,) = list_checkpoints(run_dir / "checkpoints")
    step = load_checkpoint(ckpt)["step"]
    assert 3 <= step < 100_000 and manifest["final"]["step"] == step


def test_non_finite_loss_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    """A loss that turns NaN on rank 1 alone stops both ranks before the update.

    Rank 1's plugin poisons its 3rd training forward; rank 0's batches stay
    finite. Both must stop at step 3 with the step-2 checkpoint intact, and
    promptly: a rank that raised alone would leave the other in the all-reduce.
    """
    plugin = tmp_path / "poison_rank1.py"
    plugin.write_text(
        "import torch, torch.distributed as dist\n"
        "from lmlab.hooks.registry import register\n"
        "calls = [0]\n"
        "@register('forward')\n"
        "def poison_rank1(x, point):\n"
        "    calls[0] += torch.is_grad_enabled()  # evaluation runs without grad\n"
        "    return x * float('nan') if dist.get_rank() == 1 and calls[0] == 3 else x\n")
    data = _corpus(tmp_path)
    raw = _raw_config(data, tmp_path / "runs", "adamw", "ddp")
    raw["train"].update(max_steps=6, checkpoint_every=2, eval_every=100, sample_every=0)
    raw["hooks"] = {"plugins": [str(plugin)],
                    "forward": [{"name": "poison_rank1", "at": "hook_embed"}]}
    cfg_path = tmp_path / "poison.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    cmd, env = _torchrun_cmd(["--config", str(cfg_path)])
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "loss became nan at step 3" in proc.stderr  # rank 1's own message
    assert "non-finite on another rank at step 3" in proc.stderr  # rank 0 heard of it
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "failed"
    (ckpt,) = list_checkpoints(run_dir / "checkpoints")
    assert load_checkpoint(ckpt)["step"] == 2
