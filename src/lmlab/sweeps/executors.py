"""Where sweep runs execute: local processes, or tasks on a Ray cluster.

Both start the same worker process (`lmlab.sweeps.worker`) with the same
config and a thread count, so a run gives the same losses on either. The
local executor runs up to `jobs` children at once, each in its own session so
a terminal's Ctrl-C reaches only the driver, which then sends each child one
SIGINT (a second one would abort its checkpoint). A Ray task runs the worker
in a temporary folder on whichever node Ray picks and returns the run folder
as a tar archive, so the run lands in the driver's runs/ whether or not the
cluster shares a filesystem.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError

WORKER = [sys.executable, "-m", "lmlab.sweeps.worker"]


def thread_env(threads: int) -> dict[str, str]:
    """The environment of a run with `threads` intra-op threads (torch reads these at start)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    src = str(Path(__file__).resolve().parents[2])  # lmlab importable in the child as here
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


@dataclass
class Outcome:
    key: str
    rc: int
    run_id: str | None
    run_dir: str | None
    log_tail: str = ""


class LocalExecutor:
    """Child processes on this machine, forked from a forkserver that has imported torch.

    Forking from a warm server instead of starting `python` per run saves the
    torch imports (seconds each on a busy machine) while keeping a process per
    run: a crash stays in its run. If the driver dies, the forkserver exits and
    each child gets SIGINT (see worker.die_with_parent), saves and stops.
    """

    def __init__(self, threads: int, sweep_dir: Path) -> None:
        self.threads, self.sweep_dir = threads, sweep_dir
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["lmlab.sweeps.preload"])
        self.procs: dict[str, Any] = {}

    def start(self, key: str, job: dict[str, Any]) -> None:
        from lmlab.sweeps.worker import forked_main

        claim = self.sweep_dir / "claims" / f"{key}.json"
        claim.unlink(missing_ok=True)
        job_file = self.sweep_dir / "claims" / f"{key}.job.json"
        job_file.write_text(json.dumps({**job, "claim": str(claim), "driver_pid": os.getpid()}))
        (self.sweep_dir / "logs").mkdir(exist_ok=True)
        log = self.sweep_dir / "logs" / f"{key}.log"
        proc = self.ctx.Process(target=forked_main, args=(str(job_file), str(log), self.threads),
                                name=f"lmlab-sweep-{key}")
        proc.start()
        self.procs[key] = proc

    def claimed(self, key: str) -> dict[str, Any] | None:
        """The run id and folder a running child has claimed (None until it has)."""
        from lmlab.sweeps.folder import read_claim

        return read_claim(self.sweep_dir, key)

    def poll(self, timeout: float) -> list[Outcome]:
        deadline = time.monotonic() + timeout
        while True:
            done = [k for k, p in self.procs.items() if p.exitcode is not None]
            if done or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        out = []
        for key in done:
            proc = self.procs.pop(key)
            c = self.claimed(key) or {}
            log = self.sweep_dir / "logs" / f"{key}.log"
            tail = log.read_text()[-2000:] if log.is_file() else ""
            out.append(Outcome(key, proc.exitcode, c.get("run_id"), c.get("run_dir"), tail))
        return out

    def interrupt(self) -> None:
        for proc in self.procs.values():
            if proc.exitcode is None:
                os.kill(proc.pid, signal.SIGINT)

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.exitcode is None:
                proc.kill()

    def close(self) -> None:
        for proc in self.procs.values():
            proc.join(timeout=0)


