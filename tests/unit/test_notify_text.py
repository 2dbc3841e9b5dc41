"""What notifications say (daemon/notify.py), and how exports are measured for them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from daemon.ledger import ExportRecord
from daemon.notify import exported_text, failed_text, rejected_text
from pipeline.context import Export


def test_exported_names_files_folder_and_duration() -> None:
    files = [Path("/srv/results/j1_mesh.glb"), Path("/srv/results/j1_mesh.ply")]
    title, body = exported_text("fountain", files, 185.9)
    assert title == "dropmesh: fountain is ready"
    assert body == "j1_mesh.glb, j1_mesh.ply\nin /srv/results\ntook 3 min 5 s"
    assert exported_text("p", files[:1], 7200).body.endswith("took 2 h 0 min")


def test_failed_and_rejected_say_why() -> None:
    assert failed_text("fountain", "mapping", "no model") == (
        "dropmesh: fountain failed",
        "stage mapping: no model",
    )
    assert rejected_text("a.toml", "quality: must be low, medium or high") == (
        "dropmesh: request a.toml rejected",
        "quality: must be low, medium or high",
    )


def test_an_export_is_measured_from_its_file_only_when_needed(tmp_path: Path) -> None:
    f = tmp_path / "m.obj"
    data = b"o mesh\n" * 1000
    f.write_bytes(data)
    got = ExportRecord(f, "obj").measured()
    assert (got.size, got.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    given = ExportRecord(tmp_path / "absent.obj", "obj", size=1, sha256="0" * 64)
    assert given.measured() is given
    with pytest.raises(FileNotFoundError):
        ExportRecord(tmp_path / "absent.obj", "obj", size=1).measured()


def test_a_stage_export_of_bytes_carries_size_and_sha256(tmp_path: Path) -> None:
    e = Export.of_bytes(tmp_path / "m.glb", "glb", b"glTF")
    assert (e.size, e.sha256) == (4, hashlib.sha256(b"glTF").hexdigest())
    assert Export(tmp_path / "m.glb", "glb").sha256 is None
