"""Fault injection: what a hostile world does to a run, and what lmlab promises after it.

Real processes are SIGKILLed at seeded moments (mid-training, mid-checkpoint,
between a checkpoint's write and its rename, mid-manifest, mid-resume); a real
tmpfs fills up and turns read-only; checkpoint bytes are flipped; records are
malformed; plugins inject NaN/inf into activations, gradients and weights and
return wrong shapes. Each case checks the exit code, one clear message, no
traceback, that the newest checkpoint loads, verifies and is finite, and that
no partial file is taken for a real one.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from lmlab.cli import main
from lmlab.model.checkpoint import list_checkpoints, load_checkpoint, nonfinite_tensors
from lmlab.records import read_manifest, read_metrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SEED = 10  # picks the kill moments; change it to explore others
MAX_STEPS = 12

# Runs main.py with one fault armed (LMLAB_KILL_AT): SIGKILL itself at that exact moment.
DRIVER = r"""
import os, runpy, signal, sys
sys.path.insert(0, os.path.join(os.getcwd(), "src"))
kind, target, n, extra = (os.environ["LMLAB_KILL_AT"].split(":") + [""] * 4)[:4]
n, seen = int(n), [0]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def due(path):
    if target in str(path):
        seen[0] += 1
        return seen[0] == n
    return False

if kind == "replace":  # the temp file is complete and fsynced, not yet renamed
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        if due(dst):
            die()
        return real_replace(src, dst, *a, **k)
    os.replace = replace
elif kind == "write":  # part-way through writing the temp file (a torn write)
    import lmlab.fileio as fio
    import lmlab.model.checkpoint as ckpt
    real_write = fio.atomic_write_bytes
    def atomic_write_bytes(path, write):
        if due(path):
            def torn(f):
                write(f)
                f.flush()
                f.truncate(int(extra))
                die()
            return real_write(path, torn)
        return real_write(path, write)
    fio.atomic_write_bytes = ckpt.atomic_write_bytes = atomic_write_bytes
elif kind == "step":  # at the start of training step n
    from lmlab.train.loop import Trainer
    real_step = Trainer.step
    def train_step(self, lr):
        if self.state.step + 1 == n:
            die()
        return real_step(self, lr)
    Trainer.step = train_step
sys.argv = ["main.py", *sys.argv[1:]]
runpy.run_path("main.py", run_name="__main__")
"""


@pytest.fixture(autouse=True)
def _threads():
    """Configs here use one thread (bit-exact across processes); restore the suite's count."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from lmlab.data.prepare import prepare
    from tests.conftest import play_text

    root = tmp_path_factory.mktemp("faults")
    (root / "play.txt").write_text(play_text(12_000, seed=3))
    prepare([str(root / "play.txt")], root / "data")
    return root / "data"


