"""The read-only listings `dropmesh status` uses (daemon/listing.py), on every backend."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.ledger import ExportRecord, Ledger
from daemon.ledgerfile import LedgerError
from daemon.listing import BRIEF_JOB_COLUMNS, Listing
from daemon.models import Event
from pipeline import STAGES


def make(ledger: Ledger, project: str) -> str:
    job_id = ledger.create_job(
        project=project, spec={}, request_hash=project, request_name=f"{project}.toml"
    ).id
    time.sleep(0.01)  # distinct created_at, so "newest first" is well defined
    return job_id


def export(ledger: Ledger, job_id: str, files: list[Path]) -> None:
    """Run the job's stages to success, publishing `files` as its exports."""
    job = ledger.claim_next("host:1:x")
    assert job is not None and job.id == job_id
    for name in STAGES:
        ledger.stage_finished(
            job_id,
            name,
            metrics={},
            device="cpu",
            peak_rss_mb=None,
            exports=[ExportRecord(f, f.suffix[1:]) for f in files] if name == STAGES[-1] else (),
            last=name == STAGES[-1],
            token=job.lease_token,
        )


@pytest.fixture
def listing(ledger: Ledger, ledger_url: str) -> Iterator[Listing]:
    listing = Listing.open(ledger_url)
    yield listing
    listing.close()


def test_list_jobs_newest_first_by_state_and_limit(ledger: Ledger, listing: Listing) -> None:
    a, b, c = make(ledger, "a"), make(ledger, "b"), make(ledger, "c")
    ledger.request_cancel(b)
    assert [j.id for j in listing.list_jobs()] == [c, b, a]
    assert [j.id for j in listing.list_jobs(states=["queued"])] == [c, a]
    assert [j.id for j in listing.list_jobs(states=["cancelled", "queued"], limit=2)] == [c, b]
    assert listing.list_jobs(states=["running"]) == []
    row = listing.list_jobs(limit=1)[0]
    assert (row.project, row.state, row.attempts, row.spec["job_id"]) == ("c", "queued", 0, c)
    brief = listing.list_jobs(limit=1, brief=True)[0]  # what the listing shows, no spec
    assert brief._fields == BRIEF_JOB_COLUMNS and (brief.id, brief.state) == (c, "queued")


def test_stages_for_lists_each_jobs_stages_in_order(ledger: Ledger, listing: Listing) -> None:
    a, b = make(ledger, "a"), make(ledger, "b")
    ledger.claim_next("host:1:x")  # a
    ledger.stage_started(a, STAGES[0], pid=7, attempt=1)
    ledger.stage_progress(a, STAGES[0], 0.25, "reading")
    for every in (False, True):
        got = listing.stages_for([a], every=every)
        assert list(got) == [a], "only the jobs asked for, even when scanning every job"
        assert [s.name for s in got[a]] == list(STAGES)
        first = got[a][0]
        assert (first.state, first.pid, first.progress, first.message) == (
            "running",
            7,
            0.25,
            "reading",
        )
        assert {s.state for s in got[a][1:]} == {"pending"}
    both = listing.stages_for([a, b])
    assert {k: len(v) for k, v in both.items()} == {a: len(STAGES), b: len(STAGES)}
    assert listing.stages_for([]) == {}
    assert listing.stages_for(["nosuchjob"]) == {"nosuchjob": []}


def test_export_paths_per_job_newest_first(
    ledger: Ledger, listing: Listing, tmp_path: Path
) -> None:
    a, b = make(ledger, "a"), make(ledger, "b")
    files = [tmp_path / "a.glb", tmp_path / "a.ply"]
    for f in files:
        f.write_bytes(f.name.encode())
    export(ledger, a, files)
    for every in (False, True):
        got = listing.export_paths([a, b], every=every)
        assert sorted(got[a]) == sorted(str(f) for f in files) and got[b] == []
    assert listing.export_paths([b]) == {b: []}
    assert listing.export_paths([]) == {}
    # a retry that publishes again puts the newest export first
    time.sleep(0.01)
    ledger.retry(a, from_stage=STAGES[-1])
    export(ledger, a, [files[1]])
    assert listing.export_paths([a])[a][0] == str(files[1])


@pytest.mark.timeout(30)
def test_listing_does_not_wait_for_a_writer(ledger: Ledger, listing: Listing) -> None:
    done = make(ledger, "done")
    with ledger.write() as s:  # an open write transaction (SQLite: BEGIN IMMEDIATE)
        s.add(Event(job_id=done, at=time.time(), kind="note", message="held", data={}))
        s.flush()
        started = time.monotonic()
        assert [j.id for j in listing.list_jobs()] == [done]
        assert list(listing.stages_for([done])) == [done]
        assert time.monotonic() - started < 5


def test_open_refuses_a_missing_ledger(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no ledger at"):
        Listing.open(f"sqlite:///{tmp_path / 'none.db'}")
    assert not (tmp_path / "none.db").exists()


def test_open_refuses_a_corrupt_or_old_ledger_naming_it(tmp_path: Path) -> None:
    """The SQLite listing checks the file as the engine does, with the same messages."""
    garbage = tmp_path / "jobs.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError, match=r"jobs\.db cannot be read .*corrupt.*\.recover"):
        Listing.open(f"sqlite:///{garbage}")
    assert garbage.read_bytes().startswith(b"this is not")
    foreign = tmp_path / "photos.db"
    con = sqlite3.connect(foreign)
    con.execute("create table photos (id integer)")
    con.commit()
    con.close()
    with pytest.raises(LedgerError, match="is at schema None.*start the daemon once"):
        Listing.open(f"sqlite:///{foreign}")


def test_rows_read_back_as_the_orm_gives_them(ledger: Ledger, listing: Listing) -> None:
    """JSON columns decoded, booleans as booleans (SQLite stores 0 and 1)."""
    a = make(ledger, "a")
    ledger.claim_next("host:1:x")
    ledger.request_cancel(a)  # a running job: cancelled by its daemon, asked for here
    assert [(j.state, j.cancel_requested) for j in listing.list_jobs()] == [("running", True)]
    b = make(ledger, "b")
    rows = {j.id: j for j in listing.list_jobs()}
    assert rows[b].cancel_requested is False
    assert isinstance(rows[b].spec, dict) and rows[b].spec["job_id"] == b
    assert all(isinstance(s.metrics, dict) for s in listing.stages_for([b])[b])


def test_listing_loads_no_orm() -> None:
    code = (
        "import sys, daemon.listing; "
        "loaded = [m for m in ('sqlalchemy.orm', 'daemon.models', 'daemon.ledger') "
        "if m in sys.modules]; print(loaded)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_status_on_sqlite_loads_no_sqlalchemy(tmp_path: Path) -> None:
    """Importing SQLAlchemy takes longer than listing 10,000 jobs: `dropmesh status` on an
    SQLite ledger reads through the standard library's sqlite3 alone."""
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'jobs.db'}", create=True)
    make(ledger, "a")
    ledger.close()
    code = (
        "import sys, runpy; sys.argv = ['dropmesh', 'status', '--all']\n"
        "try:\n    runpy.run_module('daemon.cli', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('sqlalchemy'))[:3])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "DROPMESH_HOME": str(tmp_path)},
    )
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "[]", out.stdout
    assert any(line.split()[1:3] == ["a", "queued"] for line in lines[1:-1]), out.stdout
