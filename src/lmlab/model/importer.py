"""`import-model` and `models register`: bring weights into the catalog.

A model comes from a hub id (`Qwen/Qwen2.5-0.5B`), a local Hugging Face folder,
a `.gguf` file, or (for `models register`) a fine-tuned lmlab checkpoint. Each
is loaded through `transformers` (which also proves it loads) and written as a
standard Hugging Face folder into a staging folder; only when everything has
succeeded is the staging folder moved to `models/<model_name>/` and the entry
written, under the registry lock. A failure therefore writes nothing to the
registry and leaves no half-imported folder behind.

The hub path never hangs: before `huggingface_hub` makes a request, a ~2 s HTTP
HEAD request to the hub decides whether we are online. Offline, the hub's offline
mode is switched on (its default retries take ~45 s and a silent server hangs
forever), so a cached model imports from the local Hugging Face cache and an
uncached one fails at once with a message on importing from a folder.
"""

from __future__ import annotations

import http.client
import json
import os
import pickle
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lmlab.errors import LmlabError
from lmlab.fileio import temp_path
from lmlab.model import catalog

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_QUANT_RE = re.compile(r"^(i?q\d.*|f16|f32|bf16|fp16|fp32)$", re.IGNORECASE)
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "README.md",
             "LICENSE*"]


def derive_name(source: str) -> str:
    """A default model_name: the last part of the id or path, lower-cased, quant tag dropped.

    `Qwen/Qwen2.5-0.5B` -> `qwen2.5-0.5b`; `SmolLM2-135M-Instruct.Q4_1.gguf` ->
    `smollm2-135m-instruct`.
    """
    base = Path(source.rstrip("/")).name
    if base.lower().endswith(".gguf"):
        base = base[: -len(".gguf")]
        stem, _, tag = base.rpartition(".")
        if stem and _QUANT_RE.match(tag):
            base = stem
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip(".-_").lower()
    return name or "model"


# --- source kinds -----------------------------------------------------------------------


def _supported_or_raise(model_type: str | None, what: str, architectures: Any = None,
                        hf_cfg: dict[str, Any] | None = None) -> type:
    """The adapter class for `model_type`, or an error naming the architectures lmlab supports.

    The adapter also checks the config itself (Gemma 3 refuses soft-capping), so a
    model it would run wrongly is refused here, before any weights are read.
    """
    from lmlab.model.adapters import adapter_class, supported_architectures
    from lmlab.model.adapters.hf import HFCausalLMAdapter

    supported = supported_architectures()
    if model_type in supported:
        cls = adapter_class(model_type)
        if issubclass(cls, HFCausalLMAdapter):
            cls.check_config(hf_cfg or {})
            return cls
    arch = f" ({', '.join(architectures)})" if architectures else ""
    raise LmlabError(
        f"{what} is a '{model_type}' model{arch}, and no lmlab adapter supports that "
        f"architecture. Supported model types: {', '.join(sorted(supported))}. A new family "
        "is one adapter file in src/lmlab/model/adapters/."
    )


def _read_front_matter_license(folder: Path) -> str | None:
    """The `license:` of a model card's YAML front matter, if there is one."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    head = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    m = re.search(r"^license:\s*['\"]?([^'\"\n]+)", head, re.MULTILINE)
    return m.group(1).strip() if m else None


def _gguf_fields(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out = {}
    for key in ("general.architecture", "general.license", "general.name",
                "general.organization"):
        field = reader.fields.get(key)
        if field is not None:
            try:
                out[key] = field.contents()
            except Exception:  # an odd field type is metadata we can live without
                pass
    return out


def hub_endpoint() -> tuple[str, str, int]:
    """Scheme, host and port of the hub (HF_ENDPOINT when set), for the reachability probe."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    scheme = url.scheme or "https"
    port = url.port or (443 if scheme == "https" else 80)
    return scheme, url.hostname or "huggingface.co", port


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the hub answers an HTTP HEAD request within `timeout` seconds.

    A bare TCP connect is not enough: a server that accepts and never answers
    would make huggingface_hub hang. The probe runs in a daemon thread, so a
    slow DNS lookup cannot stretch the wait either.
    """
    scheme, host, port = hub_endpoint()
    ok: list[bool] = []

    def probe() -> None:
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        conn = cls(host, port, timeout=timeout)
        try:
            conn.request("HEAD", "/")
            conn.getresponse()
            ok.append(True)
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def set_hub_offline() -> None:
    """Switch huggingface_hub (and transformers) to offline mode, imported yet or not."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True


def _offline_help(repo_id: str) -> str:
    return (
        f"To import it without network, download it on a machine that has network "
        f"(`hf download {repo_id} --local-dir {derive_name(repo_id)}`), copy that folder "
        f"here and run `python main.py import-model ./{derive_name(repo_id)}`."
    )


