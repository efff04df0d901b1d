"""`export`: a checkpoint out as a plain Hugging Face folder.

A fine-tune of an imported model goes back out as its own architecture; a
from-scratch character model goes out as GPT-2 (see export_scratch).

The result loads with `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` in any `transformers` install, without
lmlab, lists its weight files' sha256 in SHA256SUMS (`sha256sum -c SHA256SUMS`;
`import-model` checks it), and carries a model card naming the base model and the lineage, so a
shared fine-tune never loses where it came from.
A LoRA fine-tune is written as a PEFT adapter folder
(`PeftModel.from_pretrained(base, DIR)`), or with `merge=True` as the base with
the LoRA updates added into its weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.fileio import atomic_write_text
from lmlab.model import catalog
from lmlab.model.finetune import is_lora, merged_model


def _lineage_names(meta: dict[str, Any], root: str | Path | None) -> list[str]:
    """Names from the checkpoint's parent back to the imported base, as the registry knows them."""
    parent = meta.get("fine_tuned_from") or meta.get("model_name")
    if not parent:
        return []
    try:
        return [e["model_name"] for e in catalog.lineage(parent, root)]
    except LmlabError:
        return [parent]


def model_card(meta: dict[str, Any], ckpt: dict[str, Any], root: str | Path | None = None,
               adapter_only: bool = False) -> str:
    """README.md text: YAML front matter (base_model, license, tags) and a short provenance."""
    chain = _lineage_names(meta, root)
    models = catalog.load_registry(root) if chain else {}
    base_entry = models.get(chain[-1], {}) if chain else {}
    base_id = base_entry.get("model_id") or meta.get("model_id") or "unknown"
    lic = base_entry.get("license") or "unknown"
    library = "peft" if adapter_only else "transformers"
    lines = ["---", f"base_model: {base_id}", f"license: {lic}", f"library_name: {library}",
             "tags:", "- lmlab", "- fine-tuned", "---", "",
             f"# Fine-tune of {base_id}", "",
             f"Exported by lmlab from checkpoint `{Path(ckpt.get('path', '?')).name}`"
             f" (step {ckpt.get('step', '?')}).", "",
             f"- Base model: `{base_id}` (lmlab registry name `{chain[-1] if chain else '?'}`)",
             f"- Fine-tuned from (immediate parent): `{chain[0] if chain else '?'}`",
             f"- Lineage: {' -> '.join(chain) if chain else 'unknown'}",
             f"- Architecture: {meta.get('architecture_type')}"]
    ft = meta.get("finetune") or {"method": "full"}
    if is_lora(meta):
        lines.append(f"- Fine-tuning: LoRA r={ft['r']}, alpha={ft['alpha']}, dropout="
                     f"{ft['dropout']} on {', '.join(ft['target_modules'])} (base weights "
                     f"sha256 {ft['base_weights_sha256']})")
        lines.append("- This folder: " + (
            "a PEFT adapter; load it with `PeftModel.from_pretrained(base, DIR)`"
            if adapter_only else "the base with the LoRA updates merged into its weights"))
    else:
        lines.append("- Fine-tuning: full (every weight)")
    cfg = ckpt.get("config") or {}
    data = cfg.get("data", {}) if isinstance(cfg, dict) else {}
    if data.get("path"):
        lines.append(f"- Fine-tuning data: `{data['path']}` (block size {data.get('block_size')})")
    return "\n".join(lines) + "\n"


def export_checkpoint(checkpoint: str | Path, out: str | Path, force: bool = False,
                      root: str | Path | None = None, merge: bool = False) -> Path:
    """Write the checkpoint's model, tokenizer and a model card to `out`; returns `out`.

    The model is checked before anything is written, so a refused one leaves `out` alone.
    A LoRA checkpoint becomes a PEFT adapter folder, or with `merge` a whole
    model; `merge` of a full fine-tune is just the model.
    """
    from lmlab.model.adapters import load_adapter
    from lmlab.model.adapters.custom import CustomTransformerAdapter
    from lmlab.model.adapters.hf import HFCausalLMAdapter

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise LmlabError(f"{out} exists and is not empty. Choose a new --out folder, or pass "
                         "--force to write into it.")
    adapter, ckpt = load_adapter(checkpoint, models_root=root)
    if isinstance(adapter, CustomTransformerAdapter):
        from lmlab.model.export_scratch import export_scratch, scratch_model_card

        export_scratch(adapter, out)
        atomic_write_text(out / "README.md", scratch_model_card(adapter, ckpt))
        catalog.write_sums(out)
        return out
    if not isinstance(adapter, HFCausalLMAdapter):
        raise LmlabError(f"{ckpt['path']} holds a {type(adapter).__name__}, which export does "
                         "not know; it exports from-scratch models and imported ones.")
    name = adapter.meta.get("model_name")
    if name:
        folder = catalog.models_root(root) / name
        if folder.is_dir():
            adapter._tokenizer_folder = folder
    tok = adapter.tokenizer
    out.mkdir(parents=True, exist_ok=True)
    adapter_only = is_lora(adapter.meta) and not merge
    if adapter_only:
        adapter.lora.peft_model.save_pretrained(str(out))
    else:
        merged_model(adapter).save_pretrained(str(out))
    tok.save(out)
    atomic_write_text(out / "README.md", model_card(adapter.meta, ckpt, root, adapter_only))
    catalog.write_sums(out)  # checked when the folder is imported again
    return out
