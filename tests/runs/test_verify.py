"""`lmlab runs verify` and `runs rebuild-tb`: every record a conclusion rests on is checked.

A real tiny run is trained once; each case damages a copy of it the way a disk,
a copy or an editor would, and checks that verify names the file (and line)
and exits 2, that readers skip only what is damaged, and that older records
without checksums are still read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.records import CRC, metrics_line, read_manifest, read_metrics
from lmlab.runs.verify import tb_scalars
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(corpus_dir, tmp_path_factory) -> Path:
    from lmlab.train.loop import Trainer

    cfg = tiny_config(corpus_dir, tmp_path_factory.mktemp("verify") / "runs")
    return Trainer(cfg, progress=False).run()


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the trained run (under its own name, as a copied run folder keeps it)."""
    return Path(shutil.copytree(trained, tmp_path / trained.name))


def verify(capsys, run: Path) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["runs", "verify", str(run)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def test_an_intact_run_verifies_every_file(run, capsys):
    rc, out, _ = verify(capsys, run)
    assert rc == 0, out
    assert "ok       manifest.json  manifest_sha256 " in out
    assert "ok       metrics.jsonl  " in out and "0 without: older lmlab" in out
    assert "ok       ckpt_0000004.pt  step 4  sha256 " in out
    assert "ok       tb/  agrees with metrics.jsonl (" in out


def test_a_flipped_digit_in_metrics_is_named_by_line_and_skipped(run, capsys):
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    n = max(i for i, line in enumerate(lines, 1) if '"kind": "eval"' in line)
    line = lines[n - 1]
    at = line.index('"val_loss": ') + len('"val_loss": ') + 2  # the first decimal digit
    lines[n - 1] = line[:at] + str((int(line[at]) + 1) % 10) + line[at + 1:]
    assert metrics_line(json.loads(lines[0]))[:-1] == lines[0]  # a record rewrites as read
    old = json.loads(lines[1])
    del old[CRC]
    lines[1] = json.dumps(old)  # a line written before checksums: still read
    path.write_text("\n".join(lines) + "\n")
    rc, out, err = verify(capsys, run)
    assert rc == 2 and f"DAMAGED  {path}:{n}: its crc32 does not match" in out
    assert f"is damaged: metrics.jsonl line {n}." in err
    assert "1 without: older lmlab), 1 damaged" in out
    records = read_metrics(run)
    assert len(records) == len(lines) - 1 and old in [{k: v for k, v in r.items() if k != CRC}
                                                      for r in records]
    assert f"skipped line {n} of {path}" in capsys.readouterr().err


def test_a_changed_manifest_is_refused_everywhere(run, capsys):
    path = run / "manifest.json"
    path.write_text(path.read_text().replace('"seed": 7', '"seed": 8'))
    rc, out, err = verify(capsys, run)
    assert rc == 2 and "DAMAGED  manifest.json: " in out
    assert "no longer matches its recorded manifest_sha256" in err
    with pytest.raises(LmlabError, match="no longer matches its recorded manifest_sha256"):
        read_manifest(run)


def test_a_checkpoint_copied_over_another_name_is_caught(run, capsys):
    ckpts = run / "checkpoints"
    shutil.copy(ckpts / "ckpt_0000004.pt", ckpts / "ckpt_0000008.pt")
    rc, out, err = verify(capsys, run)
    assert rc == 2 and "ok       ckpt_0000004.pt" in out
    assert (f"DAMAGED  ckpt_0000008.pt: it holds step 4 of run {run.name}, but its name says "
            f"step 8 of run {run.name}") in out
    assert "the last good one is" in err and "ckpt_0000004.pt" in err


def test_a_checkpoint_of_another_run_is_caught(run, trained, tmp_path, capsys):
    m = read_manifest(run)
    from lmlab.records import write_manifest

    write_manifest(run / "manifest.json", {**m, "run_id": "another"})
    rc, out, _ = verify(capsys, run)
    assert rc == 2 and f"holds step 4 of run {trained.name}, but its name says step 4 of run " \
        "another" in out


def test_damaged_event_files_are_found_and_rebuilt_from_metrics(run, capsys):
    (event,) = (run / "tb").iterdir()
    data = bytearray(event.read_bytes())
    data[len(data) // 2] ^= 0xFF
    event.write_bytes(bytes(data))
    rc, out, err = verify(capsys, run)
    assert rc == 2 and "DIFFERS  tb/ disagrees with metrics.jsonl: " in out
    assert f"`lmlab runs rebuild-tb {run}`" in err
    assert main(["runs", "rebuild-tb", str(run)]) == 0
    assert "Rewrote" in capsys.readouterr().out
    rc, out, _ = verify(capsys, run)
    assert rc == 0 and "ok       tb/  agrees" in out
    want = {(f"eval/{k}", r["step"]) for r in read_metrics(run) if r["kind"] == "eval"
            for k in ("val_loss",)}
    assert want <= set(tb_scalars(run))
