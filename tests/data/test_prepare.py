"""prepare() writes a corpus that load_prepared() reads back; failures leave nothing half-done."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from lmlab.data import prepare as prepare_mod
from lmlab.data.dataset import PreparedData, load_prepared
from lmlab.data.prepare import MIN_TOKENS, prepare, token_dtype
from lmlab.data.tokenizer import CharTokenizer
from lmlab.errors import LmlabError

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(100))


def write(path: Path, text: str | bytes) -> str:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


def decode(ids: np.ndarray) -> str:
    return CharTokenizer().decode(ids.tolist())


def folder_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_writes_three_files_that_round_trip(tmp_path):
    src = write(tmp_path / "corpus.txt", TEXT)
    out = tmp_path / "out"
    meta = prepare([src], out)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert json.loads((out / "meta.json").read_text()) == meta

    data = load_prepared(out)
    assert isinstance(data, PreparedData) and isinstance(data.train, np.memmap)
    assert data.train.dtype == np.uint8 and data.meta == meta
    assert decode(data.train) + decode(data.val) == TEXT
    assert len(data.val) == round(len(TEXT) * 0.1)


def test_meta_fields(tmp_path):
    src = write(tmp_path / "corpus.txt", TEXT.replace("fox", "fox—") + "\r\n")
    meta = prepare([src], tmp_path / "out", val_fraction=0.2)
    assert meta["format"] == "lmlab-data" and meta["version"] == 1
    assert meta["tokenizer"] == CharTokenizer().spec()
    assert meta["vocab_size"] == 97 and meta["dtype"] == "uint8"
    assert meta["train_tokens"] == meta["train_chars"] and meta["val_tokens"] == meta["val_chars"]
    assert meta["train_tokens"] + meta["val_tokens"] == len(TEXT) + 100 + 1  # each — is one '?'
    assert meta["val_fraction"] == 0.2
    raw = Path(src).read_bytes()
    assert meta["sources"] == [
        {"name": src, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}]
    norm = meta["normalisation"]
    assert norm["policy"] == "replace" and norm["replaced"] == 100 and norm["crlf"] == 1
    assert norm["top_unknown"] == [{"char": "—", "code": "U+2014", "count": 100}]
    out = tmp_path / "out"
    both = (out / "train.bin").read_bytes() + (out / "val.bin").read_bytes()
    assert meta["data_hash"] == hashlib.sha256(both).hexdigest()[:16]


def test_every_document_feeds_both_splits(tmp_path):
    a = write(tmp_path / "a.txt", "a" * 3000)
    b = write(tmp_path / "b.txt", "b" * 3000)
    meta = prepare([a, b], tmp_path / "out")
    data = load_prepared(tmp_path / "out")
    assert decode(data.train) == "a" * 2700 + "\n" + "b" * 2700
    assert decode(data.val) == "a" * 300 + "\n" + "b" * 300
    assert meta["train_tokens"] + meta["val_tokens"] == 6000 + 2  # one separator per split


def test_same_input_same_hash_and_rewrite_replaces(tmp_path):
    src = write(tmp_path / "corpus.txt", TEXT)
    first = prepare([src], tmp_path / "out")
    second = prepare([src], tmp_path / "out")
    assert first["data_hash"] == second["data_hash"]
    write(tmp_path / "corpus.txt", TEXT.upper())
    third = prepare([src], tmp_path / "out")
    assert third["data_hash"] != first["data_hash"]
    assert decode(load_prepared(tmp_path / "out").train).startswith("LINE 0")
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_unknown_rules_pass_through(tmp_path):
    src = write(tmp_path / "corpus.txt", TEXT + "café\n")
    assert prepare([src], tmp_path / "r")["normalisation"]["replaced"] == 1
    dropped = prepare([src], tmp_path / "d", unknown="drop")
    assert dropped["normalisation"]["dropped"] == 1
    assert decode(load_prepared(tmp_path / "d").val).endswith("caf\n")
    with pytest.raises(LmlabError, match="corpus.txt, line 101, column 4"):
        prepare([src], tmp_path / "e", unknown="error")
    assert not (tmp_path / "e").exists()


def test_too_short_corpus_leaves_existing_output_unchanged(tmp_path):
    out = tmp_path / "out"
    prepare([write(tmp_path / "good.txt", TEXT)], out)
    before = folder_state(out)
    short = write(tmp_path / "short.txt", "x" * 1000)  # val gets 100 tokens
    with pytest.raises(LmlabError) as e:
        prepare([short], out)
    assert "val split has 100 tokens" in str(e.value) and str(MIN_TOKENS) in str(e.value)
    assert folder_state(out) == before


def test_too_short_train(tmp_path):
    with pytest.raises(LmlabError, match=r"train split has 200 tokens.*257"):
        prepare([write(tmp_path / "s.txt", "x" * 400)], tmp_path / "out", val_fraction=0.5)
    assert not (tmp_path / "out").exists()


def test_failed_write_leaves_existing_output_unchanged(tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare([write(tmp_path / "good.txt", TEXT)], out)
    before = folder_state(out)

    def broken_fsync(f):
        f.close()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepare_mod, "_fsync_and_close", broken_fsync)
    with pytest.raises(OSError):
        prepare([write(tmp_path / "other.txt", TEXT.upper())], out)
    assert folder_state(out) == before  # and no temp files left behind
    with pytest.raises(OSError):
        prepare([write(tmp_path / "other.txt", TEXT.upper())], tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_bad_arguments(tmp_path):
    src = write(tmp_path / "corpus.txt", TEXT)
    for vf in (0, 1, -0.1, 1.5):
        with pytest.raises(LmlabError, match="val_fraction"):
            prepare([src], tmp_path / "out", val_fraction=vf)
    with pytest.raises(LmlabError, match="--unknown"):
        prepare([src], tmp_path / "out", unknown="skip")
    write(tmp_path / "file", "x")
    with pytest.raises(LmlabError, match="not a folder"):
        prepare([src], tmp_path / "file")


def test_default_source_is_shakespeare(tmp_path):
    meta = prepare([], tmp_path / "out")
    assert len(meta["sources"]) == 38 and meta["normalisation"]["unknown"] == 0
    assert meta["train_tokens"] > 4_000_000
    hamlet = CharTokenizer().encode_bytes(np.frombuffer(b"\nHAMLET:\n", dtype=np.uint8))
    assert hamlet.tobytes() in load_prepared(tmp_path / "out").train.tobytes()


class FakeNativeTokenizer:
    """A byte-level tokenizer with 300 ids, standing in for a model's own tokenizer."""

    vocab_size = 300

    def encode(self, text: str) -> list[int]:
        return [b + 44 for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 44 for i in ids).decode("utf-8")

    def spec(self) -> dict:
        return {"kind": "hf", "model_name": "fake"}


