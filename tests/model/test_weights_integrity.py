"""Imported and exported weights carry content hashes that are checked before use."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.model import catalog
from lmlab.model.adapters import adapter_class
from lmlab.model.importer import import_model


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_flipped_byte_in_registered_weights_is_refused(hf_folder_factory, models_root,
                                                       tmp_path, capsys) -> None:
    import_model(str(hf_folder_factory("qwen2")), name="base", root=models_root)
    assert main(["models", "--models-dir", str(models_root), "verify", "base"]) == 0
    assert "ok: base weights sha256" in capsys.readouterr().out
    weights = models_root / "base" / "model.safetensors"
    size = weights.stat().st_size
    flip_middle_byte(weights)
    assert weights.stat().st_size == size
    assert main(["models", "--models-dir", str(models_root), "verify", "base"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "model.safetensors" in err and err.count("sha256") == 1
    assert len([w for w in err.split() if len(w.strip(".,")) == 64]) == 2
    with pytest.raises(LmlabError, match="weights of model 'base' .* are damaged"):
        adapter_class("qwen2").from_registry(catalog.resolve("base", models_root))


@pytest.mark.slow
def test_export_writes_sha256sums_that_import_checks(hf_folder_factory, models_root,
                                                     tmp_path) -> None:
    from lmlab.model.checkpoint import save_checkpoint
    from lmlab.model.export import export_checkpoint

    import_model(str(hf_folder_factory("qwen2")), name="base", root=models_root)
    adapter = adapter_class("qwen2").from_registry(catalog.resolve("base", models_root))
    ckpt = save_checkpoint(tmp_path / "run" / "ckpt_0000001.pt", adapter, step=1, config={})
    out = export_checkpoint(ckpt, tmp_path / "export", root=models_root)
    sums = (out / "SHA256SUMS").read_text()
    assert "  model.safetensors\n" in sums
    assert subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out,
                          capture_output=True).returncode == 0  # the standard tool agrees
    flip_middle_byte(out / "model.safetensors")
    with pytest.raises(LmlabError, match="model.safetensors does not match .*SHA256SUMS"):
        import_model(str(out), name="again", root=models_root)
    assert "again" not in catalog.load_registry(models_root)


@pytest.mark.slow
def test_hostile_pickle_is_refused_without_running_it(tmp_path, capsys) -> None:
    from transformers import Qwen2Config

    folder = tmp_path / "hostile"
    Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2,
                vocab_size=64).save_pretrained(str(folder))
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    rc = main(["import-model", str(folder), "--name", "evil", "--models-dir",
               str(tmp_path / "models")])
    err = capsys.readouterr().err
    assert rc == 2 and not marker.exists()
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert "Refused the weights" in err and "was not executed" in err
