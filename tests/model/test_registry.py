"""The model registry: safe names, clear errors, lineage, atomic and concurrent writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlab.errors import LmlabError
from lmlab.model import catalog


def entry(name: str, parent: str | None = None, **kw) -> dict:
    return {"model_name": name, "model_id": f"org/{name}", "architecture_type": "qwen2",
            "architecture": "Qwen2ForCausalLM", "source": "hub", "license": "mit",
            "fine_tuned_from": parent, "num_params": 10, "dtype": "float32",
            "weights_sha256": "0" * 64, **kw}


@pytest.mark.parametrize("bad", ["", "..", ".", "../evil", "a/b", "a\\b", ".hidden", "x" * 200,
                                 "a..b", "/abs", "sp ace", "-dash", "ü"])
def test_unsafe_names_are_refused(bad: str, tmp_path: Path) -> None:
    with pytest.raises(LmlabError, match="not allowed"):
        catalog.validate_name(bad)
    with pytest.raises(LmlabError):
        catalog.add_entry(entry(bad), tmp_path)
    assert not (tmp_path / catalog.REGISTRY_FILE).exists()


@pytest.mark.parametrize("good", ["qwen2.5-0.5b", "SmolLM2_135M", "a", "m-1.v2"])
def test_safe_names_are_accepted(good: str) -> None:
    assert catalog.validate_name(good) == good


def test_add_resolve_list_and_update(tmp_path: Path) -> None:
    e = catalog.add_entry(entry("base"), tmp_path)
    assert set(catalog.ENTRY_FIELDS) <= set(e)
    assert e["created_at"] == e["updated_at"]
    got = catalog.resolve("base", tmp_path)
    assert got["model_id"] == "org/base" and got["path"] == str(tmp_path / "base")
    catalog.add_entry(entry("another"), tmp_path)
    assert [x["model_name"] for x in catalog.list_entries(tmp_path)] == ["another", "base"]
    time.sleep(1.05)
    upd = catalog.update_entry("base", tmp_path, license="apache-2.0")
    assert upd["license"] == "apache-2.0" and upd["updated_at"] > upd["created_at"]
    data = json.loads((tmp_path / catalog.REGISTRY_FILE).read_text())
    assert data["format"] == catalog.FORMAT and set(data["models"]) == {"base", "another"}


def test_unknown_name_lists_registered(tmp_path: Path) -> None:
    catalog.add_entry(entry("qwen-tiny"), tmp_path)
    catalog.add_entry(entry("llama-tiny"), tmp_path)
    with pytest.raises(LmlabError, match="llama-tiny, qwen-tiny") as e:
        catalog.resolve("qwen-tiyn", tmp_path)
    assert "Did you mean 'qwen-tiny'" in str(e.value)


def test_taken_name_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    catalog.add_entry(entry("base"), tmp_path)
    before = (tmp_path / catalog.REGISTRY_FILE).read_bytes()
    with pytest.raises(LmlabError, match="already registered"):
        catalog.add_entry(entry("base", model_id="other"), tmp_path)
    assert (tmp_path / catalog.REGISTRY_FILE).read_bytes() == before


@pytest.mark.parametrize("content", ['{"format": "lmlab-model-registry", "models": {', "[1, 2]",
                                     '{"models": {}}', '{"format": "lmlab-model-registry", '
                                     '"models": {"a": 3}}'])
def test_corrupt_registry_is_refused_and_never_overwritten(tmp_path: Path, content: str) -> None:
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / catalog.REGISTRY_FILE
    path.write_text(content)
    for call in (lambda: catalog.add_entry(entry("new"), tmp_path),
                 lambda: catalog.resolve("new", tmp_path),
                 lambda: catalog.list_entries(tmp_path)):
        with pytest.raises(LmlabError, match="will not"):
            call()
    assert path.read_text() == content
    assert not (tmp_path / "new").exists()


def test_lineage_follows_parents_to_the_base(tmp_path: Path) -> None:
    catalog.add_entry(entry("base"), tmp_path)
    catalog.add_entry(entry("ft1", parent="base", source="checkpoint"), tmp_path)
    catalog.add_entry(entry("ft2", parent="ft1", source="checkpoint"), tmp_path)
    assert [e["model_name"] for e in catalog.lineage("ft2", tmp_path)] == ["ft2", "ft1", "base"]
    assert [e["model_name"] for e in catalog.lineage("base", tmp_path)] == ["base"]


def test_staged_folder_moves_in_only_with_the_entry(tmp_path: Path) -> None:
    staged = tmp_path / ".staging-x"
    staged.mkdir()
    (staged / "config.json").write_text("{}")
    catalog.add_entry(entry("x"), tmp_path, staged_dir=staged)
    assert (tmp_path / "x" / "config.json").is_file() and not staged.exists()
    staged2 = tmp_path / ".staging-x2"
    staged2.mkdir()
    with pytest.raises(LmlabError):
        catalog.add_entry(entry("x"), tmp_path, staged_dir=staged2)  # taken: no move
    assert staged2.exists()


def test_weights_hash_depends_on_weight_bytes(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    (tmp_path / "config.json").write_text("{}")
    h1 = catalog.weights_hash(tmp_path)
    (tmp_path / "config.json").write_text('{"x": 1}')
    assert catalog.weights_hash(tmp_path) == h1
    (tmp_path / "model.safetensors").write_bytes(b"abd")
    assert catalog.weights_hash(tmp_path) != h1


WRITER = """
import sys
from lmlab.model import catalog
root, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    catalog.add_entry({"model_name": f"{tag}-{i}", "model_id": tag, "architecture_type": "llama",
                        "source": "hub", "fine_tuned_from": None}, root)
    if i % 3 == 0:
        catalog.update_entry(f"{tag}-{i}", root, license=tag)
"""


def test_two_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    n = 25
    env = {**os.environ, "PYTHONPATH": str(Path(catalog.__file__).parents[2])}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), tag, str(n)],
                              env=env) for tag in ("a", "b")]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    models = catalog.load_registry(tmp_path)
    assert set(models) == {f"{t}-{i}" for t in "ab" for i in range(n)}
    assert all(models[f"a-{i}"]["license"] == "a" for i in range(0, n, 3))
    assert not list(tmp_path.glob(".registry.json.tmp-*"))
