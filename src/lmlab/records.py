"""Run folders and manifests: what ran, exactly, so comparisons cannot silently lie.

The manifest records the resolved config and its hash, the base hash (config
without hooks), the data hash, every hook in force with plugin source hashes,
the code version, library versions, seed, device and dtype. Two runs are
comparable when their base and data hashes match.

Both carry their own checksum, as TensorBoard's TFRecord puts a CRC on every
record: each metrics line ends with a `crc32` of the rest of the line, and the
manifest holds `manifest_sha256`, a hash of everything else in it. So one
flipped digit is caught, not silently believed. Files written before these
existed (no field) are read as they are.

Readers take what is there, whatever wrote it: a metrics line of the wrong
shape or with a checksum that does not match, or a manifest that is not JSON,
is skipped with a warning naming the run and line, never a crash of `runs
list` for every other run.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import socket
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import LmlabError
from lmlab.fileio import atomic_write_json, naming, pid_alive

ROOT = Path(__file__).resolve().parents[2]


def new_run_id(name: str, config_hash: str, root: Path) -> str:
    """`<time>-<name>-<hash6>`, with a counter if that folder already exists in `root`."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_id, n = f"{stamp}-{name}-{config_hash[:6]}", 1
    while (root / run_id).exists():
        n += 1
        run_id = f"{stamp}-{name}-{config_hash[:6]}-{n}"
    return run_id


def code_version() -> dict[str, Any]:
    """The git commit of lmlab's own tree and whether it had uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "-q", "HEAD"],
                              capture_output=True, text=True, timeout=5)
        commit = head.stdout.strip() if head.returncode == 0 else ""
        dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                                     "src", "configs"], capture_output=True, text=True,
                                    timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    from lmlab import __version__

    return {"lmlab": __version__, "git_commit": commit or None, "git_dirty": dirty}


def library_versions() -> dict[str, str]:
    import numpy

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "numpy": numpy.__version__}
    for name in ("transformers", "safetensors"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return versions


def warn(message: str) -> None:
    print(f"lmlab: warning: {message}", file=sys.stderr, flush=True)


MANIFEST_HASH = "manifest_sha256"


def manifest_hash(m: dict[str, Any]) -> str:
    """sha256 of the manifest without its own hash field, as it reads back from JSON."""
    body = {k: v for k, v in m.items() if k != MANIFEST_HASH}
    blob = json.dumps(json.loads(json.dumps(body, default=str)), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_manifest(path: Path, m: dict[str, Any]) -> None:
    """Write a manifest atomically, with the hash of its content in it."""
    m[MANIFEST_HASH] = manifest_hash(m)
    atomic_write_json(path, m)


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The run's manifest; LmlabError naming the file when it is not a JSON object or its
    content does not match its recorded hash."""
    path = run_dir / "manifest.json"
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmlabError(f"{path} is not readable JSON ({e}); the run's record is damaged.") \
            from None
    if not isinstance(m, dict):
        raise LmlabError(f"{path} holds {type(m).__name__}, not a manifest (a JSON object).")
    if MANIFEST_HASH in m and m[MANIFEST_HASH] != manifest_hash(m):
        raise LmlabError(f"{path} is damaged: its content no longer matches its recorded "
                         f"{MANIFEST_HASH} (changed after it was written); the run's record "
                         "cannot be trusted.")
    return m


