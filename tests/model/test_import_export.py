"""import-model, models register/lineage, export, and the bad inputs the issue lists."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmlab.cli.model import add_commands
from lmlab.errors import LmlabError
from lmlab.model import catalog
from lmlab.model.adapters import adapter_class
from lmlab.model.importer import derive_name, import_model, register_checkpoint

SRC = str(Path(catalog.__file__).parents[2])


def nothing_written(root: Path) -> bool:
    return not (root / catalog.REGISTRY_FILE).exists() and not [
        p for p in root.glob("*") if p.name != catalog.LOCK_FILE] if root.exists() else True


@pytest.mark.parametrize("source, name", [
    ("Qwen/Qwen2.5-0.5B", "qwen2.5-0.5b"), ("HuggingFaceTB/SmolLM2-135M", "smollm2-135m"),
    ("/x/y/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
    ("/x/model.f16.gguf", "model"), ("./my folder/", "my-folder")])
def test_default_names(source: str, name: str) -> None:
    assert derive_name(source) == name


@pytest.mark.slow
def test_import_folder_records_the_entry(hf_folder_factory, models_root) -> None:
    folder = hf_folder_factory("qwen3")
    e = import_model(str(folder), root=models_root)
    assert e["model_name"] == "tiny-qwen3" and e["model_id"] == str(folder.resolve())
    assert (e["architecture_type"], e["architecture"], e["source"], e["license"]) == (
        "qwen3", "Qwen3ForCausalLM", "folder", "apache-2.0")
    assert e["fine_tuned_from"] is None and e["dtype"] == "float32"
    assert e["num_params"] == sum(p.numel() for p in adapter_class("qwen3").from_registry(
        catalog.resolve("tiny-qwen3", models_root)).parameters())
    d = models_root / "tiny-qwen3"
    assert e["weights_sha256"] == catalog.weights_hash(d) and len(e["weights_sha256"]) == 64
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {
        p.name for p in d.iterdir()}
    assert not list(models_root.glob(".*.tmp-*"))  # no staging folder left


def test_bad_inputs_write_nothing(hf_folder_factory, tmp_path, models_root) -> None:
    no_cfg = tmp_path / "no-config"
    no_cfg.mkdir()
    (no_cfg / "model.safetensors").write_bytes(b"x")
    with pytest.raises(LmlabError, match="no config.json"):
        import_model(str(no_cfg), root=models_root)

    gpt2 = tmp_path / "gpt2-folder"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2",
                                                  "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(LmlabError, match="Supported model types: gemma3_text, llama, qwen2, qwen3"):
        import_model(str(gpt2), root=models_root)

    with pytest.raises(LmlabError, match="not allowed"):
        import_model(str(gpt2), name="../escape", root=models_root)
    with pytest.raises(LmlabError, match="neither an existing folder"):
        import_model(str(tmp_path / "missing-folder"), root=models_root)
    with pytest.raises(LmlabError, match="neither an existing folder"):
        import_model("not a hub id", root=models_root)
    txt = tmp_path / "weights.txt"
    txt.write_text("x")
    with pytest.raises(LmlabError, match="not a .gguf"):
        import_model(str(txt), root=models_root)
    assert nothing_written(models_root)
    assert not (models_root.parent / "escape").exists()


def test_taken_name_is_refused_before_loading(hf_folder_factory, models_root) -> None:
    folder = hf_folder_factory("llama")
    import_model(str(folder), name="m", root=models_root)
    before = (models_root / catalog.REGISTRY_FILE).read_bytes()
    t = time.perf_counter()
    with pytest.raises(LmlabError, match="already registered"):
        import_model(str(folder), name="m", root=models_root)
    assert time.perf_counter() - t < 0.5
    assert (models_root / catalog.REGISTRY_FILE).read_bytes() == before


OFFLINE_IMPORT = """
import sys, time
t = time.perf_counter()
from lmlab.errors import LmlabError
from lmlab.model.importer import import_model
try:
    import_model("lmlab-test/definitely-not-cached", root=sys.argv[1])
except LmlabError as e:
    print(f"{time.perf_counter() - t:.2f}|{e}")