# --- Ray ---------------------------------------------------------------------------------


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on an address no Ray head answers (ray.init alone may wait for minutes)."""
    host, _, port = address.rpartition(":")
    if address.startswith("ray://") or not host or not port.isdigit():
        raise LmlabError(f"--address {address!r}: give the head node as HOST:PORT "
                         "(e.g. 127.0.0.1:6379, printed by `ray start --head`).")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise LmlabError(f"No Ray cluster answers at {address} ({e.strerror or e}). Start one "
                         "with `ray start --head --port PORT` or check the address.") from None


def pack(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return buf.getvalue()


def unpack(data: bytes, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(into, filter="data")


def run_in_tempdir(job: dict[str, Any], threads: int, driver_cwd: str,
                   resume_tar: bytes | None) -> tuple[int, str | None, bytes | None, str]:
    """The body of a Ray task: run the worker in a fresh folder, return the run folder packed.

    A relative data.path is linked from the driver's folder (it must exist at
    that path on the node); a relative run.out_dir lands in the temp folder and
    comes back as a tar archive.
    """
    with tempfile.TemporaryDirectory(prefix="lmlab-sweep-") as tmp:
        tmp_path = Path(tmp)
        data = Path(job["config"]["data"]["path"])
        if not data.is_absolute():
            (tmp_path / data).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / data).symlink_to(Path(driver_cwd) / data)
        out_dir = Path(job["config"]["run"]["out_dir"])
        runs_root = out_dir if out_dir.is_absolute() else tmp_path / out_dir
        if resume_tar is not None:
            unpack(resume_tar, runs_root)
            job = {**job, "resume": str(runs_root / Path(job["resume"]).name)}
        claim = tmp_path / "claim.json"
        job = {**job, "claim": str(claim), "parent_pid": os.getpid()}
        (tmp_path / "job.json").write_text(json.dumps(job))
        proc = subprocess.run([*WORKER, str(tmp_path / "job.json")], cwd=tmp,
                              env=thread_env(threads), capture_output=True, text=True)
        log = (proc.stdout + proc.stderr)[-2000:]
        if not claim.is_file():
            return proc.returncode, None, None, log
        run_id = json.loads(claim.read_text())["run_id"]
        run_dir = runs_root / run_id
        return proc.returncode, run_id, pack(run_dir) if run_dir.is_dir() else None, log


class RayExecutor:
    """Each run a Ray task with `num_cpus=threads`; finished folders are unpacked locally."""

    def __init__(self, threads: int, address: str | None) -> None:
        try:
            import ray
        except ImportError:
            raise LmlabError("The Ray backend needs Ray: pip install 'lmlab[ray]'.") from None
        self.ray, self.threads = ray, threads
        if address:
            check_reachable(address)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR")
        except (ConnectionError, RuntimeError) as e:
            raise LmlabError(f"Could not join the Ray cluster at {address}: {e}. A cluster with "
                             "token authentication needs RAY_AUTH_MODE=token and its token "
                             "(RAY_AUTH_TOKEN or ~/.ray/auth_token) here too.") from None
        self.task = ray.remote(run_in_tempdir)
        self.refs: dict[Any, tuple[str, str]] = {}

    def start(self, key: str, job: dict[str, Any]) -> None:
        resume = job.get("resume")
        tar = pack(Path(resume)) if resume else None
        ref = self.task.options(num_cpus=self.threads, max_retries=0).remote(
            job, self.threads, os.getcwd(), tar)
        self.refs[ref] = (key, job["config"]["run"]["out_dir"])

    def claimed(self, key: str) -> dict[str, Any] | None:
        return None  # known when the task returns

    def poll(self, timeout: float) -> list[Outcome]:
        if not self.refs:
            return []
        ready, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=timeout,
                                 fetch_local=True)
        out = []
        for ref in ready:
            key, out_dir = self.refs.pop(ref)
            try:
                rc, run_id, tar, log = self.ray.get(ref)
            except Exception as e:  # the task itself died (node lost, cancelled)
                out.append(Outcome(key, 1, None, None, f"Ray task failed: {e}"))
                continue
            run_dir = None
            if tar is not None:
                unpack(tar, Path(out_dir))
                run_dir = str((Path(out_dir) / run_id).resolve())
            out.append(Outcome(key, rc, run_id, run_dir, log))
        return out

    def interrupt(self) -> None:
        for ref in self.refs:
            self.ray.cancel(ref)

    def kill(self) -> None:
        for ref in self.refs:
            self.ray.cancel(ref, force=True)

    def close(self) -> None:
        self.ray.shutdown()
