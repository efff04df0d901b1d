"""Run folders and manifests: what ran, exactly, so comparisons cannot silently lie.

The manifest records the resolved config and its hash, the base hash (config
without hooks), the data hash, every hook in force with plugin source hashes,
the code version, library versions, seed, device and dtype. Two runs are
comparable when their base and data hashes match.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmlab.fileio import atomic_write_json

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


write_json = atomic_write_json


def read_manifest(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "manifest.json").read_text())


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
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
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


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash
            pass
    return out
