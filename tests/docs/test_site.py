"""The docs site's own settings fail a build on a broken link, naming the page and the link."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def build(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build"], cwd=folder,
                          capture_output=True, text=True, timeout=120,
                          env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})


def test_a_broken_link_fails_the_strict_build_naming_it(tmp_path: Path) -> None:
    ours = yaml.safe_load((ROOT / "mkdocs.yml").read_text())  # plain YAML: no !tags in it
    assert ours["strict"] is True
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# Home\n\nSee [the guide](guide.md).\n")
    site = {"site_name": "t", "strict": True, "validation": ours["validation"],
            "markdown_extensions": ours["markdown_extensions"]}
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(site))
    r = build(tmp_path)
    assert r.returncode == 1 and "Aborted with 1 warnings in strict mode" in r.stdout
    assert "Doc file 'index.md' contains a link 'guide.md', but the target is not found" in r.stderr
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n")
    r = build(tmp_path)
    assert r.returncode == 0, r.stderr
