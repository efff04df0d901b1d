"""The CLI end to end, and every bad input of the core issue: a clear one-paragraph
error, a non-zero exit, no traceback, and nothing on disk damaged."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmlab.cli import build_parser, main
from lmlab.config import dump_yaml

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("lmlab: error: ") and "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def _commands(parser: argparse.ArgumentParser, path: str = "lmlab"
              ) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every command and subcommand (`lmlab runs show`...), with its parser."""
    out = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _commands(sub, f"{path} {name}")
    return out


def _squeeze(text: str) -> str:
    """Text without whitespace: argparse rewraps lines (and breaks them at hyphens)."""
    return "".join(text.split())


def test_every_command_explains_itself():
    """Each --help says what the command does and what each of its options and arguments means."""
    commands = dict(_commands(build_parser()))
    assert {"lmlab prepare", "lmlab train", "lmlab eval", "lmlab sample", "lmlab runs list",
            "lmlab export", "lmlab hooks list"} <= set(commands)
    for path, p in commands.items():
        text = _squeeze(p.format_help())
        assert p.description and _squeeze(p.description) in text, path
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):  # each choice says what it does
                for choice in action._choices_actions:
                    assert choice.help and _squeeze(choice.help) in text, (path, choice)
                continue
            assert action.help, (path, action.option_strings or action.dest)
            assert all(flag in text for flag in action.option_strings), path
            assert _squeeze(action.help.replace("%%", "%")) in text, (path, action.help)
    help_text = subprocess.run([sys.executable, str(ROOT / "main.py"), "train", "--help"],
                               capture_output=True, text=True, timeout=60).stdout
    assert "--resume" in help_text and "--set" in help_text


@pytest.mark.slow
def test_prepare_train_eval_sample_runs_end_to_end(capsys, tmp_path, monkeypatch):
    from tests.conftest import play_text

    monkeypatch.chdir(tmp_path)
    (tmp_path / "play.txt").write_text(play_text(30_000))
    code, out, _ = run_cli(capsys, "prepare", "play.txt", "--out", "data/play")
    assert code == 0 and "train" in out and "data hash" in out
    code, out, err = run_cli(
        capsys, "train", "--quiet", "--set", "data.path=data/play", "--set", "train.max_steps=6",
        "--set", "train.eval_every=3", "--set", "data.block_size=32", "--set", "model.d_model=32",
        "--set", "model.n_layer=1", "--set", "train.eval_batches=2", "--set", "train.device=cpu")
    assert code == 0, err
    run = next((tmp_path / "runs").iterdir())
    assert run.name in out
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", str(run), "--json")
    assert code == 0 and '"val_bpc"' in out
    code, out, _ = run_cli(capsys, "sample", "--checkpoint", str(run), "--prompt", "KING:",
                           "--max-new-tokens", "40", "--seed", "1", "--top-k", "5")
    assert code == 0 and out.startswith("KING:") and len(out) >= 45
    code, again, _ = run_cli(capsys, "sample", "--checkpoint", str(run), "--prompt", "KING:",
                             "--max-new-tokens", "40", "--seed", "1", "--top-k", "5")
    assert again == out
    code, out, _ = run_cli(capsys, "runs", "list")
    assert code == 0 and run.name in out and "finished" in out
    code, out, _ = run_cli(capsys, "runs", "show", run.name)
    assert code == 0 and "config_hash" in out


# --- bad input ---------------------------------------------------------------------


def test_missing_and_empty_sources(capsys, tmp_path):
    code, _, err = run_cli(capsys, "prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path))
    assert_user_error(code, err, "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    code, _, err = run_cli(capsys, "prepare", str(tmp_path / "empty.txt"), "--out",
                           str(tmp_path / "o"))
    assert_user_error(code, err, "empty")


def test_corpus_shorter_than_a_window_leaves_existing_data_intact(capsys, tmp_path, corpus_dir):
    out = tmp_path / "data"
    out.mkdir()
    for f in corpus_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    (tmp_path / "short.txt").write_text("To be or not to be.\n" * 5)
    code, _, err = run_cli(capsys, "prepare", str(tmp_path / "short.txt"), "--out", str(out))
    assert_user_error(code, err, "257")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_folder_without_text_files(capsys, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "image.png").write_bytes(b"\x89PNG")
    code, _, err = run_cli(capsys, "prepare", str(tmp_path / "src"), "--out", str(tmp_path / "o"))
    assert_user_error(code, err, ".txt")


def test_unreachable_url_fails_within_seconds(capsys, tmp_path):
    with socket.socket() as s:  # a port on this machine that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    code, _, err = run_cli(capsys, "prepare", f"http://127.0.0.1:{port}/corpus.txt", "--out",
                           str(tmp_path / "o"))
    assert_user_error(code, err, f"127.0.0.1:{port}")
    assert time.time() - t0 < 10


def test_unknown_characters_under_error_policy(capsys, tmp_path):
    (tmp_path / "t.txt").write_text("plain text\nthen caf\u00e9\n" * 400)
    code, _, err = run_cli(capsys, "prepare", str(tmp_path / "t.txt"), "--out",
                           str(tmp_path / "o"), "--unknown", "error")
    assert_user_error(code, err, "--unknown replace")
    assert not (tmp_path / "o" / "train.bin").exists()


def test_config_key_that_does_not_exist_and_wrong_type(capsys, corpus_dir):
    code, _, err = run_cli(capsys, "train", "--set", "train.learning_rate=0.1")
    assert_user_error(code, err, "train.learning_rate", "Valid keys", "lr")
    code, _, err = run_cli(capsys, "train", "--set", "train.max_steps=many")
    assert_user_error(code, err, "train.max_steps", "int")
    code, _, err = run_cli(capsys, "train", "--set", f"data.path={corpus_dir.parent / 'none'}")
    assert_user_error(code, err, "lmlab prepare")


def test_missing_truncated_and_foreign_checkpoints(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(tmp_path / "none.pt"))
    assert_user_error(code, err, "does not exist")
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 50)
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(tmp_path / "trunc.pt"))
    assert_user_error(code, err, "truncated, corrupt")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    code, _, err = run_cli(capsys, "train", "--resume", str(tmp_path / "foreign.pt"))
    assert_user_error(code, err, "not an lmlab checkpoint")


def test_resume_with_different_config_and_bad_prompt(capsys, make_config, tmp_path):
    from lmlab.train.loop import train

    cfg = make_config(train={"max_steps": 2, "eval_every": 2})
    run = train(cfg, progress=False)
    (tmp_path / "other.yaml").write_text(dump_yaml(cfg).replace("seed: 7", "seed: 9"))
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--config",
                           str(tmp_path / "other.yaml"))
    assert_user_error(code, err, "Refusing to resume", "run.seed: 7 -> 9",
                      "--allow-config-change")
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(run), "--prompt", "na\u00efve")
    assert_user_error(code, err, "not in the vocabulary")
