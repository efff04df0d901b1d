"""The Python API: what the CLI does, for a notebook or a script.

    import lmlab

    run = lmlab.train("char-speedrun", {"train.time_budget_s": 60})
    run.metrics.query("kind == 'eval'")[["step", "val_loss"]]
    model = lmlab.load_model(run)          # or a checkpoint file, or a registry name
    print(model.generate("ROMEO:", max_new_tokens=100, seed=1))
    with lmlab.hooks.api.hooked(model, forward=[...]): ...

    sweep = lmlab.sweep("my-sweep.yaml", jobs=2)
    sweep.report()                          # one row per variant: mean, interval, p, verdict

Every function goes through the same code as its command (`lmlab train`,
`lmlab sweep run`, `lmlab sweep report`), so a result from here and one from
the shell are the same kind of run folder. A user's mistake raises
`lmlab.errors.LmlabError` with one line that names it and the fix.
"""

from __future__ import annotations

import json
import types
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmlab.config import Config, apply_overrides, deep_merge, from_dict, load_raw
from lmlab.errors import LmlabError

if TYPE_CHECKING:
    import pandas as pd

    from lmlab.model.adapters.base import BaseAdapter

__all__ = ["Run", "Sweep", "load_model", "sweep", "train"]

ConfigLike = str | Path | Config | Mapping[str, Any] | None
Overrides = Mapping[str, Any] | list[str] | None


def resolve_config(config: ConfigLike = None, overrides: Overrides = None) -> Config:
    """A validated Config from a ready config's name, a YAML path, a mapping or a Config.

    `overrides` is a mapping of dotted keys (`{"train.lr": 3e-4}`) or nested
    sections (`{"train": {"lr": 3e-4}}`), or `--set`-style strings; an unknown key
    raises LmlabError naming the valid ones.
    """
    if isinstance(config, Config):
        raw = config.to_dict()
    elif isinstance(config, Mapping):
        raw = dict(config)
    else:
        raw = load_raw(None if config is None else str(config))
    if isinstance(overrides, list):
        return from_dict(apply_overrides(raw, overrides))
    for key, value in (overrides or {}).items():
        nested: Any = value
        for part in reversed(str(key).split(".")):
            nested = {part: nested}
        raw = deep_merge(raw, nested)
    return from_dict(raw)


def train(config: ConfigLike = None, overrides: Overrides = None, *,
          resume: str | Path | None = None, allow_config_change: bool = False,
          progress: bool = True) -> Run:
    """Train a model, as `lmlab train` does (progress included); returns the finished Run.

    `config`: a ready config's name (`"char-speedrun"`), a YAML path, a mapping
    or a Config; None is the default recipe. `resume`: a run folder or checkpoint
    to continue exactly (its own config unless `config` is given).
    """
    from lmlab.records import read_manifest
    from lmlab.train.loop import Trainer
    from lmlab.train.state import Checkpoint, config_for_resume

    checkpoint = Checkpoint.load(str(resume)) if resume is not None else None  # loaded once
    if checkpoint is not None:
        base = None if config is None else resolve_config(config).to_dict()
        strings = overrides if isinstance(overrides, list) else [
            f"{k}={json.dumps(v)}" for k, v in (overrides or {}).items()]
        cfg = config_for_resume(checkpoint, base, strings)
    else:
        cfg = resolve_config(config, overrides)
    trainer = Trainer(cfg, resume=checkpoint, allow_config_change=allow_config_change,
                      progress=progress)
    s = trainer.state
    if s.dist.is_main:
        verb = f"Resuming run {s.run_id} at step {s.step}" if resume else f"Run {s.run_id}"
        print(f"{verb}: {s.run_dir} ({s.adapter.num_params():,} parameters, "
              f"{s.device}, {s.dtype})", flush=True)
    run_dir = trainer.run()
    if s.dist.is_main:
        print(f"Run {run_dir.name} {read_manifest(run_dir)['status']}: {run_dir}", flush=True)
    return Run(run_dir)


class Run:
    """One run folder (`runs/<run_id>/`): its config, manifest, metrics and checkpoints.

    Reads the files each time, so a run still training shows its latest records.
    """

    def __init__(self, path: str | Path, root: str | Path = "runs") -> None:
        """`path`: a run folder, or a run id (or a unique part of one) under `root`."""
        from lmlab.runs.listing import resolve_run

        p = Path(path)
        if p.is_dir() and not (p / "manifest.json").is_file():
            raise LmlabError(f"'{p}' is not a run folder (it has no manifest.json); give a "
                             f"folder made by `lmlab train`, e.g. one that `lmlab runs list` "
                             "shows.")
        self.path: Path = resolve_run(p, root)

    def __repr__(self) -> str:
        return f"Run('{self.path}')"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def manifest(self) -> dict[str, Any]:
        """manifest.json: status, hashes, data, hooks, code version, final figures."""
        from lmlab.records import read_manifest

        return read_manifest(self.path)

    @property
    def config(self) -> Config:
        """The resolved config the run trained with (keys added since at their defaults)."""
        return from_dict(self.manifest["config"])

    @property
    def status(self) -> str | None:
        from lmlab.records import effective_status

        return effective_status(self.manifest)

    @property
    def metrics(self) -> pd.DataFrame:
        """metrics.jsonl as a DataFrame: one row per record; `kind` says which (train, eval...)."""
        import pandas as pd

        from lmlab.records import read_metrics

        return pd.DataFrame.from_records(read_metrics(self.path))

    @property
    def checkpoints(self) -> list[Path]:
        """Checkpoint files, oldest step first."""
        from lmlab.model.checkpoint import list_checkpoints

        return list_checkpoints(self.path / "checkpoints")

    def load_model(self, checkpoint: str | Path | None = None, device: str = "cpu"
                   ) -> BaseAdapter:
        """The model of the newest checkpoint (or `checkpoint`); see `lmlab.load_model`."""
        return load_model(checkpoint or self.path, device)


