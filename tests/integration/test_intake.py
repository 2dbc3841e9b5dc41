"""Intake on a real SQLite ledger: what becomes of one request file."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import config
from daemon.intake import Intake, Taken
from daemon.joblog import JobLog
from daemon.ledger import Ledger


@pytest.fixture
def intake(tmp_path: Path) -> Iterator[Intake]:
    cfg = config.load(tmp_path, env={"DROPMESH_SETTLE_S": "0.2"})
    cfg.ensure_dirs()
    photos = tmp_path / "photos" / "fountain"
    photos.mkdir(parents=True)
    for i in range(3):
        (photos / f"{i}.jpg").write_bytes(b"\xff\xd8")
    ledger = Ledger.open(cfg.url, create=True)
    yield Intake(cfg, ledger, JobLog(cfg.workspace), stop=threading.Event(), wake=lambda: None)
    ledger.close()


def drop(intake: Intake, name: str, text: str, *, age_s: float = 0.0) -> Path:
    path = intake.cfg.inbox / name
    path.write_text(text)
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


REQUEST = 'images = "../photos/fountain"\n'


def test_accepted_request_becomes_a_job_and_leaves_the_inbox(intake: Intake) -> None:
    path = drop(intake, "fountain.toml", REQUEST)
    assert intake.take(path) is Taken.ACCEPTED
    [job] = intake.ledger.list_jobs()
    assert job.project == "fountain" and job.state == "queued"
    assert not path.exists()
    ws = intake.cfg.workspace(job.id)
    assert (ws / "request.toml").read_text() == REQUEST
    assert "queued from fountain.toml: 3 images" in (ws / "job.log").read_text()


def test_same_request_twice_is_a_duplicate_unless_forced(intake: Intake) -> None:
    assert intake.take(drop(intake, "a.toml", REQUEST)) is Taken.ACCEPTED
    other = drop(intake, "b.toml", REQUEST)  # project "b": other content
    assert intake.take(other) is Taken.ACCEPTED
    copy = drop(intake, "c.toml", 'project = "a"\n' + REQUEST)
    assert intake.take(copy) is Taken.DUPLICATE
    error = (intake.cfg.rejected / "c.toml.error.txt").read_text()
    assert "already submitted as job" in error and "force = true" in error
    forced = drop(intake, "d.toml", 'project = "a"\nforce = true\n' + REQUEST)
    assert intake.take(forced) is Taken.ACCEPTED
    assert len(intake.ledger.list_jobs()) == 3


def test_half_written_request_is_looked_at_again_then_rejected(intake: Intake) -> None:
    path = drop(intake, "half.toml", 'images = "../photos/fou')
    assert intake.take(path) is Taken.RETRY_LATER
    assert path.exists() and intake.ledger.list_jobs() == []
    os.utime(path, (time.time() - 60, time.time() - 60))
    assert intake.take(path) is Taken.REJECTED
    assert "not valid TOML" in (intake.cfg.rejected / "half.toml.error.txt").read_text()


def test_other_bad_requests_are_rejected_at_once(intake: Intake) -> None:
    path = drop(intake, "bad.toml", 'images = "../photos/nope"\n')
    assert intake.take(path) is Taken.REJECTED
    assert not path.exists()
    assert "does not exist" in (intake.cfg.rejected / "bad.toml.error.txt").read_text()
    # a second file of the same name is kept beside the first
    assert intake.take(drop(intake, "bad.toml", 'images = "../photos/none"\n')) is Taken.REJECTED
    assert len(list(intake.cfg.rejected.glob("bad.*.toml"))) == 1


def test_a_file_gone_before_it_is_read(intake: Intake) -> None:
    assert intake.take(intake.cfg.inbox / "never.toml") is Taken.GONE