def fetch_from_hub(repo_id: str) -> tuple[Path, bool]:
    """The snapshot folder of `repo_id` in the Hugging Face cache (downloading if online).

    -> (folder, offline). Offline and not cached fails at once.
    """
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    if not offline and not hub_reachable():
        offline = True
    if offline:
        set_hub_offline()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=offline)
    except GatedRepoError:
        raise LmlabError(
            f"Hub model '{repo_id}' is gated: accept its licence on huggingface.co and log in "
            f"(`hf auth login`), then import again. {_offline_help(repo_id)}"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise LmlabError(
            f"There is no model '{repo_id}' on the Hugging Face hub (or it is private). Check "
            "the id on huggingface.co, e.g. Qwen/Qwen2.5-0.5B."
        ) from None
    except LocalEntryNotFoundError:
        raise LmlabError(
            f"Cannot import '{repo_id}': the Hugging Face hub is unreachable (offline) and the "
            f"model is not in the local Hugging Face cache. {_offline_help(repo_id)}"
        ) from None
    except HfHubHTTPError as e:
        raise LmlabError(f"The hub refused '{repo_id}': {str(e).splitlines()[0][:200]}") from None
    return Path(folder), offline


# --- import ----------------------------------------------------------------------------


def _staging(root: Path, name: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    staged = temp_path(root / name)  # removed by the next registry write if we are killed
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir()
    return staged


def _plain_copy(model: Any, model_cls: type) -> Any:
    """The same weights in a model without the gguf quantizer, which refuses `save_pretrained`.

    transformers dequantises a gguf on load but keeps it marked as quantized; the
    dequantised float32 weights are ordinary weights, so they move to a plain model.
    """
    from transformers.initialization import no_init_weights

    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    with no_init_weights():
        plain = model_cls(cfg)
    plain.tie_weights()
    plain.load_state_dict(model.state_dict())
    return plain


def _describe(model: Any, folder: Path) -> dict[str, Any]:
    from lmlab.model.adapters.hf import dtype_name

    return {
        "architecture": type(model).__name__,
        "architecture_type": model.config.model_type,
        "num_params": int(sum(p.numel() for p in model.parameters())),
        "dtype": dtype_name(model.get_input_embeddings().weight.dtype),
        "weights_sha256": catalog.weights_hash(folder),
    }


def _source_kind(source: str) -> tuple[str, Path]:
    """'hub', 'folder' or 'gguf', and the source as a path, checked before anything is read."""
    path = Path(source).expanduser()
    if path.exists():
        kind = "gguf" if path.is_file() and path.suffix.lower() == ".gguf" else "folder"
        if path.is_file() and kind != "gguf":
            raise LmlabError(
                f"{path} is a file but not a .gguf file. import-model takes a hub id, a Hugging "
                "Face model folder (with config.json), or a .gguf file."
            )
        return kind, path
    if HUB_ID_RE.match(source) and not source.lower().endswith(".gguf"):
        return "hub", path
    raise LmlabError(
        f"'{source}' is neither an existing folder or .gguf file nor a hub id like "
        "Qwen/Qwen2.5-0.5B. Check the path or the id."
    )


def _hf_config(folder: Path) -> dict[str, Any]:
    """A Hugging Face folder's config.json, or one line on why it is not one."""
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise LmlabError(
            f"{folder} has no config.json, so it is not a Hugging Face model folder. "
            "Give the folder that holds config.json, the weights (*.safetensors) and the "
            "tokenizer files."
        )
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise LmlabError(f"{cfg_file} is not valid JSON ({e}).") from None


def _load_weights(model_cls: Any, folder: Path, source: str, gguf_file: str | None,
                  trust_remote_code: bool) -> Any:
    """The model from `folder` (safetensors, or a gguf dequantised to float32), loaded safely."""
    import torch

    load_kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:  # dequantised weights are exact in float32, not in bf16
        load_kw |= {"gguf_file": gguf_file, "dtype": torch.float32}
    else:
        load_kw["dtype"] = "auto"
    try:
        model = model_cls.from_pretrained(str(folder), **load_kw)
    except pickle.UnpicklingError:
        raise LmlabError(
            f"Refused the weights of {source}: a pickled weight file (pytorch_model.bin) "
            "holds Python objects other than tensors, which could run code on loading. It "
            "was not executed. Convert the model to safetensors where you trust it, or "
            "use a safetensors copy."
        ) from None
    except (OSError, ValueError, RuntimeError, EOFError) as e:
        raise LmlabError(
            f"transformers could not load the weights of {source}: "
            f"{str(e).splitlines()[0][:300]}"
        ) from None
    return _plain_copy(model, model_cls) if gguf_file else model


def _load_tokenizer(folder: Path, source: str, gguf_file: str | None,
                    trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file,
                                             trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise LmlabError(
            f"{source} has no usable tokenizer ({str(e).splitlines()[0][:200]}). lmlab "
            "fine-tunes with the model's native tokenizer: add its tokenizer files "
            "(tokenizer.json, tokenizer_config.json) to the folder."
        ) from None


def import_model(source: str, name: str | None = None, root: str | Path | None = None,
                 trust_remote_code: bool = False, license: str | None = None
                 ) -> dict[str, Any]:
    """Import a hub id, a Hugging Face folder or a .gguf file as registry model `name`.

    Returns the new registry entry. Every check that can fail cheaply (name,
    source kind, config.json, supported architecture) runs before any weights
    are read or downloaded.
    """
    root = catalog.models_root(root)
    kind, path = _source_kind(source)
    name = catalog.validate_name(name or derive_name(source))
    catalog.check_name_free(name, root)

    model_id, revision, gguf_file, gguf_meta, hf_cfg = source, None, None, {}, None
    if kind == "hub":
        folder, _ = fetch_from_hub(source)
        revision = folder.name
    elif kind == "folder":
        folder = path.resolve()
        model_id = str(folder)
    else:
        folder, model_id, gguf_file = path.resolve().parent, path.name, path.name
        gguf_meta = _gguf_fields(path.resolve())
    if kind == "gguf":
        model_type, architectures = gguf_meta.get("general.architecture"), None
    else:
        hf_cfg = _hf_config(folder)
        model_type, architectures = hf_cfg.get("model_type"), hf_cfg.get("architectures")
    adapter_cls = _supported_or_raise(model_type, str(path if kind == "gguf" else source),
                                      architectures, hf_cfg)

    staged = _staging(root, name)
    try:
        if kind == "folder":
            catalog.check_sums(folder)  # an lmlab export records its weights' hashes
        model = _load_weights(adapter_cls.model_class(model_type), folder, source, gguf_file,
                              trust_remote_code)
        tok = _load_tokenizer(folder, source, gguf_file, trust_remote_code)
        model.save_pretrained(str(staged))
        tok.save_pretrained(str(staged))
        if kind != "gguf":
            for extra in ("README.md", "LICENSE", "LICENSE.txt"):
                if (folder / extra).is_file():
                    shutil.copyfile(folder / extra, staged / extra)
        lic = (license or gguf_meta.get("general.license")
               or (_read_front_matter_license(folder) if kind != "gguf" else None)
               or "unknown")
        entry = {"model_name": name, "model_id": model_id, "source": kind, "license": lic,
                 "fine_tuned_from": None, **_describe(model, staged)}
        if revision:
            entry["revision"] = revision
        if kind == "gguf":
            entry["source_path"] = str(path.resolve())
        del model
        return catalog.add_entry(entry, root, staged_dir=staged)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)


def register_checkpoint(checkpoint: str | Path, name: str, root: str | Path | None = None
                        ) -> dict[str, Any]:
    """Make a fine-tuned checkpoint a registry model whose `fine_tuned_from` is its parent.

    A LoRA fine-tune is registered merged (a whole model others can fine-tune
    again); its entry records the method and rank.
    """
    from lmlab.model.adapters import load_adapter
    from lmlab.model.adapters.hf import HFCausalLMAdapter
    from lmlab.model.finetune import merged_model

    root = catalog.models_root(root)
    catalog.validate_name(name)
    catalog.check_name_free(name, root)
    adapter, ckpt = load_adapter(checkpoint, models_root=root)
    if not isinstance(adapter, HFCausalLMAdapter):
        raise LmlabError(
            f"{ckpt['path']} is a from-scratch lmlab model ({adapter.meta.get('architecture_type')}"
            "); the registry holds Hugging Face models. Sample or evaluate it from the "
            "checkpoint directly."
        )
    meta = adapter.meta
    parent = meta.get("fine_tuned_from") or meta.get("model_name")
    parent_entry = catalog.load_registry(root).get(parent or "", {})
    if meta.get("model_name") and (root / meta["model_name"]).is_dir():
        adapter._tokenizer_folder = root / meta["model_name"]
    tok = adapter.tokenizer  # from the parent's folder; fails clearly if it is gone
    staged = _staging(root, name)
    try:
        model = merged_model(adapter)
        model.save_pretrained(str(staged))
        tok.save(staged)
        ft = meta.get("finetune") or {"method": "full"}
        entry = {
            "model_name": name,
            "model_id": str(Path(ckpt["path"]).resolve()),
            "source": "checkpoint",
            "license": parent_entry.get("license", "unknown"),
            "fine_tuned_from": parent,
            "step": ckpt.get("step"),
            "finetune": {k: v for k, v in ft.items() if k != "base_weights_sha256"},
            **_describe(model, staged),
        }
        return catalog.add_entry(entry, root, staged_dir=staged)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