def test_native_tokenizer_skips_ascii_policy(tmp_path):
    text = "naïve café\r\n" * 300
    src = write(tmp_path / "c.txt", text.encode() + b"\xff")  # invalid UTF-8 at the end
    meta = prepare([src], tmp_path / "out", tokenizer=FakeNativeTokenizer())
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == {"kind": "hf", "model_name": "fake"}
    # CRLF -> LF, and the invalid byte decodes to one U+FFFD
    assert meta["train_chars"] + meta["val_chars"] == len(text) - 300 + 1
    assert meta["normalisation"]["crlf"] == 300
    data = load_prepared(tmp_path / "out")
    assert data.train.dtype == np.uint16
    tok = FakeNativeTokenizer()
    assert (tok.decode(data.train.tolist()) + tok.decode(data.val.tolist())).startswith(
        "naïve café\nnaïve")
    assert meta["train_tokens"] > meta["train_chars"]  # ï and é are two bytes each


class FakeBatchTokenizer(FakeNativeTokenizer):
    def __init__(self) -> None:
        self.batches: list[int] = []

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.batches.append(len(texts))
        return [self.encode(t) for t in texts]


def test_native_tokenizer_gets_long_text_in_newline_pieces(tmp_path, monkeypatch):
    tok = FakeBatchTokenizer()
    monkeypatch.setattr(prepare_mod, "NATIVE_PIECE_CHARS", 1000)
    text = "".join(f"line {i} é\n" for i in range(3000))
    meta = prepare([write(tmp_path / "c.txt", text)], tmp_path / "out", tokenizer=tok)
    assert tok.batches[0] > 10  # train went in many pieces, in one batch call
    data = load_prepared(tmp_path / "out")
    assert tok.decode(data.train.tolist()) + tok.decode(data.val.tolist()) == text
    assert meta["train_tokens"] + meta["val_tokens"] == len(text.encode())


def test_token_dtype():
    assert token_dtype(97) is np.uint8 and token_dtype(256) is np.uint8
    assert token_dtype(257) is np.uint16 and token_dtype(65536) is np.uint16
    assert token_dtype(65537) is np.uint32 and token_dtype(151_936) is np.uint32


# --- load_prepared refuses what is not a whole corpus --------------------------------


@pytest.fixture
def corpus(tmp_path) -> Path:
    prepare([write(tmp_path / "c.txt", TEXT)], tmp_path / "out")
    return tmp_path / "out"


def assert_refused(path: Path, match: str) -> None:
    with pytest.raises(LmlabError, match=match) as e:
        load_prepared(path)
    assert f"lmlab prepare --out {path}" in str(e.value)


def test_load_missing_folder(tmp_path):
    assert_refused(tmp_path / "nothing", "does not exist")


def test_load_missing_meta(corpus):
    os.remove(corpus / "meta.json")
    assert_refused(corpus, "no meta.json")


def test_load_meta_from_another_program(corpus):
    (corpus / "meta.json").write_text(json.dumps({"vocab_size": 65, "itos": {}}))
    assert_refused(corpus, "not written by lmlab")
    (corpus / "meta.json").write_text("{not json")
    assert_refused(corpus, "cannot be read")


def test_load_other_version(corpus):
    meta = json.loads((corpus / "meta.json").read_text())
    (corpus / "meta.json").write_text(json.dumps(meta | {"version": 2}))
    assert_refused(corpus, "version 2")


def test_load_wrong_size(corpus):
    with open(corpus / "val.bin", "ab") as f:
        f.write(b"\x00")
    assert_refused(corpus, "damaged or half-written")


def test_load_missing_bin(corpus):
    os.remove(corpus / "train.bin")
    assert_refused(corpus, "train.bin is missing")
