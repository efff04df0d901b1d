"""`export --format gguf`: a fine-tune as one GGUF file for llama.cpp, Ollama and transformers.

The writing is the `gguf` package's (`GGUFWriter`, the tensor-name map `TensorNameMap`,
`gguf.quants` for q8_0 and bf16), so the file is what llama.cpp's own converter writes for
the same model: llama.cpp's names and key set, Llama's q/k rows in llama.cpp's rotary order,
1-D tensors (norms, biases) in f32 whatever the outtype, the head left out when it is tied to
the embedding. The tokenizer (vocabulary, merges, special ids, chat template) is the one the
model came with, and lineage rides in `general.base_model.*` and `lmlab.*` keys.

A LoRA fine-tune is written merged (GGUF has no adapter-beside-base form llama.cpp's main
path loads). Families: Llama (SmolLM2, Llama 2/3 without rope scaling), Qwen2/2.5, Qwen3.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.config import config_hash
from lmlab.errors import LmlabError
from lmlab.model import catalog
from lmlab.model.finetune import is_lora, merged_model

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp's name for the pre-tokenizer, recognised by the split regex of tokenizer.json
_PRE_BY_REGEX = {"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}"
                 "\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
                 "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s"
                 "\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe"}


def _arch(model_type: str) -> Any:
    import gguf

    archs = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
             "qwen3": gguf.MODEL_ARCH.QWEN3}
    if model_type not in archs:
        raise LmlabError(
            f"GGUF export writes Llama-family (SmolLM2, Llama) and Qwen2/Qwen3 models; this "
            f"checkpoint is '{model_type}'. Export it as a Hugging Face folder instead "
            "(`lmlab export --format hf`), which llama.cpp's convert_hf_to_gguf.py can convert "
            "if it knows the family.")
    return archs[model_type]


def check_hf_config(cfg: Any) -> None:
    """Refuse what the writer would get wrong rather than write a file that runs differently."""
    rope = getattr(cfg, "rope_scaling", None) or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind != "default":
        raise LmlabError(
            f"The model uses '{kind}' rope scaling, which lmlab's GGUF export does not write yet; "
            "export a Hugging Face folder (`--format hf`) and convert it with llama.cpp's "
            "convert_hf_to_gguf.py.")


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(cfg, "rope_theta", 10000.0))


def _llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half row order -> llama.cpp's interleaved pairs (its converter's `permute`)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _tensor_data(w: torch.Tensor, outtype: str) -> tuple[np.ndarray, Any]:
    """The array to write and its GGML type: 1-D stays f32; q8_0 needs rows in blocks of 32."""
    import gguf

    q = gguf.GGMLQuantizationType
    a = w.detach().float().cpu().numpy()
    if a.ndim == 1 or outtype == "f32":
        return a, q.F32
    if outtype == "f16" or (outtype == "q8_0" and a.shape[-1] % 32):
        return a.astype(np.float16), q.F16
    qtype = q.BF16 if outtype == "bf16" else q.Q8_0
    return gguf.quants.quantize(a, qtype), qtype


def _pre_tokenizer(tok_json: dict[str, Any], source_gguf: str | None) -> str:
    """llama.cpp's pre-tokenizer name: the source GGUF's when there was one, else from the regex."""
    if source_gguf and Path(source_gguf).is_file():
        from gguf import GGUFReader

        field = GGUFReader(source_gguf).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents())
    text = json.dumps(tok_json.get("pre_tokenizer"))
    for regex, name in _PRE_BY_REGEX.items():
        if json.dumps(regex)[1:-1] in text:
            return name
    return "smollm" if '"individual_digits": true' in text else "gpt2"


def _write_tokenizer(writer: Any, tok: Any, n_vocab: int, source_gguf: str | None) -> None:
    """Byte-level BPE vocabulary, merges, special ids and chat template, in llama.cpp's keys.

    Rows of the embedding past the tokenizer's last id (Qwen pads its table) are `[PADn]`
    tokens of type UNUSED, as llama.cpp's converter writes them.
    """
    import gguf

    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        tok_json = json.loads((Path(d) / "tokenizer.json").read_text())
        model = tok_json["model"]
        if model.get("type") != "BPE" or model.get("byte_fallback"):
            raise LmlabError("GGUF export writes byte-level BPE tokenizers (Llama 3, SmolLM2, "
                             f"Qwen); this model's is {model.get('type')}. Export a Hugging Face "
                             "folder (`--format hf`) instead.")
        tokens = [f"[PAD{i}]" for i in range(n_vocab)]
        types = [gguf.TokenType.UNUSED] * n_vocab
        for text, i in model["vocab"].items():
            if i < n_vocab:
                tokens[i], types[i] = text, gguf.TokenType.NORMAL
        for added in tok_json.get("added_tokens", []):
            if added["id"] < n_vocab:
                tokens[added["id"]] = added["content"]
                types[added["id"]] = (gguf.TokenType.CONTROL if added.get("special")
                                      else gguf.TokenType.USER_DEFINED)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(tok_json, source_gguf))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        # merges, bos/eos/pad ids, add_bos and the chat template, read the way llama.cpp reads them
        gguf.SpecialVocab(Path(d), load_merges=True, n_vocab=n_vocab).add_to_gguf(writer,
                                                                                  quiet=True)


def _write_lineage(writer: Any, meta: dict[str, Any], ckpt: dict[str, Any],
                   root: str | Path | None) -> None:
    from lmlab.model.export import _lineage_names

    chain = _lineage_names(meta, root)
    models = catalog.load_registry(root) if chain else {}
    base = models.get(chain[-1], {}) if chain else {}
    base_name = chain[-1] if chain else "unknown"
    base_id = str(base.get("model_id") or meta.get("model_id") or base_name)
    writer.add_name(f"{base_name} (lmlab fine-tune)")
    writer.add_license(str(base.get("license") or "unknown"))
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, base_name)
    if "/" in base_id and not base_id.startswith("/"):
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{base_id}")
    ft = meta.get("finetune") or {"method": "full"}
    writer.add_finetune(f"lmlab-{ft['method']}")
    writer.add_string("lmlab.base_model", base_id)
    writer.add_string("lmlab.lineage", " -> ".join(chain))
    writer.add_string("lmlab.finetune", json.dumps(ft, sort_keys=True))
    writer.add_string("lmlab.run_id", str(ckpt.get("run_id") or ""))
    writer.add_string("lmlab.checkpoint", Path(str(ckpt.get("path", "?"))).name)
    writer.add_uint32("lmlab.step", int(ckpt.get("step") or 0))
    cfg = ckpt.get("config")
    writer.add_string("lmlab.config_hash", config_hash(cfg) if isinstance(cfg, dict) else "")


def export_gguf(checkpoint: str | Path, out: str | Path, outtype: str = "f32",
                force: bool = False, root: str | Path | None = None) -> Path:
    """Write the checkpoint's model (LoRA merged) with its tokenizer to the GGUF file `out`.

    Everything that can be refused is checked before the file is opened; the file is written
    beside `out` and renamed into place, so a failure leaves no half file.
    """
    import gguf

    from lmlab.fileio import temp_path
    from lmlab.model.adapters import load_adapter
    from lmlab.model.adapters.hf import HFCausalLMAdapter

    out = Path(out)
    if outtype not in OUTTYPES:
        raise LmlabError(f"--outtype {outtype} is not one GGUF export writes; choose one of "
                         f"{', '.join(OUTTYPES)}.")
    if out.exists() and not force:
        raise LmlabError(f"{out} exists. Choose another --out, or pass --force to replace it.")
    adapter, ckpt = load_adapter(checkpoint, models_root=root)
    if not isinstance(adapter, HFCausalLMAdapter):
        raise LmlabError(
            f"{ckpt['path']} is a from-scratch character model, which GGUF cannot hold (its "
            "97-character vocabulary is no llama.cpp tokenizer). Export it as a Hugging Face "
            "folder (`lmlab export --format hf`) instead.")
    cfg = adapter.model.config
    arch = _arch(cfg.model_type)
    check_hf_config(cfg)
    name = adapter.meta.get("model_name")
    entry = catalog.load_registry(root).get(name or "", {})
    if name and (catalog.models_root(root) / name).is_dir():
        adapter._tokenizer_folder = catalog.models_root(root) / name
    tok = adapter.tokenizer
    lora = is_lora(adapter.meta)
    state = merged_model(adapter).state_dict()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    try:
        _write_hparams(writer, cfg, head_dim, outtype)
        _write_tokenizer(writer, tok, cfg.vocab_size, entry.get("source_path"))
        _write_lineage(writer, adapter.meta, ckpt, root)
        writer.add_bool("lmlab.lora_merged", lora)
        _write_tensors(writer, adapter, arch, state, outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return out


def _write_hparams(writer: Any, cfg: Any, head_dim: int, outtype: str) -> None:
    """The model's shape and numerics, as llama.cpp's loader reads them."""
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32,
                          "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])


def _write_tensors(writer: Any, adapter: Any, arch: Any, state: dict[str, torch.Tensor],
                   outtype: str) -> None:
    """Every weight under its llama.cpp name (a tied head once, as the embedding)."""
    import gguf

    cfg = adapter.model.config
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    for hf_name, w in state.items():
        if tied and hf_name == "lm_head.weight":
            continue
        gg_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg_name is None:
            raise LmlabError(f"GGUF export has no llama.cpp name for tensor {hf_name} of "
                             f"{type(adapter.model).__name__}; export `--format hf` instead.")
        if arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in hf_name else cfg.num_key_value_heads
            w = _llama_permute(w, heads)
        data, qtype = _tensor_data(w, outtype)
        writer.add_tensor(gg_name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