def effective_status(m: dict[str, Any]) -> str | None:
    """The manifest's status, but 'died' for a 'running' run whose process on this host is gone."""
    status, pid = m.get("status"), m.get("pid")
    if (status == "running" and isinstance(pid, int) and m.get("host") == socket.gethostname()
            and not pid_alive(pid)):
        return "died"
    return status


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line, appended and flushed as it happens.

    `mirror`, if given, is called with every record written (TensorBoard's
    writer), so another view of the run can never hold other numbers.
    """

    def __init__(self, path: Path, enabled: bool = True,
                 mirror: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path, self.enabled, self.mirror = path, enabled, mirror

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        with naming(self.path), open(self.path, "a") as f:
            f.write(metrics_line(record))
        if self.mirror is not None:
            self.mirror(record)


NOT_METRICS = ("kind", "step", "time", "name")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The metrics of one record under their names: `train/loss`, `eval/val_bpc`, `aux/z_loss`,
    and telemetry's own names (`grad_norm/blocks.0.mlp.fc.weight`, `logits_max`), as is.

    The one naming of recorded metrics, shared by TensorBoard tags and `runs plot`.
    """
    kind = record.get("kind", "")
    if kind == "aux":
        return {f"aux/{record['name']}": float(record["value"])}
    out = {}
    for key, value in record.items():
        if key in NOT_METRICS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        out[key if kind == "telemetry" else f"{kind}/{key}"] = float(value)
    return out


# the fields a record of each kind must have, and their types; every record has a step
_NUMBER = (int, float)
SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    "train": {"loss": _NUMBER},
    "eval": {"val_loss": _NUMBER},
    "aux": {"name": (str,), "value": _NUMBER},
}
# fields that, wherever they appear, readers do arithmetic with
NUMBERS = {"loss", "lr", "tokens_per_s", "time", "val_loss", "val_ppl", "val_bpc", "value"}


def _problem(r: Any) -> str | None:
    """Why a parsed metrics line is not a usable record, or None when it is."""
    if not isinstance(r, dict):
        return f"a JSON {type(r).__name__}, not an object"
    if not isinstance(r.get("kind"), str):
        return "no 'kind'"
    if not isinstance(r.get("step"), int) or isinstance(r.get("step"), bool):
        return "no integer 'step'"
    for key, types in SCHEMA.get(r["kind"], {}).items():
        if not isinstance(r.get(key), types) or isinstance(r.get(key), bool):
            return f"a {r['kind']} record without a valid '{key}'"
    for key in NUMBERS & r.keys():
        if not isinstance(r[key], _NUMBER) or isinstance(r[key], bool):
            return f"'{key}' is {r[key]!r}, not a number"
    return None


CRC = "crc32"
_CRC_TAIL = f', "{CRC}": "'


def _crc(body: str) -> str:
    return f"{zlib.crc32(body.encode()):08x}"


def metrics_line(record: dict[str, Any]) -> str:
    """One metrics.jsonl line: the record's JSON with a CRC32 of that JSON as its last field.

    `read_metrics` returns records without it (a storage detail), and this line of
    such a record is the very line it was read from (a resume rewrites the log that way).
    """
    body = json.dumps({k: v for k, v in record.items() if k != CRC})
    return f"{body[:-1]}{_CRC_TAIL}{_crc(body)}\"}}\n"


def _crc_problem(line: str, r: dict[str, Any]) -> str | None:
    """Whether a line with a crc32 field still matches it."""
    at = line.rfind(_CRC_TAIL)
    if at < 0 or _crc(line[:at] + "}") != r[CRC]:
        return "its crc32 does not match: the line changed after it was written"
    return None


def metrics_problems(run_dir: Path, quiet: bool = True
                     ) -> tuple[list[dict[str, Any]], list[tuple[int, str, str]]]:
    """The usable records of `metrics.jsonl`, and (line number, why, text) of every other,
    each also a warning unless `quiet`."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return [], []
    out, bad = [], []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            r = json.loads(line)
            problem = _problem(r)
            if problem is None and CRC in r:
                problem = _crc_problem(line, r)
        except json.JSONDecodeError:  # e.g. a line cut short by a crash
            problem = "not JSON"
        if problem is None:
            out.append(r)
        else:
            bad.append((n, problem, line[:80]))
            if not quiet:
                warn(f"skipped line {n} of {path} ({problem}): {line[:80]}")
    return out, bad


def read_metrics(run_dir: Path, quiet: bool = False) -> list[dict[str, Any]]:
    """The usable records of `metrics.jsonl`, checksums checked and dropped; others are
    skipped, each with a warning."""
    return [{k: v for k, v in r.items() if k != CRC} for r in metrics_problems(run_dir, quiet)[0]]
