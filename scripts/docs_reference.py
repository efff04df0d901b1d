"""The generated reference pages of the docs site (an mkdocs hook: `hooks:` in mkdocs.yml).

Each page is built at `mkdocs build` time from the code itself, so it cannot
drift from it: every CLI command from argparse, every config key from the
dataclasses (type, default and the comment beside the field), every hook point
from `lmlab.model.vocabulary`, every built-in hook from the registry.
`python scripts/docs_reference.py OUT_DIR` writes them as files instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import re
import sys
import tokenize
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_page() -> str:
    from lmlab.cli import build_parser

    root = build_parser()
    out = ["# CLI reference", "",
           "Every `lmlab` command with its options, as `--help` prints them (generated from "
           "the argparse parser at build time). `python main.py COMMAND` is the same.", ""]

    def walk(p: argparse.ArgumentParser, name: str, depth: int) -> None:
        subs = _subparsers(p)
        if depth:
            out.extend([f"{'#' * min(depth + 1, 4)} `{name}`", "", "```text",
                        p.format_help().rstrip(), "```", ""])
        for sub_name, sub in subs.items():
            walk(sub, f"{name} {sub_name}", depth + 1)

    walk(root, "lmlab", 0)
    return "\n".join(out)


def _field_comments(path: Path) -> dict[tuple[str, str], str]:
    """(class, field) -> the comment on the field's line, or on the lines just above it."""
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("# ").strip()
    out, cls = {}, None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if m := re.match(r"class (\w+)", line):
            cls = m.group(1)
        elif cls and (m := re.match(r"    (\w+): ", line)):
            above, k = [], n - 1
            while k in comments and path.read_text().splitlines()[k - 1].strip().startswith("#"):
                above.insert(0, comments[k])
                k -= 1
            text = " ".join(above + ([comments[n]] if n in comments else []))
            out[(cls, m.group(1))] = text
    return out


# What a key means where config.py has no comment beside the field (a comment there wins).
MEANINGS = {
    "run.name": "part of the run id (runs/<time>-<name>-<hash>)",
    "run.seed": "seeds weights, batches and every hook's random stream; runs differing only "
                "here are replicates",
    "run.out_dir": "the folder that holds run folders",
    "data.path": "a folder written by `lmlab prepare` (train.bin, val.bin, meta.json)",
    "data.block_size": "context length in tokens of each training window",
    "model.model_name": "null: the from-scratch Transformer; else a registered model's name",
    "model.n_layer": "Transformer blocks", "model.n_head": "attention heads per block",
    "model.d_model": "residual stream width", "model.d_ff": "MLP hidden width",
    "model.dropout": "dropout probability (0: none)", "model.bias": "biases in the linears",
    "model.pos_encoding": "position information: learned table, sinusoidal or rotary",
    "model.dtype": "weights' dtype (imported models may load in bf16 to save memory)",
    "train.finetune.method": "full: train every weight; lora: frozen weights + LoRA adapters",
    "train.finetune.r": "LoRA rank", "train.finetune.alpha": "LoRA scale numerator (alpha / r)",
    "train.finetune.dropout": "dropout on the LoRA input",
    "train.finetune.target_modules": "the linear layers that get adapters",
    "train.batch_size": "windows per micro-batch",
    "train.grad_accum": "micro-batches per update (effective batch = batch_size x grad_accum "
                        "x processes)",
    "train.max_steps": "updates to run (a cap when time_budget_s is set)",
    "train.lr": "peak learning rate (AdamW's under Muon)",
    "train.min_lr": "learning rate at the end of the schedule",
    "train.warmup_steps": "linear warm-up from 0 to lr",
    "train.schedule": "learning-rate schedule after warm-up",
    "train.optimizer": "adamw, sgd (momentum), lion, or muon (Muon for 2-D hidden weights, "
                       "AdamW for the rest)",
    "train.weight_decay": "decoupled weight decay (not on norms, biases or embeddings)",
    "train.beta1": "first-moment decay (AdamW, Lion)", "train.beta2": "second-moment decay",
    "train.momentum": "SGD's and Muon's momentum",
    "train.grad_clip": "global gradient-norm clip (0: off)",
    "train.eval_every": "steps between evaluations (and one at the end)",
    "train.eval_batches": "batches per evaluation (null: the whole val split)",
    "train.checkpoint_every": "steps between checkpoints (and one at the end)",
    "train.keep_checkpoints": "newest checkpoints kept per run",
    "train.log_every": "steps between train records (and progress lines when not on a terminal)",
    "train.sample_every": "steps between samples written to samples.txt (0: none)",
    "train.device": "where to train", "train.dtype": "autocast dtype (auto: bf16 where fast)",
    "train.compile": "torch.compile the model", "train.threads": "torch threads (null: torch's)",
    "train.max_nonfinite_skips": "skipped updates in a row before stopping",
    "hooks.forward": "hooks that change activations at points",
    "hooks.backward": "hooks that change the gradient through points",
    "hooks.update": "gradient transforms before optimizer.step()",
    "hooks.aux_losses": "weighted losses added to the training loss",
    "hooks.plugins": "Python files that register more hooks",
    "telemetry.every": "steps between measurements of the learning dynamics (0: never)",
}


