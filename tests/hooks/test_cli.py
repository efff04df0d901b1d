"""`lmlab hooks list` works from a config alone, with no prepared data."""

from __future__ import annotations

import argparse

from lmlab.cli.hooks import add_commands


def run_cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="lmlab")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_hooks_list_default_config(capsys):
    run_cli(["hooks", "list"])
    out = capsys.readouterr().out
    assert "88 hook points; blocks.{i} for i = 0..3" in out  # default: speedrun, 4 layers
    lines = out.splitlines()
    q = next(line for line in lines if "blocks.{i}.attn.hook_q " in line)
    assert "[batch, pos, head, d_head]" in q and "TL: same name" in q
    ln = next(line for line in lines if "ln_final.hook_normalized" in line)
    assert "[batch, pos, d_model]" in ln and "TL: same name" in ln
    logits = next(line for line in lines if "hook_logits " in line)
    assert "TL: hook_unembed (TransformerBridge only; HookedTransformer had none)" in logits
    for text in ("blocks.{i}.attn.hook_pattern", "hook_logits", "forward hooks",
                 "scale(factor=1.0)", "feedback_alignment(seed=0, std=0.02)",
                 "orthogonalise(method='newton_schulz', steps=5)", "z_loss() [at hook_logits]"):
        assert text in out, text


def test_hooks_list_with_config_and_plugin_needs_no_data(tmp_path, capsys):
    plugin = tmp_path / "rules.py"
    plugin.write_text("from lmlab.hooks.registry import register\n\n"
                      "@register('update')\ndef cli_halve(named_params, *, step, lr, k: int = 2):\n"
                      "    '''Halve the gradients.'''\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{path: {tmp_path}/nowhere, block_size: 8}}\n"
                   "model: {n_layer: 2, n_head: 2, d_model: 16, d_ff: 32}\n"
                   f"hooks: {{plugins: [{plugin}]}}\n")
    run_cli(["hooks", "list", "--config", str(cfg)])
    out = capsys.readouterr().out
    assert "blocks.{i} for i = 0..1" in out
    assert f"cli_halve(k=2) [from {plugin.resolve()}]" in out and "Halve the gradients." in out
