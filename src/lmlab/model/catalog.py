"""The model registry: `models/registry.json` plus one folder per model, `models/<model_name>/`.

Configs name a model by its `model_name` (a safe file name chosen by the user);
the entry keeps the source's own identifier (`model_id`, e.g. a hub id), the
architecture that picks the adapter, where it came from, its licence, the
immediate parent it was fine-tuned from, timestamps, parameter count, dtype and
a hash of its weights, so which model came from which is always answerable.

Two processes may import or register at the same time, so every
read-modify-write holds an exclusive `fcntl` lock on `models/.registry.lock` and
the new file is written to a temporary file, fsynced and `os.replace`d into
place: a reader sees the old registry or the new one, never half of one. A
registry that cannot be parsed is refused and never overwritten, since it may
be the only record of a user's lineage.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError, did_you_mean
from lmlab.fileio import atomic_write_text, clean_stale_temps
from lmlab.model.hf_tokenizer import load_hf_tokenizer

REGISTRY_FILE = "registry.json"
LOCK_FILE = ".registry.lock"
FORMAT = "lmlab-model-registry"
VERSION = 1
ENV_ROOT = "LMLAB_MODELS_DIR"

# Fields every entry carries (the seed's list plus the pretrained-models issue's).
ENTRY_FIELDS = (
    "model_name", "model_id", "architecture_type", "architecture", "source", "license",
    "fine_tuned_from", "created_at", "updated_at", "num_params", "dtype", "weights_sha256",
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def models_root(root: str | Path | None = None) -> Path:
    """The registry folder: `root`, else $LMLAB_MODELS_DIR, else `models/` under the cwd."""
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV_ROOT)
    return Path(env) if env else Path.cwd() / "models"


def validate_name(name: str) -> str:
    """Return `name` if it is a safe file name; refuse anything that could leave `models/`."""
    if (
        not isinstance(name, str)
        or not _NAME_RE.match(name)
        or name in {".", ".."}
        or ".." in name
        or name.startswith(".")
    ):
        raise LmlabError(
            f"Model name {name!r} is not allowed: a model name becomes the folder "
            "models/<name>/, so it must be 1-128 characters of letters, digits, '.', '_' "
            "or '-', start with a letter or digit, and contain no '..' or '/'. "
            "Choose another with --name (for example qwen2.5-0.5b)."
        )
    return name


def model_dir(name: str, root: str | Path | None = None) -> Path:
    """The folder holding a model's weights, config and tokenizer."""
    return models_root(root) / validate_name(name)


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# --- reading --------------------------------------------------------------------------


def _read(root: Path) -> dict[str, dict[str, Any]]:
    """The `models` mapping; {} when there is no registry; LmlabError when it is corrupt."""
    path = root / REGISTRY_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmlabError(
            f"The model registry {path} is corrupt ({e}). lmlab will not read or overwrite "
            "it, since it records every model's lineage. Repair the JSON by hand, or move it "
            f"aside (mv {path} {path}.bad) and import the models again."
        ) from None
    models = data.get("models") if isinstance(data, dict) else None
    if (
        not isinstance(data, dict)
        or data.get("format") != FORMAT
        or not isinstance(models, dict)
        or not all(isinstance(v, dict) for v in models.values())
    ):
        raise LmlabError(
            f"The model registry {path} is not an lmlab registry (it needs "
            f'{{"format": "{FORMAT}", "models": {{...}}}}). lmlab will not overwrite it. '
            f"Repair it by hand, or move it aside (mv {path} {path}.bad) and import the "
            "models again."
        )
    return models