def config_page() -> str:
    from lmlab import config as c

    notes = _field_comments(Path(c.__file__))
    out = ["# Config reference", "",
           "Every key of the one config schema (`src/lmlab/config.py`), generated from its "
           "dataclasses: the type, the default and the comment beside the field. A YAML file "
           "sets them by section (`train: {lr: 3e-4}`), `--set train.lr=3e-4` and "
           "`lmlab.train(overrides={\"train.lr\": 3e-4})` by dotted key. *added*: a key added "
           "after runs were made; at its default it is left out of the config hash, so "
           "earlier runs keep theirs. *book-keeping*: left out of the base hash, so runs that "
           "differ only there (names, folders, intervals, seeds) compare as one set-up.", ""]
    book = {f"{s}.{k}" for s, k in c.BOOKKEEPING}

    def section(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                section(tp, f"{prefix}.{f.name}")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            flags = [w for w, on in (("added", f.metadata.get("added")),
                                     ("book-keeping", f"{prefix}.{f.name}" in book)) if on]
            note = notes.get((cls.__name__, f.name)) or MEANINGS.get(f"{prefix}.{f.name}", "")
            note += f" *({', '.join(flags)})*" if flags else ""
            rows.append(f"| `{prefix}.{f.name}` | {c._type_name(tp).replace('|', '&#124;')} | "
                        f"`{default!r}` | {note.strip()} |")
        if rows:
            doc = (cls.__doc__ or "").strip()
            doc = "" if doc.startswith(cls.__name__ + "(") else doc
            out.extend([f"## `{prefix}`", "", *([doc, ""] if doc else []),
                        "| key | type | default | meaning |", "|---|---|---|---|", *rows, ""])

    for f in dataclasses.fields(c.Config):
        section(typing.get_type_hints(c.Config)[f.name], f.name)
    return "\n".join(out)


def points_page() -> str:
    from lmlab.model.vocabulary import VOCABULARY

    out = ["# Hook points", "",
           "Every point name (generated from `lmlab.model.vocabulary`): its shape, what it "
           "is, and the name TransformerLens caches the same activation under (checked "
           "against TransformerLens by `tests/model/test_transformerlens_oracle.py`). A model "
           "has the points its architecture has: `lmlab hooks list --config NAME` prints a "
           "config's.", "", "| point | shape | meaning | TransformerLens |", "|---|---|---|---|"]
    for name, p in VOCABULARY.items():
        twin = "none" if p.tl is None else "same name" if p.tl == name else f"`{p.tl}`"
        twin += f" ({p.tl_note})" if p.tl_note else ""
        out.append(f"| `{name}` | {p.shape} | {p.meaning} | {twin} |")
    return "\n".join(out) + "\n"


def hooks_page() -> str:
    from lmlab.hooks import registry
    from lmlab.hooks.inventory import KIND_HELP  # importing it registers the built-ins

    out = ["# Built-in hooks", "",
           "Every built-in hook and learning rule by kind, with its parameters and defaults "
           "(generated from the hook registry; `lmlab hooks list` prints the same, with a "
           "config's plugins). A config names them as `{name: NAME, at: POINT-GLOB, "
           "PARAM: VALUE}`.", ""]
    for kind in registry.KINDS:
        out.extend([f"## {kind}", "", KIND_HELP[kind] + ".", "",
                    "| hook | acts on | what it does |", "|---|---|---|"])
        for name in sorted(registry.REGISTRY[kind]):
            spec = registry.REGISTRY[kind][name]
            doc = spec.doc.replace("|", "&#124;")
            out.append(f"| `{spec.signature_text()}` | {spec.points or ''} | {doc} |")
        out.append("")
    return "\n".join(out)


PAGES = {"reference/cli.md": cli_page, "reference/config.md": config_page,
         "reference/hook-points.md": points_page, "reference/hooks.md": hooks_page}


def on_files(files, config):  # noqa: ANN001, ANN201 - mkdocs' hook signature
    from mkdocs.structure.files import File

    for path, make in PAGES.items():
        files.append(File.generated(config, path, content=make()))
    return files


if __name__ == "__main__":
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "site-reference")
    for path, make in PAGES.items():
        (out_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / path).write_text(make())
        print(out_dir / path)
