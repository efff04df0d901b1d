"""One sweep run in its own process: forked from a forkserver that has imported torch (local
backend), or started as `python -m lmlab.sweeps.worker JOB.json` (Ray backend).

A process per run isolates a crash, and lets the driver stop a run the way a
user would (SIGINT: finish the step, save a checkpoint). The worker asks the
kernel for SIGINT when its parent dies, and a forked one also watches the driver,
so a killed driver does not leave orphans training on: they save and stop, and
`sweep resume` continues them.
It holds a lock on its claim file while it lives, so a resume waits for it, and a
second worker for the same key exits at once (no key is ever trained twice).

Exit status: 0 finished, 3 interrupted (checkpoint saved), 2 bad input or key
already being trained, 1 crash.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import select
import signal
import sys
import threading
from pathlib import Path

EXIT_INTERRUPTED = 3
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: SIGINT this process when its parent dies (elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGINT)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGINT)


def watch_driver(pid: int) -> None:
    """SIGINT this process when the driver `pid` exits (Linux pidfd; elsewhere a no-op).

    A forked worker's parent is the forkserver, which may outlive a killed driver.
    """
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return

    def wait() -> None:
        select.select([fd], [], [])
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=wait, name="lmlab-watch-driver", daemon=True).start()


def main(argv: list[str]) -> int:
    """A worker started as its own program (the Ray backend)."""
    job = json.loads(Path(argv[0]).read_text())
    die_with_parent()
    if job.get("parent_pid") and os.getppid() != job["parent_pid"]:
        return EXIT_INTERRUPTED  # the parent died before prctl took effect
    return run_job(job)


def forked_main(job_file: str, log_file: str, threads: int) -> None:
    """A worker forked from the local executor's forkserver (torch already imported).

    It leaves the driver's session (a terminal's Ctrl-C goes to the driver, which
    forwards one SIGINT), restores the default SIGINT behaviour the forkserver
    had turned off, and writes its output to its log.
    """
    os.setsid()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    die_with_parent()
    job = json.loads(Path(job_file).read_text())
    watch_driver(job["driver_pid"])
    import torch

    torch.set_num_threads(threads)
    sys.exit(run_job(job))


def run_job(job: dict) -> int:
    claim = Path(job["claim"])
    lock = open(claim.with_suffix(".lock"), "w")  # noqa: SIM115 - held for the process's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"lmlab: error: {claim.stem} is being trained by another process (it holds "
              f"{lock.name}); not training it twice.", file=sys.stderr, flush=True)
        return 2

    import tqdm

    # one process needs no multiprocessing lock for its progress bars; tqdm's default is a
    # semaphore that a killed worker would leak, and the driver's resource tracker would
    # report that after the driver's last line
    tqdm.tqdm.set_lock(threading.RLock())

    from lmlab.config import from_dict
    from lmlab.errors import LmlabError
    from lmlab.fileio import atomic_write_json
    from lmlab.records import read_manifest
    from lmlab.runs.hparams import write_hparams
    from lmlab.train.loop import Trainer

    try:
        trainer = Trainer(from_dict(job["config"]), resume=job.get("resume"), progress=False,
                          manifest={"sweep": job["sweep"]})
        s = trainer.state
        atomic_write_json(claim, {"run_id": s.run_id, "pid": os.getpid(),
                                  "run_dir": str(Path(s.run_dir).resolve())})
        print(f"Run {s.run_id}" + (f" resumed at step {s.step}" if s.step else "")
              + f": {s.run_dir}", flush=True)
        run_dir = trainer.run()
    except LmlabError as e:
        print(f"lmlab: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # a second SIGINT, or one before the loop had its handler
        print("lmlab: interrupted before a checkpoint could be saved.", file=sys.stderr,
              flush=True)
        return EXIT_INTERRUPTED
    status = read_manifest(run_dir)["status"]
    write_hparams(run_dir, claim.parents[1])  # TensorBoard's HParams tab: one table a sweep
    print(f"Run {run_dir.name} {status}", flush=True)
    return 0 if status == "finished" else EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