def load_registry(root: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """All entries by model_name (a snapshot; writes go through `add_entry`/`update_entry`)."""
    return _read(models_root(root))


def list_entries(root: str | Path | None = None) -> list[dict[str, Any]]:
    """Entries sorted by name, for `models list`."""
    return [v for _, v in sorted(load_registry(root).items())]


def resolve(name: str, root: str | Path | None = None) -> dict[str, Any]:
    """The entry for `name`, with `path` set to its folder; an unknown name lists the known."""
    models = load_registry(root)
    if name not in models:
        known = sorted(models)
        listing = ", ".join(known) if known else "none yet"
        raise LmlabError(
            f"Model '{name}' is not in the registry {models_root(root) / REGISTRY_FILE}. "
            f"Registered models: {listing}.{did_you_mean(name, known)} Import one with "
            "`python main.py import-model HUB_ID_OR_FOLDER --name NAME`."
        )
    entry = dict(models[name])
    entry["path"] = str(model_dir(name, root))
    return entry


def lineage(name: str, root: str | Path | None = None) -> list[dict[str, Any]]:
    """The chain `name`, its parent, ... back to the imported base (first element is `name`)."""
    models = load_registry(root)
    chain = [resolve(name, root)]
    seen = {name}
    while (parent := chain[-1].get("fine_tuned_from")) is not None:
        if parent in seen:
            raise LmlabError(f"The registry's lineage of '{name}' loops at '{parent}'.")
        seen.add(parent)
        if parent not in models:  # the parent was removed: show what is known
            chain.append({"model_name": parent, "missing": True, "fine_tuned_from": None})
            break
        chain.append(resolve(parent, root))
    return chain


# --- writing --------------------------------------------------------------------------


@contextlib.contextmanager
def locked(root: str | Path | None = None) -> Iterator[Path]:
    """Hold the registry's exclusive lock (blocking) for a read-modify-write."""
    r = models_root(root)
    r.mkdir(parents=True, exist_ok=True)
    with open(r / LOCK_FILE, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        clean_stale_temps(r)
        try:
            yield r
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _write(root: Path, models: dict[str, dict[str, Any]]) -> None:
    """Atomic replace of the registry file; the caller holds the lock."""
    data = {"format": FORMAT, "version": VERSION, "models": models}
    atomic_write_text(root / REGISTRY_FILE, json.dumps(data, indent=2, sort_keys=True) + "\n")


def check_name_free(name: str, root: str | Path | None = None) -> None:
    """Refuse a name that is taken (in the registry or as a folder) before any heavy work."""
    validate_name(name)
    r = models_root(root)
    if name in _read(r):
        raise LmlabError(
            f"Model name '{name}' is already registered. Pick another with --name, or see it "
            f"with `python main.py models show {name}`."
        )
    if (r / name).exists():
        raise LmlabError(
            f"Folder {r / name} exists but is not in the registry (left from an earlier "
            "attempt?). Remove it or pick another --name."
        )


def add_entry(entry: dict[str, Any], root: str | Path | None = None,
              staged_dir: str | Path | None = None) -> dict[str, Any]:
    """Register a new model; with `staged_dir`, move that folder to models/<name>/ atomically.

    The name check, the folder move and the registry write happen under one lock,
    so two processes importing the same name cannot both succeed.
    """
    name = validate_name(entry["model_name"])
    with locked(root) as r:
        check_name_free(name, r)
        stamp = now()
        full = {k: None for k in ENTRY_FIELDS} | dict(entry)
        full.pop("path", None)
        full["created_at"] = full.get("created_at") or stamp
        full["updated_at"] = stamp
        models = _read(r)
        models[name] = full
        if staged_dir is not None:
            os.replace(staged_dir, r / name)
        try:
            _write(r, models)
        except BaseException:
            if staged_dir is not None:
                os.replace(r / name, staged_dir)
            raise
    return full


def update_entry(name: str, root: str | Path | None = None, **fields: Any) -> dict[str, Any]:
    """Change fields of an existing entry (never its name) and bump `updated_at`."""
    with locked(root) as r:
        models = _read(r)
        if name not in models:
            resolve(name, r)  # raises with the list of names
        fields.pop("model_name", None)
        models[name].update(fields, updated_at=now())
        _write(r, models)
        return dict(models[name])


# --- helpers used by import, register and the adapters --------------------------------


WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".gguf"}
SUMS_FILE = "SHA256SUMS"  # `sha256sum -c` format, beside exported weights


def weight_files(folder: str | Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix in WEIGHT_SUFFIXES
                  and p.is_file())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def verify_weights(entry: dict[str, Any]) -> str:
    """Check a registered model's weight files against the registry's hash; returns the hash.

    Called before every load, so a weight file changed on disk since import
    (a flipped byte, a half-finished copy) is refused, not fine-tuned.
    """
    folder = Path(entry["path"]) if entry.get("path") else model_dir(entry["model_name"])
    expected = entry.get("weights_sha256")
    actual = weights_hash(folder)
    if expected and actual != expected:
        names = ", ".join(p.name for p in weight_files(folder)) or "no weight files"
        raise LmlabError(
            f"The weights of model '{entry['model_name']}' in {folder} ({names}) are damaged: "
            f"they hash to sha256 {actual}, but the registry recorded {expected} at import. "
            "Import the model again (after `rm -r` of its folder and entry) or restore the files."
        )
    return actual


def write_sums(folder: str | Path) -> Path:
    """Write SHA256SUMS for the weight files of `folder` (checked by `check_sums`)."""
    folder = Path(folder)
    lines = [f"{file_sha256(p)}  {p.name}\n" for p in weight_files(folder)]
    atomic_write_text(folder / SUMS_FILE, "".join(lines))
    return folder / SUMS_FILE


def check_sums(folder: str | Path) -> int:
    """Check the files a folder's SHA256SUMS lists (an lmlab export); the number checked."""
    folder = Path(folder)
    sums = folder / SUMS_FILE
    if not sums.is_file():
        return 0
    n = 0
    for line in sums.read_text().splitlines():
        expected, _, name = line.strip().partition("  ")
        if not name:
            continue
        path = folder / name.lstrip("*")
        actual = file_sha256(path) if path.is_file() else "<missing>"
        if actual != expected:
            raise LmlabError(f"{path} does not match {sums}: it hashes to sha256 {actual}, "
                             f"but {expected} was recorded when it was written. The copy is "
                             "damaged or incomplete; copy or export it again.")
        n += 1
    return n


def weights_hash(folder: str | Path) -> str:
    """sha256 over the weight files (name and bytes), so two copies of a model compare equal."""
    h = hashlib.sha256()
    for p in weight_files(folder):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def load_tokenizer(model_name: str, root: str | Path | None = None) -> Any:
    """The adapter-ready native tokenizer of a registered model (used by `prepare --tokenizer`).

    Returns an `lmlab.model.hf_tokenizer.HFTokenizer`, which satisfies the Tokenizer protocol
    and whose `spec()` names `model_name`, so prepared data remembers its tokenizer.
    """
    entry = resolve(model_name, root)
    return load_hf_tokenizer(entry["path"], model_name)