"""


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers (the case that hangs forever)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    srv.close()


# Only loopback: tests never send traffic to any other address.
@pytest.mark.parametrize("env", ["offline-mode", "silent-server"])
def test_uncached_hub_id_offline_fails_fast_with_advice(tmp_path, env, silent_server) -> None:
    env = {"offline-mode": {"HF_HUB_OFFLINE": "1"},
           "silent-server": {"HF_ENDPOINT": silent_server}}[env]
    full = {k: v for k, v in os.environ.items() if k not in {"HF_HUB_OFFLINE", "HF_ENDPOINT"}}
    full |= {"HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": SRC, **env}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", OFFLINE_IMPORT, str(tmp_path / "models")],
                         env=full, capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - t
    assert out.returncode == 0, out.stderr
    inner, _, msg = out.stdout.partition("|")
    assert float(inner) < 5.0, f"took {inner}s (process {wall:.1f}s)"
    assert "not in the local Hugging Face cache" in msg and "import-model ./" in msg
    assert nothing_written(tmp_path / "models")


@pytest.mark.slow
def test_cached_hub_id_imports_offline(hf_folder_factory, tmp_path, monkeypatch) -> None:
    """A hub id in the local HF cache (laid out as huggingface_hub lays it out) needs no network."""
    src = hf_folder_factory("qwen2")
    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--lmlab-test--tiny-qwen2"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # restored after
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    root = tmp_path / "models"
    e = import_model("lmlab-test/tiny-qwen2", root=root)
    assert (e["model_name"], e["model_id"], e["source"], e["revision"]) == (
        "tiny-qwen2", "lmlab-test/tiny-qwen2", "hub", rev)
    assert (root / "tiny-qwen2" / "model.safetensors").is_file()


@pytest.fixture
def finetuned_ckpt(hf_folder_factory, models_root, tmp_path):
    """A checkpoint of a 'fine-tuned' tiny Qwen2 (weights nudged), as the loop would write it."""
    from lmlab.model.checkpoint import save_checkpoint

    import_model(str(hf_folder_factory("qwen2")), name="base", root=models_root)
    adapter = adapter_class("qwen2").from_registry(catalog.resolve("base", models_root))
    with torch.no_grad():
        adapter.model.model.layers[0].mlp.down_proj.weight.add_(0.05)
    path = save_checkpoint(tmp_path / "run" / "ckpt_0000007.pt", adapter, step=7,
                           config={"data": {"path": "data/shakespeare-qwen", "block_size": 64}})
    return path, adapter.eval()


@pytest.mark.slow
def test_register_checkpoint_and_lineage(finetuned_ckpt, models_root) -> None:
    path, adapter = finetuned_ckpt
    e = register_checkpoint(path, "ft1", models_root)
    assert (e["fine_tuned_from"], e["source"], e["step"], e["license"]) == (
        "base", "checkpoint", 7, "apache-2.0")
    assert e["weights_sha256"] != catalog.resolve("base", models_root)["weights_sha256"]
    ft1 = adapter_class("qwen2").from_registry(catalog.resolve("ft1", models_root)).eval()
    idx = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(ft1(idx), adapter(idx))
    assert ft1.meta["fine_tuned_from"] == "ft1"  # training it makes ft1 the parent
    from lmlab.model.checkpoint import save_checkpoint

    p2 = save_checkpoint(path.parent / "ckpt_0000009.pt", ft1, step=9, config={})
    register_checkpoint(p2, "ft2", models_root)
    chain = [x["model_name"] for x in catalog.lineage("ft2", models_root)]
    assert chain == ["ft2", "ft1", "base"]
    with pytest.raises(LmlabError, match="already registered"):
        register_checkpoint(p2, "ft2", models_root)


@pytest.mark.slow
def test_export_loads_with_plain_transformers(finetuned_ckpt, models_root, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmlab.model.export import export_checkpoint

    path, adapter = finetuned_ckpt
    out = export_checkpoint(path, tmp_path / "export", root=models_root)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    idx = torch.tensor([tok.encode("Hello world, wherefore art thou")])
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, adapter(idx), atol=1e-5, rtol=1e-5)
    card = (out / "README.md").read_text()
    base_id = catalog.resolve("base", models_root)["model_id"]
    assert f"base_model: {base_id}" in card and "license: apache-2.0" in card
    assert "step 7" in card and "data/shakespeare-qwen" in card
    with pytest.raises(LmlabError, match="not empty"):
        export_checkpoint(path, out, root=models_root)


def run_cli(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="lmlab")
    add_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    args.func(args)


def test_cli_commands(hf_folder_factory, models_root, capsys) -> None:
    run_cli(["import-model", str(hf_folder_factory("llama")), "--name", "ll",
             "--models-dir", str(models_root)])
    assert "Imported" in capsys.readouterr().out
    run_cli(["models", "--models-dir", str(models_root), "list"])
    out = capsys.readouterr().out
    assert "ll" in out and "llama" in out
    run_cli(["models", "--models-dir", str(models_root), "show", "ll", "--json"])
    assert json.loads(capsys.readouterr().out)["architecture"] == "LlamaForCausalLM"
    run_cli(["models", "--models-dir", str(models_root), "lineage", "ll"])
    assert capsys.readouterr().out.startswith("ll  folder:")
    with pytest.raises(LmlabError, match="Registered models: ll"):
        run_cli(["models", "--models-dir", str(models_root), "show", "nope"])


def test_cli_help_explains_each_command(capsys) -> None:
    for argv in (["import-model", "-h"], ["models", "-h"], ["models", "register", "-h"],
                 ["export", "-h"]):
        with pytest.raises(SystemExit):
            run_cli(argv)
        assert "usage:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_cli(["import-model", "-h"])
    assert "--trust-remote-code" in capsys.readouterr().out