def _generate(self: BaseAdapter, prompt: str = "\n", max_new_tokens: int = 200,
              temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
              greedy: bool = False, seed: int | None = None) -> str:
    """The text that follows `prompt` (KV cache; `seed` makes it repeatable)."""
    from lmlab.eval.sampling import generate

    tok = self.tokenizer
    return tok.decode(generate(self, tok.encode(prompt), max_new_tokens, temperature, top_k,
                               top_p, greedy, seed))


def load_model(source: str | Path | Run, device: str = "cpu",
               models_root: str | Path | None = None) -> BaseAdapter:
    """A model from a run folder, a checkpoint file or a registered (imported) model's name.

    The result is the model's adapter (a torch Module: `model(idx)` gives
    logits), ready for `lmlab.hooks.api.hooked` and `run_with_cache`, with a
    `generate(prompt, max_new_tokens=200, temperature=0.8, top_k=None,
    top_p=None, greedy=False, seed=None) -> str` method added (sampling lives
    above the model layer, so the adapter class cannot carry it). In eval mode.
    """
    from lmlab.device import resolve_device

    target = Path(source.path if isinstance(source, Run) else source)
    if target.exists():
        from lmlab.model.adapters import load_adapter

        adapter, ckpt = load_adapter(target, resolve_device(device), models_root)
        adapter.block_size = ckpt["config"]["data"]["block_size"]
    else:
        from lmlab.model import catalog
        from lmlab.model.adapters import adapter_class

        name = str(source)
        known = sorted(catalog.load_registry(models_root))
        if name not in known:
            raise LmlabError(
                f"'{name}' is neither a run folder, a checkpoint file nor a registered model. "
                f"Registered models in {catalog.models_root(models_root)}: "
                f"{', '.join(known) or 'none yet'}; import one with `lmlab import-model`.")
        entry = catalog.resolve(name, models_root)
        adapter = adapter_class(entry["architecture_type"]).from_registry(entry)
        adapter = adapter.to(resolve_device(device))
    adapter.generate = types.MethodType(_generate, adapter)
    return adapter.eval()


class Sweep:
    """One sweep folder (`sweeps/<sweep_id>/`): its index, its runs and its report."""

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        if not (p / "index.json").is_file():
            raise LmlabError(f"'{p}' is not a sweep folder (it has no index.json); give a "
                             "folder made by `lmlab sweep run` or `lmlab.sweep`.")
        self.path: Path = p

    def __repr__(self) -> str:
        return f"Sweep('{self.path}')"

    @property
    def index(self) -> dict[str, Any]:
        """index.json: the sweep's runs with their variant, point, seed and status."""
        from lmlab.sweeps import folder

        return folder.load(self.path)

    @property
    def runs(self) -> list[Run]:
        """The runs that have a folder, in the index's order."""
        return [Run(r["run_dir"]) for r in self.index["runs"]
                if r.get("run_dir") and (Path(r["run_dir"]) / "manifest.json").is_file()]

    def report(self, metric: str = "final_val") -> pd.DataFrame:
        """The statistics of `lmlab sweep report`: one row per grid point and variant.

        Columns: point, variant, n, mean, sd, ci_low, ci_high (95% t interval over
        seeds), and against the baseline: diff, p (Welch), diff_ci_low/high, verdict.
        """
        import pandas as pd

        from lmlab.sweeps.report import report

        result = json.loads(report(self.path, metric, as_json=True))
        rows = []
        for point, variants in result["blocks"].items():
            for name, r in variants.items():
                d = r.get("vs_baseline") or {}
                ci, dci = r.get("ci") or [None, None], d.get("ci") or [None, None]
                rows.append({"point": point, "variant": name, "n": r["n"], "mean": r["mean"],
                             "sd": r["sd"], "ci_low": ci[0], "ci_high": ci[1],
                             "diff": d.get("diff"), "p": d.get("p"), "diff_ci_low": dci[0],
                             "diff_ci_high": dci[1], "verdict": d.get("verdict")})
        return pd.DataFrame(rows)


def sweep(path: str | Path, jobs: int | None = None, *, out: str | Path = "sweeps",
          threads_per_job: int | None = None, backend: str = "local",
          address: str | None = None, retries: int = 1, yes: bool = False,
          quiet: bool = False) -> Sweep:
    """Run a sweep file (as `lmlab sweep run`), or finish a sweep folder (as `sweep resume`)."""
    from lmlab.sweeps import run as sweep_run

    def say(line: str) -> None:
        if not quiet:
            print(line, flush=True)

    p = Path(path)
    if p.is_dir():
        return Sweep(sweep_run.resume(p, jobs, threads_per_job, backend, address, retries, say))
    d = sweep_run.start(p, out, jobs or sweep_run.DEFAULT_JOBS,
                        threads_per_job or sweep_run.DEFAULT_THREADS, backend, address,
                        retries, yes, say)
    return Sweep(d)
