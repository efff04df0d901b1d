"""The Ray backend on a real Ray cluster started on 127.0.0.1: same losses as local runs.

The cluster is started by a helper process of the test (`ray.init(address='local')`),
so its workers run in other processes with other working folders; the run folders
come back to the driver's runs/ as archives.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlab.errors import LmlabError
from lmlab.records import read_manifest, read_metrics
from lmlab.sweeps import folder
from lmlab.sweeps import run as sweep_run

CLUSTER = """
import sys, ray
ray.init(address="local", include_dashboard=False, num_cpus=2, _node_ip_address="127.0.0.1")
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
ray.shutdown()
"""
SRC = str(Path(sweep_run.__file__).resolve().parents[2])


@pytest.fixture
def ray_cluster(tmp_path):
    """(address, environment to join it): token authentication, as Ray clusters default to."""
    assert importlib.util.find_spec("ray") is not None, (
        "Ray is not installed: `make setup` installs it (the dev extra), or "
        "pip install 'lmlab[ray]'")
    work = tmp_path / "ray-cwd"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": SRC, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=work, env=env)
    address = proc.stdout.readline().strip()
    assert ":" in address, "the Ray cluster did not start"
    yield address, env
    proc.stdin.close()  # the helper shuts its cluster down
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _losses(d: Path) -> dict[str, list[float]]:
    return {r["key"]: [m["val_loss"] for m in read_metrics(Path(r["run_dir"]))
                       if m["kind"] == "eval"] for r in folder.load(d)["runs"]}


@pytest.mark.slow
def test_ray_backend_gives_the_local_losses(sweep_file, ray_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = sweep_file(variants={"backprop": {}, "fa": {"hooks": {"backward": [
        {"name": "feedback_alignment", "at": "blocks.*.mlp.*"}]}}})
    local = sweep_run.start(path, tmp_path / "sweeps", jobs=2, threads=1, out=lambda _: None)
    address, env = ray_cluster
    proc = subprocess.run([sys.executable, "-m", "lmlab.cli", "sweep", "run", str(path),
                           "--out", "ray-sweeps", "--backend", "ray", "--address", address,
                           "--jobs", "2", "--threads-per-job", "1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (remote,) = (tmp_path / "ray-sweeps").iterdir()
    index = folder.load(remote)
    assert [r["status"] for r in index["runs"]] == ["finished"] * 4
    for r in index["runs"]:  # shipped back into this folder's runs/, labelled by the sweep
        assert Path(r["run_dir"]).parent == tmp_path / "runs"
        assert list((Path(r["run_dir"]) / "checkpoints").glob("ckpt_*.pt"))
        assert read_manifest(Path(r["run_dir"]))["sweep"]["id"] == remote.name
    a, b = _losses(local), _losses(remote)
    assert a.keys() == b.keys() and all(len(v) == 3 for v in a.values())
    assert a == b
    assert a["backprop-s1"] != a["backprop-s2"]


def test_unreachable_ray_address_is_a_clear_error_within_seconds(sweep_file, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(LmlabError, match="No Ray cluster answers at 127.0.0.1:1"):
        sweep_run.start(sweep_file(), tmp_path / "sweeps", backend="ray",
                        address="127.0.0.1:1")
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "sweeps").exists()
    with pytest.raises(LmlabError, match="HOST:PORT"):
        sweep_run.start(sweep_file(), tmp_path / "sweeps", backend="ray", address="nowhere")
