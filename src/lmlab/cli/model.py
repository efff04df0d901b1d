"""The pretrained-model commands: `import-model`, `models list|show|lineage|register`, `export`.

`lmlab.cli` calls `add_commands(subparsers)`; the work is in lmlab.model (importer,
registry, export); each command's handler raises
LmlabError for a user's mistake, which the CLI prints as one paragraph.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

MODELS_DIR_HELP = ("the registry folder (default: $LMLAB_MODELS_DIR, else models/ in the "
                   "current directory)")


def _fmt_params(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def cmd_import_model(args: argparse.Namespace) -> None:
    from lmlab.model.importer import import_model

    e = import_model(args.model, name=args.name, root=args.models_dir,
                     trust_remote_code=args.trust_remote_code, license=args.license)
    print(f"Imported {args.model} as '{e['model_name']}': {e['architecture']} "
          f"({e['architecture_type']}), {_fmt_params(e['num_params'])} parameters, "
          f"{e['dtype']}, licence {e['license']}.")
    print(f"Fine-tune it with `model: {{model_name: {e['model_name']}}}` in a config "
          f"(see configs/qwen-finetune.yaml), after `python main.py prepare --tokenizer "
          f"{e['model_name']} --out data/<name>`.")


def _print_entry(e: dict[str, Any]) -> None:
    keys = ["model_name", "model_id", "architecture_type", "architecture", "source", "license",
            "fine_tuned_from", "num_params", "dtype", "weights_sha256", "created_at",
            "updated_at"]
    for k in keys + sorted(set(e) - set(keys)):
        print(f"{k:>16}: {e.get(k)}")


def cmd_models(args: argparse.Namespace) -> None:
    from lmlab.model import catalog

    action = args.models_command
    root = args.models_dir
    if action == "list":
        entries = catalog.list_entries(root)
        if not entries:
            print(f"No models registered in {catalog.models_root(root)}. Import one with "
                  "`python main.py import-model HUB_ID|FOLDER|FILE.gguf`.")
            return
        print(f"{'NAME':<28} {'ARCH':<8} {'PARAMS':>8} {'DTYPE':<9} {'SOURCE':<10} "
              f"{'FINE-TUNED FROM':<24} MODEL ID")
        for e in entries:
            print(f"{e['model_name']:<28} {str(e.get('architecture_type')):<8} "
                  f"{_fmt_params(e.get('num_params')):>8} {str(e.get('dtype')):<9} "
                  f"{str(e.get('source')):<10} {str(e.get('fine_tuned_from') or '-'):<24} "
                  f"{e.get('model_id')}")
    elif action == "show":
        e = catalog.resolve(args.name, root)
        if args.json:
            print(json.dumps(e, indent=2))
        else:
            _print_entry(e)
    elif action == "lineage":
        chain = catalog.lineage(args.name, root)
        for depth, e in enumerate(chain):
            arrow = "  " * depth + ("└─ " if depth else "")
            what = ("(not in the registry any more)" if e.get("missing")
                    else f"{e.get('source')}: {e.get('model_id')}")
            print(f"{arrow}{e['model_name']}  {what}")
    elif action == "verify":
        e = catalog.resolve(args.name, root)
        digest = catalog.verify_weights(e)
        note = "" if e.get("weights_sha256") else " (the registry has no hash to compare with)"
        print(f"ok: {e['model_name']} weights sha256 {digest}{note}")
    elif action == "register":
        from lmlab.model.importer import register_checkpoint

        e = register_checkpoint(args.checkpoint, args.name, root)
        ft = e.get("finetune") or {}
        how = f"LoRA r={ft.get('r')}, merged" if ft.get("method") == "lora" else "full"
        print(f"Registered {args.checkpoint} as '{e['model_name']}', fine-tuned ({how}) from "
              f"'{e['fine_tuned_from']}' ({_fmt_params(e['num_params'])} parameters).")


def cmd_export(args: argparse.Namespace) -> None:
    from lmlab.model.export import export_checkpoint

    if args.format == "gguf":
        from lmlab.model.export_gguf import export_gguf

        outtype = args.outtype or "f32"
        out = export_gguf(args.checkpoint, args.out, outtype=outtype, force=args.force,
                          root=args.models_dir)
        print(f"Exported {args.checkpoint} to {out} (GGUF, {outtype}): run it with "
              f"`llama-cli -m {out}`, load it with AutoModelForCausalLM.from_pretrained(DIR, "
              f"gguf_file='{out.name}'), or `lmlab import-model {out}`.")
        return
    if args.outtype:
        from lmlab.errors import LmlabError

        raise LmlabError("--outtype applies to --format gguf; a Hugging Face folder keeps the "
                         "checkpoint's dtype. Drop --outtype or add --format gguf.")
    out = export_checkpoint(args.checkpoint, args.out, force=args.force, root=args.models_dir,
                            merge=args.merge)
    if (out / "adapter_config.json").is_file():
        print(f"Exported the LoRA adapter of {args.checkpoint} to {out}: load it with "
              f"PeftModel.from_pretrained(base_model, '{out}'), or export with --merge for a "
              "whole model.")
        return
    print(f"Exported {args.checkpoint} to {out}: load it with "
          f"AutoModelForCausalLM.from_pretrained('{out}') and AutoTokenizer.from_pretrained"
          f"('{out}').")


def add_commands(sub: Any) -> None:
    """Add import-model, models and export to the CLI's subparsers."""
    s = sub.add_parser(
        "import-model", help="import a pretrained model (hub id, HF folder or .gguf)",
        description="Import a pretrained causal LM into the model registry "
        "(models/registry.json and models/<name>/) so a config can fine-tune it by name. "
        "MODEL is a Hugging Face hub id (e.g. Qwen/Qwen2.5-0.5B), a local Hugging Face "
        "folder (config.json, weights, tokenizer files) or a .gguf file. A hub id already "
        "in the local Hugging Face cache imports without network; offline and not cached it "
        "fails within seconds. Supported architectures: Qwen2/Qwen2.5, Qwen3, Llama.")
    s.add_argument("model", metavar="MODEL", help="hub id, model folder, or .gguf file")
    s.add_argument("--name", help="the model_name configs will use (default: derived from "
                   "MODEL, e.g. Qwen/Qwen2.5-0.5B -> qwen2.5-0.5b)")
    s.add_argument("--license", help="record this licence (default: read from the model card "
                   "or gguf metadata)")
    s.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model's own Python code to run when loading (off by "
                   "default; only for sources you trust)")
    s.add_argument("--models-dir", help=MODELS_DIR_HELP)
    s.set_defaults(func=cmd_import_model)

    s = sub.add_parser(
        "models", help="list, show, trace and register models",
        description="The model registry: what is imported or fine-tuned, and which model "
        "came from which.")
    s.add_argument("--models-dir", help=MODELS_DIR_HELP)
    ms = s.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    ms.add_parser("list", help="one line per registered model",
                  description="One line per registered model: name, architecture, size, "
                  "dtype, source, parent and source id.")
    m = ms.add_parser("show", help="every field of one model's entry",
                      description="Every field of one registry entry.")
    m.add_argument("name", metavar="NAME", help="a registered model_name")
    m.add_argument("--json", action="store_true", help="print the entry as JSON")
    m = ms.add_parser("lineage", help="the chain of fine_tuned_from back to the imported base",
                      description="Follow fine_tuned_from from NAME back to the imported "
                      "base model.")
    m.add_argument("name", metavar="NAME", help="a registered model_name")
    m = ms.add_parser("verify", help="check a model's weight files against the registry",
                      description="Hash the weight files of a registered model and compare "
                      "with the hash recorded at import; exit status 2 if they differ.")
    m.add_argument("name", metavar="NAME", help="a registered model_name")
    m = ms.add_parser("register", help="make a fine-tuned checkpoint a registry model",
                      description="Save a fine-tuned checkpoint's weights and tokenizer as "
                      "models/NAME/ and register it with fine_tuned_from set to the model it "
                      "was fine-tuned from, so it can be fine-tuned again by name.")
    m.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a checkpoint file, or a run folder (its latest checkpoint)")
    m.add_argument("--name", required=True, help="the new model_name")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser(
        "export", help="write a checkpoint as a Hugging Face folder or a GGUF file",
        description="Write a checkpoint as a Hugging Face folder (config.json, "
        "model.safetensors, tokenizer files, README.md model card) that AutoModelForCausalLM "
        "and AutoTokenizer load without lmlab. A fine-tune of an imported model keeps its "
        "architecture and names its base model; a from-scratch character model becomes GPT-2 "
        "(exact GELU, learned or sinusoidal positions; rotary is refused) with a "
        "character-level tokenizer of the same 97 ids. A LoRA fine-tune is written as a PEFT "
        "adapter folder (PeftModel.from_pretrained(base, DIR)) unless --merge is given. "
        "With --format gguf an imported Llama-family (SmolLM2, Llama) or Qwen2/Qwen3 model, "
        "full or LoRA (merged), becomes one GGUF file for llama.cpp and Ollama, with its "
        "tokenizer, chat template and lineage (base model, run, config hash).")
    s.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a checkpoint file, or a run folder (its latest checkpoint)")
    s.add_argument("--out", required=True, metavar="DIR|FILE.gguf",
                   help="the folder (or with --format gguf the file) to write")
    s.add_argument("--format", choices=["hf", "gguf"], default="hf",
                   help="hf: a Hugging Face folder (default); gguf: one GGUF file")
    s.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"],
                   help="GGUF weight type (default f32); 1-D tensors stay f32")
    s.add_argument("--force", action="store_true",
                   help="write into a non-empty folder, or replace an existing GGUF file")
    s.add_argument("--merge", action="store_true",
                   help="for a LoRA fine-tune: write the base with the LoRA updates merged in "
                   "(a whole model) instead of a PEFT adapter folder; a full fine-tune is "
                   "written as the model either way")
    s.add_argument("--models-dir", help=MODELS_DIR_HELP)
    s.set_defaults(func=cmd_export)
