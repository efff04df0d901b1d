"""The ASCII policy: what is kept, what each unknown-character rule does, and the reports."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lmlab.data import normalize
from lmlab.data.normalize import merge_reports, normalise
from lmlab.errors import LmlabError


def norm(raw: bytes | str, **kw) -> tuple[bytes, dict]:
    if isinstance(raw, str):
        raw = raw.encode("utf-8")
    out, report = normalise(raw, **kw)
    assert out.dtype == np.uint8
    return out.tobytes(), report


def reference(raw: bytes, unknown: str, rep: str = "?") -> bytes:
    """A slow, obvious version of the policy to check the vectorised one against."""
    out, i, n = [], 0, len(raw)
    while i < n:
        b = raw[i]
        if b == 13:
            out.append(10)
            i += 2 if i + 1 < n and raw[i + 1] == 10 else 1
            continue
        if b in (9, 10) or 32 <= b <= 126:
            out.append(b)
            i += 1
            continue
        j = i + 1  # one unknown character: this byte and the continuation bytes after it
        while b >= 0x80 and j < n and 0x80 <= raw[j] <= 0xBF:
            j += 1
        if unknown == "replace":
            out.append(ord(rep))
        i = j
    return bytes(out)


def test_clean_ascii_is_returned_unchanged_without_copy():
    raw = b"Hello, world!\n\tIndented ~ line.\n"
    out, report = normalise(raw)
    assert out.tobytes() == raw
    assert not out.flags.writeable  # the fast path is a view of the input
    assert report["unknown"] == report["crlf"] == report["cr"] == 0
    assert report["policy"] == "replace" and report["top_unknown"] == []


def test_empty_input():
    assert norm(b"") == (b"", norm(b"")[1])
    assert norm(b"")[0] == b""


def test_crlf_and_lone_cr_become_lf():
    out, report = norm(b"one\r\ntwo\rthree\r\n\r\rfour\r")
    assert out == b"one\ntwo\nthree\n\n\nfour\n"
    assert report["crlf"] == 2 and report["cr"] == 4
    assert report["unknown"] == 0


def test_multibyte_character_is_replaced_once():
    out, report = norm("café ☕ 😀 naïve")
    assert out == b"caf? ? ? na?ve"
    assert report["replaced"] == report["unknown"] == 4 and report["dropped"] == 0


def test_drop_removes_whole_characters():
    out, report = norm("café — 😀!", unknown="drop")
    assert out == b"caf  !"
    assert report["dropped"] == 3 and report["replaced"] == 0


def test_custom_replacement():
    assert norm("a—b", replacement=" ")[0] == b"a b"


def test_control_characters_are_unknown_but_tab_and_newline_are_kept():
    out, report = norm(b"a\x00b\x07c\x7fd\te\nf\x0c")
    assert out == b"a?b?c?d\te\nf?"
    assert report["unknown"] == 4


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"\x80abc", b"ab\xe2\x80", b"\xc3", b"\xe9t\xe9",
                                 b"\xc3\xa9\xa9\xa9", b"\xf0\x9f\x98"])
def test_invalid_utf8_never_crashes(raw):
    for rule in ("replace", "drop"):
        out, report = norm(raw, unknown=rule)
        assert out == reference(raw, rule)
        assert all(b in (9, 10) or 32 <= b <= 126 for b in out)
    with pytest.raises(LmlabError):
        normalise(raw, unknown="error")


def test_latin1_bytes_count_as_one_unknown_each():
    out, report = norm(b"caf\xe9 cr\xe8me", unknown="replace")
    assert out == b"caf? cr?me" and report["unknown"] == 2
    assert report["top_unknown"][0]["code"] in ("0xE9", "0xE8")


def test_top_unknown_counts_most_common_first_at_most_ten():
    text = "—" * 5 + "é" * 3 + "😀" + "".join(chr(0x100 + i) for i in range(12))
    _, report = norm(text)
    top = report["top_unknown"]
    assert len(top) == 10
    assert top[0] == {"char": "—", "code": "U+2014", "count": 5}
    assert top[1] == {"char": "é", "code": "U+00E9", "count": 3}
    assert report["unknown"] == 5 + 3 + 1 + 12


def test_error_names_character_line_column_source_and_fix():
    raw = "first line\r\nsecond café\n".encode()
    with pytest.raises(LmlabError) as e:
        normalise(raw, unknown="error", source="notes.txt")
    msg = str(e.value)
    assert "'é'" in msg and "U+00E9" in msg
    assert "line 2, column 11" in msg and "notes.txt" in msg
    assert "--unknown replace" in msg and "drop" in msg


def test_error_position_counts_lone_cr_as_line_break():
    raw = b"a\rb\rxy\x00"
    with pytest.raises(LmlabError, match=r"line 3, column 3"):
        normalise(raw, unknown="error")


def test_error_rule_accepts_clean_text_and_still_fixes_newlines():
    assert norm(b"ok\r\nfine\r", unknown="error")[0] == b"ok\nfine\n"


def test_bad_rule_and_bad_replacement():
    with pytest.raises(LmlabError, match="replace.*drop.*error"):
        normalise(b"x", unknown="ignore")
    for rep in ("", "??", "é", "\x00"):
        with pytest.raises(LmlabError, match="replacement"):
            normalise(b"x", replacement=rep)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
def test_matches_reference_on_random_bytes(monkeypatch, chunk):
    """Random mixes of ASCII, CR/LF, controls, valid and broken UTF-8, across chunk borders."""
    monkeypatch.setattr(normalize, "CHUNK", chunk)
    rng = random.Random(chunk)
    pieces = [b"a", b"Z", b" ", b"\n", b"\r", b"\r\n", b"\t", b"\x00", b"\x7f", b"\x80",
              b"\xbf", b"\xc3", b"\xe2\x80", "é".encode(), "—".encode(), "😀".encode(), b"\xff"]
    for _ in range(300):
        raw = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        for rule in ("replace", "drop"):
            out, report = norm(raw, unknown=rule)
            assert out == reference(raw, rule), raw
            assert report["crlf"] == raw.count(b"\r\n")


def test_large_input_is_vectorised(benchmark_size=4_000_000):
    """4 MB through the slow path: would take seconds with a per-character loop."""
    unit = "Plain words and a café, then —dashes— and CRLF.\r\n".encode()
    raw = unit * (benchmark_size // len(unit))
    out, report = normalise(raw)
    lines = raw.count(b"\n")
    assert report["crlf"] == lines and report["unknown"] == 3 * lines
    assert out.size == len(raw) - lines * (1 + 1 + 2 + 2)  # CR; é 1 byte; each — 2 bytes


def test_merge_reports_sums_and_reranks():
    _, a = norm("é\r\n")
    _, b = norm("—— é é")
    total = merge_reports([a, b])
    assert total["unknown"] == 5 and total["replaced"] == 5 and total["crlf"] == 1
    assert total["top_unknown"][0] == {"char": "é", "code": "U+00E9", "count": 3}
    assert merge_reports([]) == {}