def config(data_dir: Path, out: Path, **train) -> dict:
    return {
        "run": {"name": "f", "seed": 3, "out_dir": str(out)},
        "data": {"path": str(data_dir), "block_size": 32},
        "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "d_ff": 64},
        "train": {"batch_size": 4, "max_steps": MAX_STEPS, "lr": 3e-3, "warmup_steps": 2,
                  "eval_every": 6, "eval_batches": 1, "checkpoint_every": 3, "log_every": 1,
                  "keep_checkpoints": 10, "device": "cpu", "threads": 1, **train},
    }


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`lmlab ARGV` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(err: str) -> str:
    """The single `lmlab: error:` line of stderr (asserting there is exactly one, no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("lmlab: error:")]
    assert len(lines) == 1, err
    return lines[0]


def only_run(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


def losses(run: Path) -> dict[int, float]:
    """Train loss by step; each step must appear exactly once (a consistent curve)."""
    steps = [r["step"] for r in read_metrics(run) if r["kind"] == "train"]
    assert len(steps) == len(set(steps)), steps
    return {r["step"]: r["loss"] for r in read_metrics(run) if r["kind"] == "train"}


def assert_newest_good(run: Path) -> Path:
    """The newest checkpoint loads, matches its hash and is finite; temps are never listed."""
    ckpts = list_checkpoints(run / "checkpoints")
    assert ckpts and all(not p.name.startswith(".") for p in ckpts)
    ckpt = load_checkpoint(ckpts[-1])  # checks the content hash
    assert ckpt["sha256"] and not nonfinite_tensors(ckpt["model"])
    return ckpts[-1]


# --- SIGKILL ----------------------------------------------------------------------------


def kill_moments(rng: random.Random) -> list[tuple[str, str]]:
    """(name, LMLAB_KILL_AT) for a handful of moments, drawn from `rng`."""
    nth_ckpt = rng.randint(2, 3)  # checkpoints are written at steps 3, 6, 9
    return [
        ("mid-training", f"step::{rng.choice([s for s in range(5, MAX_STEPS) if s % 3])}"),
        ("torn checkpoint write", f"write:ckpt_:{nth_ckpt}:{rng.randint(100, 20_000)}"),
        ("checkpoint written, not renamed", f"replace:ckpt_:{rng.randint(2, 3)}"),
        ("final manifest update", "replace:manifest.json:2"),
    ]


def run_killed(argv: list[str], kill_at: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMLAB_KILL_AT": kill_at, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-c", DRIVER, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_sigkill_at_seeded_moments_then_eval_and_exact_resume(data_dir, tmp_path, capsys):
    from lmlab.config import from_dict
    from lmlab.train.loop import train

    straight = losses(train(from_dict(config(data_dir, tmp_path / "straight")), progress=False))
    assert sorted(straight) == list(range(1, MAX_STEPS + 1))
    rng = random.Random(SEED)
    moments = kill_moments(rng)
    for i, (name, kill_at) in enumerate(moments):
        out = tmp_path / f"k{i}"
        cfg_file = write_config(tmp_path / f"k{i}.yaml", config(data_dir, out))
        p = run_killed(["train", "--config", str(cfg_file), "--quiet"], kill_at)
        assert p.returncode == -signal.SIGKILL, (name, p.returncode, p.stderr[-2000:])
        run = only_run(out)
        temps = list((run / "checkpoints").glob(".*.tmp-*"))
        if "ckpt_" in kill_at:  # the partial file is there, and is not taken for a checkpoint
            assert temps, name
        assert read_manifest(run)["status"] == "running"
        rc, listing, err = cli(capsys, "runs", "--root", str(out), "list")
        assert rc == 0 and "died" in listing and "Traceback" not in err, (name, listing)
        rc, shown, _ = cli(capsys, "runs", "--root", str(out), "show", run.name)
        assert rc == 0 and "status: died" in shown, shown
        rc, report, err = cli(capsys, "runs", "--root", str(out), "verify", run.name)
        assert rc == 0 and "DAMAGED" not in report and "ok" in report, (name, report, err)
        newest = assert_newest_good(run)
        rc, ev, err = cli(capsys, "eval", "--checkpoint", str(run), "--json")
        assert rc == 0 and "Traceback" not in err, (name, err)
        result = json.loads(ev)
        assert result["checkpoint"] == str(newest) and math.isfinite(result["val_loss"])
        if i == 0:  # kill the resume too, while it rewrites metrics.jsonl
            before = read_metrics(run)
            p = run_killed(["train", "--resume", str(run), "--quiet"],
                           "replace:metrics.jsonl:1")
            assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
            assert read_metrics(run) == before  # the old log, whole: never an empty one
        rc, _, err = cli(capsys, "train", "--resume", str(run), "--quiet")
        assert rc == 0 and "Traceback" not in err, (name, err)
        assert not list(run.rglob(".*.tmp-*")), f"{name}: temp files of the dead process left"
        m = read_manifest(run)
        assert m["status"] == "finished" and m["pid"] == os.getpid() and m["resumes"]
        assert losses(run) == straight, f"{name}: the resumed curve is not bit-exact"
        assert_newest_good(run)


# --- a disk that fills up, then turns read-only -----------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    # a real full disk needs a real small filesystem: the suite runs as root (as CI does)
    assert p.returncode == 0, (f"mounting a 600 KB tmpfs failed ({p.stderr.strip()}): run the "
                               "tests as root, as CI does")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_and_read_only_give_one_line_and_keep_checkpoints(data_dir, small_disk,
                                                                    tmp_path, capsys):
    out = small_disk / "runs"
    cfg = write_config(tmp_path / "c.yaml", config(data_dir, out, checkpoint_every=1,
                                                   max_steps=200, eval_every=1000))
    rc, _, err = cli(capsys, "train", "--config", str(cfg), "--quiet")
    line = one_error(err)
    assert rc == 2 and "No space left on device (ENOSPC)" in line and str(small_disk) in line
    run = only_run(out)
    newest = assert_newest_good(run)
    assert f"last good checkpoint is {newest}" in line
    assert read_manifest(run)["status"] == "failed"
    assert not list(run.rglob(".*.tmp-*"))  # the failed write's temp file is gone
    rc, report, _ = cli(capsys, "runs", "--root", str(out), "verify", run.name)
    assert rc == 0 and "DAMAGED" not in report

    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:  # now not one byte is left
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    rc, _, err = cli(capsys, "train", "--resume", str(run), "--quiet")
    line = one_error(err)
    assert rc in (1, 2) and "ENOSPC" in line and str(run) in line
    assert load_checkpoint(newest)["step"] == int(newest.stem.split("_")[1])

    (small_disk / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    rc, _, err = cli(capsys, "train", "--resume", str(run), "--quiet")
    line = one_error(err)
    assert rc in (1, 2) and "Read-only file system (EROFS)" in line and str(run) in line
    assert_newest_good(run)

    # the folder turns read-only mid-run: the manifest cannot say "failed", and we are told so
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    shutil.rmtree(out)
    plugin = tmp_path / "remount.py"
    plugin.write_text(
        "import subprocess\n"
        "from lmlab.hooks.registry import register\n"
        "@register('update')\n"
        "def remount_ro(named_params, step, lr):\n"
        "    if step == 2:\n"
        f"        subprocess.run(['mount', '-o', 'remount,ro', '{small_disk}'], check=True)\n")
    cfg = config(data_dir, out, checkpoint_every=2)
    cfg["hooks"] = {"plugins": [str(plugin)], "update": [{"name": "remount_ro"}]}
    rc, _, err = cli(capsys, "train", "--config", str(write_config(tmp_path / "ro.yaml", cfg)),
                     "--quiet")
    line = one_error(err)
    run = only_run(out)
    assert rc == 2 and f"'{run / 'metrics.jsonl'}': Read-only file system (EROFS)" in line
    assert "stopped after step 3" in line and f"checkpoint is {assert_newest_good(run)}" in line
    assert "lmlab: warning: could not record status 'failed' in the manifest" in err
    assert read_manifest(run)["status"] == "running"


# --- corrupted bytes ----------------------------------------------------------------------


def flip_tensor_byte(path: Path) -> None:
    """Flip one byte in the middle of the largest tensor's data: same size, zip still valid."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))


