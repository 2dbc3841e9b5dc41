"""Inbox: floods, lost events, slow writers, renames, symlinks and odd file names. Every
request file ends as exactly one job or one rejection; none is read half-written."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from daemon_harness import Home, wait_for
from rel_helpers import open_ledger

# which pipeline the scenarios run (RELIABILITY.md says so per row)
PIPELINE = "fake (tests/fakepipeline.py)"


def _jobs(home: Home) -> list[str]:
    ledger = open_ledger(home)
    try:
        return [j.project for j in ledger.list_jobs()]
    finally:
        ledger.close()


def _request(images: str, project: str) -> str:
    return f'project = "{project}"\nimages = "{images}"\n'


def test_thousand_requests_at_once(home: Home) -> None:
    """1,000 request files (900 valid, 100 naming a missing folder) are written into the
    inbox within a second while the daemon runs. Every valid one becomes exactly one job,
    every bad one exactly one rejection with its error file; the inbox ends empty."""
    home.images("flood", {"_all": {"sleep": 5}})
    home.start()
    for i in range(1000):
        images = "../photos/nope" if i % 10 == 0 else "../photos/flood"
        tmp = home.inbox / f".r{i:04d}.tmp"
        tmp.write_text(_request(images, f"r{i:04d}"))
        os.replace(tmp, home.inbox / f"r{i:04d}.toml")
    rejected = home.inbox / "rejected"
    wait_for(lambda: len(_jobs(home)) == 900, 240, 0.5)
    wait_for(lambda: len(list(rejected.glob("*.error.txt"))) == 100, 60, 0.5)
    projects = _jobs(home)
    assert sorted(projects) == sorted(f"r{i:04d}" for i in range(1000) if i % 10)
    assert not list(home.inbox.glob("*.toml"))


def test_lost_inotify_events_recovered_by_rescan(home: Home) -> None:
    """The daemon is frozen (SIGSTOP) while 20 requests are dropped after more file
    events than the kernel's inotify queue holds (fs.inotify.max_queued_events). The
    queue must really overflow (the watcher logs the kernel's overflow event for this
    start), the requests' own events are lost with it, and after SIGCONT the periodic
    rescan still turns each of the 20 into exactly one job."""
    home.images("overflow")
    home.start()
    assert home.proc is not None
    home.proc.send_signal(signal.SIGSTOP)
    try:
        limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
        noise = home.inbox / ".noise"
        for i in range(limit // 2 + 2000):
            noise.write_text(str(i))
            noise.unlink()
        for i in range(20):
            (home.inbox / f"o{i:02d}.toml").write_text(_request("../photos/overflow", f"o{i:02d}"))
    finally:
        home.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: "Inotify queue overflowed" in home.log_since(), 30, 0.2)
    wait_for(lambda: len(_jobs(home)) >= 20, 60, 0.5)
    time.sleep(2.5)  # two more rescans: nothing may be taken twice
    assert sorted(_jobs(home)) == [f"o{i:02d}" for i in range(20)]


def test_slow_writer_is_never_read_half_way(home: Home) -> None:
    """A request is written a byte at a time over about two seconds through one open file.
    It is taken once complete (never rejected as malformed, never read short)."""
    home.images("slow")
    home.start()
    text = _request("../photos/slow", "slowpoke").encode()
    with open(home.inbox / "slow.toml", "wb") as f:
        for i in range(len(text)):
            f.write(text[i : i + 1])
            f.flush()
            time.sleep(2.0 / len(text))
    job = home.wait_state("slowpoke", "succeeded", timeout=120)
    assert job["project"] == "slowpoke"
    assert not (home.inbox / "rejected").exists() or not list((home.inbox / "rejected").iterdir())


def test_rename_over_existing_request(home: Home) -> None:
    """With the daemon stopped, a.toml is written, then another request is renamed over
    it. At start only the final content runs; later, a request renamed in under the name of
    one already taken becomes a second job."""
    home.images("first")
    home.images("second")
    (home.inbox).mkdir(parents=True, exist_ok=True)
    (home.inbox / "a.toml").write_text(_request("../photos/first", "first"))
    tmp = home.inbox / ".a.toml.tmp"
    tmp.write_text(_request("../photos/second", "second"))
    os.replace(tmp, home.inbox / "a.toml")
    home.start()
    home.wait_state("second", "succeeded")
    tmp.write_text(_request("../photos/first", "first"))
    os.replace(tmp, home.inbox / "a.toml")
    home.wait_state("first", "succeeded")
    assert sorted(_jobs(home)) == ["first", "second"]


def test_symlinked_request_is_refused(home: Home, tmp_path: Path) -> None:
    """A symbolic link dropped into the inbox (here to a request outside it) is refused
    with a message: request files are read only as regular files written into the inbox."""
    home.images("linked")
    outside = tmp_path / "elsewhere.toml"
    outside.write_text(_request(str(home.root / "photos" / "linked"), "linked"))
    home.start()
    os.symlink(outside, home.inbox / "linked.toml")
    err = home.inbox / "rejected" / "linked.toml.error.txt"
    wait_for(err.exists, 30)
    assert "symbolic link" in err.read_text()
    assert outside.exists()
    assert _jobs(home) == []


def test_non_utf8_file_name(home: Home) -> None:
    """A request whose file name is not valid UTF-8 is taken like any other (project
    named from its valid part); a second one with bad content is rejected. The daemon keeps
    running and the ledger stays readable."""
    home.images("bytes")
    home.start()
    inbox = os.fsencode(home.inbox)
    good = os.path.join(inbox, b"caf\xe9.toml")
    with open(good, "wb") as f:
        f.write(b'images = "../photos/bytes"\n')
    bad = os.path.join(inbox, b"bad\xff.toml")
    with open(bad, "wb") as f:
        f.write(b"images = [\n")
    wait_for(lambda: len(_jobs(home)) == 1, 30)
    wait_for(lambda: len(list((home.inbox / "rejected").glob("*.error.txt"))) == 1, 30)
    assert home.cli("status").returncode == 0
    assert home.proc is not None and home.proc.poll() is None


@pytest.mark.parametrize("env", [{"DROPMESH_USE_POLLING": "1"}], ids=["polling"])
def test_polling_inbox(home: Home, env: dict[str, str]) -> None:
    """With `use_polling` (network mounts, containers without inotify) requests are still
    picked up, by the polling observer."""
    home.images("polled")
    home.start(**env)
    assert "(polling)" in home.log()
    home.drop("polled")
    home.wait_state("polled", "succeeded")
