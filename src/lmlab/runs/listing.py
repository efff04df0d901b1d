"""Finding runs and summarising them for `lmlab runs list` and `lmlab runs show`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.records import effective_status, read_manifest, read_metrics, warn


def find_runs(root: str | Path = "runs") -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "manifest.json").is_file())


def resolve_run(run: str | Path, root: str | Path = "runs") -> Path:
    """A run folder path, or a run id (or unique prefix/suffix of one) under `root`."""
    p = Path(run)
    if (p / "manifest.json").is_file():
        return p
    matches = [r for r in find_runs(root) if r.name == str(run)] or [
        r for r in find_runs(root) if str(run) in r.name]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(r.name for r in find_runs(root)[-10:]) or "none yet"
    what = "matches several runs" if matches else "is not a run folder or run id"
    raise LmlabError(f"'{run}' {what}. Recent runs in {root}/: {known}.")


def summaries(root: str | Path = "runs") -> list[dict[str, Any]]:
    """`summary` of every run under `root`; a run whose manifest is damaged is skipped, said."""
    rows = []
    for run_dir in find_runs(root):
        try:
            rows.append(summary(run_dir))
        except LmlabError as e:
            warn(f"skipped run {run_dir.name}: {e}")
        except (TypeError, KeyError, AttributeError, ValueError) as e:  # a field of a wrong type
            warn(f"skipped run {run_dir.name}: its manifest.json has an unexpected shape "
                 f"({type(e).__name__}: {e})")
    return rows


def summary(run_dir: Path) -> dict[str, Any]:
    m = read_manifest(run_dir)
    evals = [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]
    final = m.get("final") if isinstance(m.get("final"), dict) else {}
    model = m.get("model") if isinstance(m.get("model"), dict) else {}
    return {
        "run_id": m.get("run_id", run_dir.name), "status": effective_status(m),
        "step": final.get("step"),
        "val_loss": evals[-1]["val_loss"] if evals else None,
        "best_val_loss": min((r["val_loss"] for r in evals), default=None),
        "val_bpc": evals[-1].get("val_bpc") if evals else None,
        "tokens_per_s": final.get("tokens_per_s"), "wall_s": final.get("wall_s"),
        "config_hash": m.get("config_hash"), "base_hash": m.get("base_hash"),
        "data_hash": m.get("data_hash"), "hooks": len(m.get("hooks") or []),
        "model": model.get("model_name") or "scratch",
        "params": model.get("params"), "path": str(run_dir),
    }


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        return "-" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