def test_flipped_byte_in_a_tensor_is_refused_everywhere(data_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    cfg = write_config(tmp_path / "c.yaml", config(data_dir, out, max_steps=4,
                                                   checkpoint_every=2))
    assert cli(capsys, "train", "--config", str(cfg), "--quiet")[0] == 0
    run = only_run(out)
    older, newest = list_checkpoints(run / "checkpoints")
    size = newest.stat().st_size
    flip_tensor_byte(newest)
    assert newest.stat().st_size == size
    for argv in (["eval", "--checkpoint", str(run)], ["sample", "--checkpoint", str(newest)],
                 ["train", "--resume", str(newest), "--quiet"]):
        rc, _, err = cli(capsys, *argv)
        line = one_error(err)
        assert rc == 2 and str(newest) in line and line.count("sha256") == 1, line
        assert len([w for w in line.split() if len(w.strip(".,")) == 64]) == 2, line
    rc, report, err = cli(capsys, "runs", "--root", str(out), "verify", run.name)
    assert rc == 2 and f"DAMAGED  {newest.name}" in report and f"ok       {older.name}" in report
    assert f"the last good one is {older}" in one_error(err)
    assert cli(capsys, "eval", "--checkpoint", str(older))[0] == 0
    newest.write_bytes(newest.read_bytes()[: size // 2])  # truncated: refused as well
    rc, _, err = cli(capsys, "eval", "--checkpoint", str(newest))
    assert rc == 2 and "truncated, corrupt" in one_error(err)


# --- malformed records, and a reader that leaves ------------------------------------------


def test_malformed_records_are_skipped_and_named(data_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    for seed, name in enumerate(("a", "b", "c"), start=3):  # replicates: one seed each
        cfg = write_config(tmp_path / f"{name}.yaml",
                           {**config(data_dir, out, max_steps=2), "run": {
                               "name": name, "seed": seed, "out_dir": str(out)}})
        assert cli(capsys, "train", "--config", str(cfg), "--quiet")[0] == 0
    a, b, c = sorted(out.iterdir(), key=lambda p: p.name.split("-")[2])
    with open(a / "metrics.jsonl", "a") as f:
        f.write('[1, 2, 3]\n{"kind": "eval", "step": 60}\n'
                '{"kind": "train", "step": 1, "loss": 1.0, "tokens_per_s": "fast"}\n'
                '{"kind": "train", "st')
    n = len((a / "metrics.jsonl").read_text().splitlines())
    text = (c / "manifest.json").read_text()
    (c / "manifest.json").write_text(text[: len(text) // 2])
    rc, listing, err = cli(capsys, "runs", "--root", str(out), "list")
    assert rc == 0 and a.name in listing and b.name in listing and c.name not in listing
    assert "Traceback" not in err
    for line_no in (n - 3, n - 2, n - 1, n):
        assert f"skipped line {line_no} of {a / 'metrics.jsonl'}" in err
    assert f"skipped run {c.name}" in err and "not readable JSON" in err
    rc, shown, err = cli(capsys, "runs", "--root", str(out), "show", a.name)
    assert rc == 0 and "finished" in shown
    rc, report, err = cli(capsys, "runs", "--root", str(out), "compare", a.name, b.name)
    assert rc == 0 and report.startswith("Replicates") and "Traceback" not in err
    rc, _, err = cli(capsys, "runs", "--root", str(out), "show", c.name)
    assert rc == 2 and "manifest.json is not readable JSON" in one_error(err)
    rc, report, err = cli(capsys, "runs", "--root", str(out), "verify", c.name)
    assert rc == 2 and "DAMAGED  manifest.json" in report and "ok       ckpt_" in report
    assert f"Run {c.name} is damaged: manifest.json: " in one_error(err)
    assert "not readable JSON" in err and "checkpoints (" not in err  # the checkpoints are good

    # `runs compare A B | head -1`: the reader has gone before the report is written
    p = subprocess.Popen([sys.executable, "main.py", "runs", "--root", str(out), "compare",
                          a.name, b.name], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=60) == 1 and "Traceback" not in err and "BrokenPipe" not in err, err


# --- NaN and inf from plugins, wrong shapes, hooks that raise -----------------------------

PLUGIN = """
import torch
from lmlab.hooks.registry import register

def training():
    return torch.is_grad_enabled()

class _Bad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, value):
        ctx.value = value
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if ctx.value == "raise":
            raise ValueError("my backward broke")
        if ctx.value == "narrow":
            return g[..., :1], None
        return g * ctx.value, None

@register("forward")
class nan_acts:
    def __init__(self, *, after: int = 0, value: float = float("nan")):
        self.after, self.value, self.calls = after, value, 0
    def __call__(self, x, point):
        self.calls += training()
        return x * self.value if training() and self.calls > self.after else x

@register("backward")
class bad_grad:
    def __init__(self, *, after: int = 0, value: str = "inf"):
        self.after, self.value, self.calls = after, value, 0
    def __call__(self, x, point):
        self.calls += training()
        if not training() or self.calls <= self.after:
            return x
        return _Bad.apply(x, self.value if self.value in ("raise", "narrow") else
                          float(self.value))

@register("update")
def nan_weights(named_params, step, lr, *, at_step: int = 0):
    if step == at_step:
        named_params[0][1].data.fill_(float("nan"))

@register("forward")
def narrow(x, point):
    return x[..., :1]

@register("forward")
class boom:
    def __init__(self, *, after: int = 0):
        self.after, self.calls = after, 0
    def __call__(self, x, point):
        self.calls += training()
        if self.calls > self.after:
            return x * (1 // 0)
        return x
"""


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    """One plugin file for the module: a hook name belongs to one file for the process."""
    p = tmp_path_factory.mktemp("plugin") / "plugin.py"
    p.write_text(PLUGIN)
    return p


def hooked(plugin: Path, data_dir: Path, tmp_path: Path, hooks: dict, **train
           ) -> tuple[Path, Path]:
    out = tmp_path / f"runs{len(list(tmp_path.glob('*.yaml')))}"
    cfg = config(data_dir, out, **({"max_steps": 8, "checkpoint_every": 2} | train))
    cfg["hooks"] = {"plugins": [str(plugin)], **hooks}
    return write_config(tmp_path / f"h{len(list(tmp_path.glob('*.yaml')))}.yaml", cfg), out


@pytest.mark.parametrize("hooks, train, message, step", [
    ({"forward": [{"name": "nan_acts", "at": "hook_embed", "after": 4}]}, {},
     "The loss became nan at step 5", 4),
    ({"forward": [{"name": "nan_acts", "at": "hook_embed", "after": 4, "value": 1e39}]}, {},
     "The loss became", 4),
    ({"backward": [{"name": "bad_grad", "at": "blocks.0.hook_resid_post", "after": 4}]}, {},
     "The gradient norm became", 4),
    ({"backward": [{"name": "bad_grad", "at": "blocks.0.hook_resid_post", "after": 4,
                    "value": "nan"}]}, {"grad_clip": 0.0}, "The gradient norm became nan", 4),
    ({"update": [{"name": "nan_weights", "at_step": 3}]}, {},
     "Refusing to write", 2),
    ({"forward": [{"name": "narrow", "at": "blocks.0.hook_resid_post"}]}, {},
     "forward hook 'narrow' at blocks.0.hook_resid_post failed at step 1: it returned shape "
     "(4, 32, 1) torch.float32, but the activation is (4, 32, 32) torch.float32", None),
    ({"forward": [{"name": "boom", "at": "hook_embed", "after": 4}]}, {},
     "forward hook 'boom' at hook_embed failed at step 5: ZeroDivisionError: integer "
     "division or modulo by zero (", 4),
    ({"backward": [{"name": "bad_grad", "at": "hook_embed", "after": 4, "value": "raise"}]}, {},
     "A hook from a plugin failed at step 5: ValueError: my backward broke (", 4),
    ({"backward": [{"name": "bad_grad", "at": "hook_embed", "after": 4, "value": "narrow"}]},
     {}, "The backward pass failed at step 5 with backward hooks in force ('bad_grad' at "
     "hook_embed): RuntimeError: Function _BadBackward returned an invalid gradient at index 0 "
     "- got [4, 32, 1] but expected shape compatible with [4, 32, 32]", 4),
])
def test_nonfinite_and_misbehaving_hooks_stop_cleanly(plugin, data_dir, tmp_path, capsys, hooks,
                                                     train, message, step):
    cfg, out = hooked(plugin, data_dir, tmp_path, hooks, **train)
    rc, _, err = cli(capsys, "train", "--config", str(cfg), "--quiet")
    line = one_error(err)
    assert rc == 2 and message in line, line
    run = only_run(out)
    assert read_manifest(run)["status"] == "failed"
    if step is None:
        assert not list_checkpoints(run / "checkpoints") and "no good checkpoint" in line
        return
    newest = assert_newest_good(run)
    assert load_checkpoint(newest)["step"] == step and f"checkpoint is {newest}" in line
    if "plugin" in message or "hook '" in message:
        assert "plugin.py:" in line  # the plugin's own frame


def test_skip_policy_skips_counts_and_stops_after_n_in_a_row(plugin, data_dir, tmp_path, capsys):
    bad = {"backward": [{"name": "bad_grad", "at": "blocks.0.hook_resid_post", "after": 5}]}
    cfg, out = hooked(plugin, data_dir, tmp_path, bad, on_nonfinite="skip", max_nonfinite_skips=2)
    rc, _, err = cli(capsys, "train", "--config", str(cfg), "--quiet")
    assert rc == 2 and "2 updates in a row were skipped" in one_error(err)
    assert "on_nonfinite=skip" not in err and "enable train.grad_clip" not in err  # both set
    run = only_run(out)
    skipped = [r["step"] for r in read_metrics(run) if r["kind"] == "skipped"]
    assert skipped == [6, 7] and read_manifest(run)["final"]["nonfinite_skips"] == 2
    assert load_checkpoint(assert_newest_good(run))["step"] == 6  # step 6 skipped, weights fine

    nan = {"forward": [{"name": "nan_acts", "at": "hook_embed", "after": 6}]}
    cfg, out = hooked(plugin, data_dir, tmp_path, nan, on_nonfinite="skip", max_nonfinite_skips=5)
    rc, _, err = cli(capsys, "train", "--config", str(cfg), "--quiet")
    assert rc == 0 and "Traceback" not in err
    run = only_run(out)
    assert read_manifest(run)["final"]["nonfinite_skips"] == 2  # steps 7 and 8
    assert load_checkpoint(assert_newest_good(run))["step"] == 8


@pytest.mark.parametrize("at", ["3", "[hook_embed]"])
def test_hook_point_of_the_wrong_type_is_a_config_error(data_dir, tmp_path, capsys, at):
    cfg = write_config(tmp_path / "c.yaml", config(data_dir, tmp_path / "runs"))
    rc, _, err = cli(capsys, "train", "--config", str(cfg), "--quiet", "--set",
                     "hooks.forward=[{name: scale, at: " + at + "}]")
    line = one_error(err)
    assert rc == 2 and "hooks.forward[0] ('scale'): 'at' = " in line and "string" in line
    assert not (tmp_path / "runs").exists()  # refused before anything ran
