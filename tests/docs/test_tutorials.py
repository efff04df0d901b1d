"""Every tutorial's code blocks run, in order, on tiny settings: the docs cannot rot.

A page's fenced blocks are run top to bottom in a fresh folder:
- ```python title="PATH"``` and ```yaml title="PATH"``` blocks are written to PATH;
- other ```python blocks run in one namespace per page (in this process);
- ```bash blocks run with bash -euo pipefail, `lmlab` being this checkout's main.py;
- a block after `<!-- no-run -->` is shown, not run (e.g. a server);
- `<!-- tiny: "OLD" -> "NEW" -->` (JSON strings) replaces OLD in the page's blocks (it
  must occur), so the page shows real settings and the test runs seconds-long ones.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = ROOT / "docs" / "tutorials"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```\s*$", re.M | re.S)
TINY = re.compile(r'<!-- tiny: ("(?:[^"\\]|\\.)*") -> ("(?:[^"\\]|\\.)*") -->')


def blocks(text: str) -> list[tuple[str, str | None, str, int]]:
    """(language, title or None, code, line) of each block to run, tiny replacements made."""
    subs = [(json.loads(a), json.loads(b)) for a, b in TINY.findall(text)]
    out = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip()
        if before.endswith("<!-- no-run -->"):
            continue
        lang, info, code = m.group(1), m.group(2), m.group(3)
        title = re.search(r'title="([^"]+)"', info)
        for old, new in subs:
            code = code.replace(old, new)
        out.append((lang, title.group(1) if title else None, code,
                    text[:m.start()].count("\n") + 1))
    for old, _ in subs:
        assert any(old in m.group(3) for m in FENCE.finditer(text)), f"tiny: {old!r} occurs nowhere"
    return out


def shim(folder: Path) -> dict[str, str]:
    """An environment whose `lmlab` is this checkout's CLI and `python` this interpreter."""
    folder.mkdir()
    for name, command in (("lmlab", f'"{sys.executable}" "{ROOT / "main.py"}"'),
                          ("python", f'"{sys.executable}"')):
        exe = folder / name
        exe.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def run_page(page: Path, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = shim(work / ".bin")
    monkeypatch.chdir(work)
    namespace: dict = {"__name__": "__tutorial__"}
    for lang, title, code, line in blocks(page.read_text()):
        where = f"{page.name}:{line}"
        if title:
            (work / title).parent.mkdir(parents=True, exist_ok=True)
            (work / title).write_text(code)
        elif lang == "python":
            exec(compile(code, where, "exec"), namespace)  # noqa: S102 - the docs' own code
        elif lang == "bash":
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=work, env=env,
                               capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, f"{where} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"


def test_blocks_follow_the_conventions() -> None:
    text = ('<!-- tiny: "60" -> "6" -->\n```python title="a.py"\nx = 60\n```\n'
            '<!-- no-run -->\n```bash\nserve\n```\n```bash\necho 60\n```\n')
    assert blocks(text) == [("python", "a.py", "x = 6\n", 2), ("bash", None, "echo 6\n", 9)]
    with pytest.raises(AssertionError, match="occurs nowhere"):
        blocks('<!-- tiny: "x" -> "y" -->\n```bash\necho\n```\n')


@pytest.mark.slow
@pytest.mark.parametrize("page", sorted(p.name for p in TUTORIALS.glob("*.md")))
def test_tutorial_runs(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                       one_thread) -> None:
    run_page(TUTORIALS / page, tmp_path, monkeypatch)
