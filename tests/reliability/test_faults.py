"""Child faults: crashes, hangs, out of memory, disk full, read-only results, vanished
or unreadable images. Each fault stays inside its job; the daemon keeps running."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from daemon_harness import Home, wait_for
from PIL import Image
from rel_helpers import check_exports, orphans

FAULT_ENV = {"DROPMESH_MAX_JOBS": "2"}

# which pipeline the scenarios run (RELIABILITY.md says so per row)
PIPELINE = "fake (tests/fakepipeline.py)"
PIPELINE_OF = {"test_images_deleted_or_unreadable": "fake, with the real ingest stage"}


@contextlib.contextmanager
def tmpfs(target: Path, options: str) -> Iterator[Path]:
    """A small tmpfs mounted over `target` (root only). With DROPMESH_REQUIRE_TMPFS set
    (CI sets it), not being able to mount one fails the test instead of skipping it."""

    def skip(reason: str) -> NoReturn:
        if os.environ.get("DROPMESH_REQUIRE_TMPFS"):
            pytest.fail(f"DROPMESH_REQUIRE_TMPFS is set, but {reason}")
        pytest.skip(reason)

    if os.geteuid() != 0:
        skip("mounting a small filesystem needs root")
    target.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True
    )
    if res.returncode != 0:
        skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def fill(folder: Path) -> None:
    """Fill a filesystem: data until ENOSPC."""
    subprocess.run(["dd", "if=/dev/zero", f"of={folder / 'filler'}", "bs=4k"], capture_output=True)


def test_child_crashes_and_errors(home: Home) -> None:
    """Jobs whose stage child dies of SIGSEGV once, of SIGKILL every time, raises
    MemoryError every time, or exits without a result, all in one daemon two at a time.
    The SIGSEGV job is retried and succeeds; the others fail after max_attempts (3) with
    a message naming the cause; a good job still succeeds; no process is left over."""
    home.images("segv", {"features": {"fail": 1, "how": "segv"}})
    home.images("killed", {"ingest": {"fail": -1, "how": "kill"}})
    home.images("oom", {"ingest": {"fail": -1, "how": "memory"}})
    home.images("quit", {"ingest": {"fail": -1, "how": "exit"}})
    home.images("good")
    home.start(**FAULT_ENV)
    for name in ("segv", "killed", "oom", "quit", "good"):
        home.drop(name)
    job = home.wait_state("segv", "succeeded", timeout=180)
    assert job["attempts"] == 2
    for name, text in (
        ("killed", "SIGKILL"),
        ("oom", "out of memory"),
        ("quit", "exited with status 3"),
    ):
        job = home.wait_state(name, "failed", timeout=180)
        assert job["attempts"] == 3, job
        assert text in job["error"] and "gave up after 3 attempts" in job["error"], job
    check_exports(home, home.wait_state("good", "succeeded", timeout=180), ["glb"])
    assert home.proc is not None and home.proc.poll() is None
    wait_for(lambda: not orphans(home), 5)


def test_hang_past_stage_timeout(home: Home) -> None:
    """A stage that hangs (and has started a grandchild process) is stopped after
    stage_timeout_s (4 s here) with its whole process tree, retried, and the job fails
    after 3 attempts saying why; the daemon keeps running."""
    home.images("hang", {"mapping": {"hang": True, "child": True}})
    home.start(DROPMESH_STAGE_TIMEOUT_S="4")
    home.drop("hang")
    job = home.wait_state("hang", "failed", timeout=180)
    assert "stage_timeout_s" in job["error"] and job["attempts"] == 3, job
    assert not orphans(home), [p.cmdline() for p in orphans(home)]
    assert home.proc is not None and home.proc.poll() is None


def test_results_disk_full_then_freed(home: Home) -> None:
    """results/ is a full 256 KiB filesystem: the export fails with "disk full" (a
    transient error, retried, then given up); after space is freed, `dropmesh retry`
    publishes the export, which loads."""
    with tmpfs(home.results, "size=256k"):
        fill(home.results)
        home.images("full")
        home.start(**FAULT_ENV)
        home.drop("full")
        job = home.wait_state("full", "failed", timeout=180)
        assert "disk full" in job["error"] and job["attempts"] == 3, job
        (home.results / "filler").unlink()
        for leftover in home.results.rglob(".*.tmp"):
            leftover.unlink()
        home.cli("retry", job["id"])
        job = home.wait_state("full", "succeeded", timeout=180)
        check_exports(home, job, ["glb"])
        home.stop()


def test_workspaces_disk_full_then_freed(home: Home) -> None:
    """workspaces/ is a full filesystem when a request arrives and while jobs run. The
    daemon keeps running; once space is freed the request becomes a job that succeeds."""
    with tmpfs(home.workspaces, "size=256k,nr_inodes=64"):
        fill(home.workspaces)
        with contextlib.suppress(OSError):
            for i in range(100):
                (home.workspaces / f"i{i}").mkdir()
        home.images("ws")
        home.start(**FAULT_ENV)
        home.drop("ws")
        wait_for(lambda: "ws" in home.log() or "No space" in home.log(), 10)
        time.sleep(3)
        assert home.proc is not None and home.proc.poll() is None, home.log()
        (home.workspaces / "filler").unlink()
        for d in home.workspaces.glob("i*"):
            d.rmdir()
        job = home.wait_state("ws", "succeeded", "failed", timeout=180)
        if job["state"] == "failed":
            assert "disk full" in job["error"] or "No space" in job["error"], job
            home.cli("retry", job["id"])
            job = home.wait_state("ws", "succeeded", timeout=180)
        check_exports(home, job, ["glb"])
        home.stop()


def test_results_read_only(home: Home) -> None:
    """results/ is a read-only filesystem: the job fails at once (a permanent error) with
    a message about permissions, and the daemon keeps running."""
    with tmpfs(home.results, "ro,size=64k"):
        home.images("ro")
        home.start(**FAULT_ENV)
        home.drop("ro")
        job = home.wait_state("ro", "failed", timeout=180)
        assert job["attempts"] == 1 and "cannot write" in job["error"], job
        assert home.proc is not None and home.proc.poll() is None
        home.stop()


def _photos(folder: Path, n: int = 3, corrupt: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / f"p{i}.jpg"
        Image.new("RGB", (64, 48), (i * 60, 100, 150)).save(path)
        if corrupt:
            path.write_bytes(path.read_bytes()[:40])
    (folder / "fake.json").write_text('{"ingest": {"real": true}}')
    return folder


def test_images_deleted_or_unreadable(home: Home) -> None:
    """With the real `ingest` stage: a job whose image folder is deleted after it was
    queued, and a job whose photos are truncated JPEGs, each fail at once (permanent
    error, one attempt) with a message naming the problem; a job whose folder is
    deleted after ingest finished still succeeds from the ingested copies."""
    gone = _photos(home.root / "photos" / "gone")
    _photos(home.root / "photos" / "bad", corrupt=True)
    late = _photos(home.root / "photos" / "late")
    (late / "fake.json").write_text('{"features": {"sleep": 2}}')
    # One job at a time, and a slow job first, so that "gone" waits in the queue while its
    # folder is deleted.
    first = _photos(home.root / "photos" / "first")
    (first / "fake.json").write_text('{"features": {"sleep": 5}}')
    home.start(DROPMESH_MAX_JOBS="1", DROPMESH_TEST_REAL_STAGES="ingest")
    home.drop("first")
    wait_for(lambda: (home.job("first") or {}).get("state") == "running")
    home.drop("gone")
    wait_for(lambda: (home.job("gone") or {}).get("state") == "queued")
    shutil.rmtree(gone)
    job = home.wait_state("gone", "failed", timeout=180)
    assert job["attempts"] == 1 and "does not exist" in job["error"], job
    home.drop("bad")
    job = home.wait_state("bad", "failed", timeout=180)
    assert job["attempts"] == 1 and "cannot be used" in job["error"], job
    home.drop("late")
    wait_for(lambda: (home.job("late") or {}).get("stage") == "features", 30)
    shutil.rmtree(late)
    home.wait_state("late", "succeeded", timeout=180)
