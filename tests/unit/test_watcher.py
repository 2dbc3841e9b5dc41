"""The inbox watcher with the real inotify observer."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.watcher import InboxWatcher


@pytest.fixture(params=[False, True], ids=["inotify", "polling"])
def watcher(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[InboxWatcher]:
    w = InboxWatcher(tmp_path, use_polling=request.param, settle_s=0.3)
    w.start()
    yield w
    w.stop()


def collect(w: InboxWatcher, seconds: float) -> list[Path]:
    end = time.monotonic() + seconds
    got: list[Path] = []
    while time.monotonic() < end and not got:
        got = w.ready(wait_s=0.05)
    return got


def test_closed_file_is_ready(watcher: InboxWatcher, tmp_path: Path) -> None:
    p = tmp_path / "a.toml"
    p.write_text("images = 'x'\n")
    assert collect(watcher, 5) == [p]


def test_renamed_in_file_is_ready_and_temp_names_ignored(
    watcher: InboxWatcher, tmp_path: Path
) -> None:
    tmp = tmp_path / ".a.toml.tmp"
    tmp.write_text("images = 'x'\n")
    assert collect(watcher, 0.5) == []
    os.replace(tmp, tmp_path / "a.toml")
    assert collect(watcher, 5) == [tmp_path / "a.toml"]


def test_file_still_being_written_is_not_ready(watcher: InboxWatcher, tmp_path: Path) -> None:
    p = tmp_path / "slow.toml"
    with open(p, "w") as f:
        for _ in range(6):
            f.write("# ...\n")
            f.flush()
            assert collect(watcher, 0.1) == []
            time.sleep(0.1)
    assert collect(watcher, 5) == [p]


def test_scan_finds_files_present_at_start(tmp_path: Path) -> None:
    p = tmp_path / "early.json"
    p.write_text("{}")
    os.utime(p, (time.time() - 60, time.time() - 60))
    w = InboxWatcher(tmp_path, settle_s=0.2)
    assert w.scan() == 1
    assert collect(w, 2) == [p]
