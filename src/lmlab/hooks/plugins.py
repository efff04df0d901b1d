"""Plugin files: a user's own Python file that registers hooks with the decorator.

The file's sha256 goes into the run manifest, so two runs that name the same
plugin path but ran different code can never be mistaken for each other.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.hooks import registry
from lmlab.hooks import standard as _standard  # noqa: F401  (registers the built-ins)

_loaded: dict[str, str] = {}  # resolved path -> sha256 of the source that was executed


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_plugin(path: str | Path) -> str:
    """Execute a plugin file once (its decorators register its hooks); return its sha256."""
    p = Path(path).resolve()
    if not p.is_file():
        raise LmlabError(f"Plugin file '{path}' does not exist (hooks.plugins lists it).")
    digest = file_sha256(p)
    if _loaded.get(str(p)) == digest:
        return digest
    module_name = f"lmlab_plugin_{digest[:12]}"
    spec = importlib.util.spec_from_file_location(module_name, p)
    module = importlib.util.module_from_spec(spec)
    registry._current_source = str(p)
    try:
        spec.loader.exec_module(module)
    except LmlabError:
        raise
    except Exception as e:
        raise LmlabError(f"Plugin file '{path}' failed to load: {type(e).__name__}: {e}") from e
    finally:
        registry._current_source = None
    sys.modules[module_name] = module
    _loaded[str(p)] = digest
    return digest
