"""The ledger under concurrent use, and a lost or damaged ledger."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from daemon_harness import Home, wait_for
from rel_helpers import open_ledger

TERMINAL = {"succeeded", "failed", "cancelled"}

# which pipeline the scenarios run (RELIABILITY.md says so per row)
PIPELINE = "fake (tests/fakepipeline.py)"


def _run_daemon_expect_refusal(home: Home) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "run"],
        env=home.env,
        cwd=home.root,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_missing_ledger_with_job_history_refused(home: Home) -> None:
    """jobs.db is deleted while workspaces/ holds the folders of earlier jobs. The daemon
    refuses to start (exit 1) with a message that says why and how to recover, and does
    not create an empty ledger."""
    home.images("first")
    home.start()
    home.drop("first")
    home.wait_state("first", "running", "succeeded")
    home.stop()
    for name in ("jobs.db", "jobs.db-wal", "jobs.db-shm"):
        (home.root / name).unlink(missing_ok=True)
    res = _run_daemon_expect_refusal(home)
    assert res.returncode == 1, res
    assert "refusing to start an empty ledger" in res.stderr, res.stderr
    assert "Restore jobs.db" in res.stderr and "move" in res.stderr, res.stderr
    assert not (home.root / "jobs.db").exists()


def test_corrupt_ledger_refused(home: Home) -> None:
    """jobs.db is overwritten with garbage. The daemon refuses to start (exit 1) naming
    the file and a recovery hint, and leaves the damaged file as it was."""
    home.start()
    home.stop()
    for name in ("jobs.db-wal", "jobs.db-shm"):
        (home.root / name).unlink(missing_ok=True)
    garbage = random.Random(1).randbytes(64 * 1024)
    (home.root / "jobs.db").write_bytes(garbage)
    res = _run_daemon_expect_refusal(home)
    assert res.returncode == 1, res
    assert "corrupt" in res.stderr and ".recover" in res.stderr, res.stderr
    assert (home.root / "jobs.db").read_bytes() == garbage


@pytest.mark.slow
def test_cli_storm_while_daemon_works(home: Home, record_property: Callable[..., Any]) -> None:
    """The daemon runs 8 jobs while 4 CLI processes loop for 30 s over `status --json`,
    `status`, `cancel PROJECT` and `retry PROJECT`. No command's output mentions
    "database is locked" or shows a traceback; every command exits 0 or 1 with a message;
    afterwards every job reaches a final state that matches its last state event (no
    lost update); the WAL file stays bounded (its size is recorded)."""
    names = [f"storm{i}" for i in range(8)]
    for name in names:
        home.images(name, {"features": {"sleep": 1.0}})
    home.start(DROPMESH_MAX_JOBS="2")
    for name in names:
        home.drop(name)
    wait_for(lambda: len(home.status()) == len(names), 30)
    stop = time.monotonic() + 30
    problems: list[str] = []
    counts = {"calls": 0}

    def loop(seed: int, make_args: Callable[[random.Random], list[str]]) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop:
            args = make_args(rng)
            res = home.cli(*args, check=False)
            counts["calls"] += 1
            out = res.stdout + res.stderr
            if "locked" in out.lower() or "Traceback" in out or res.returncode not in (0, 1):
                problems.append(f"{args} -> {res.returncode}: {out[-500:]}")
            elif res.returncode == 1 and "error:" not in res.stderr:
                problems.append(f"{args} -> 1 without a message: {out[-500:]}")

    loops = [
        lambda r: ["status", "--json"],
        lambda r: ["status", "--all"],
        lambda r: ["cancel", r.choice(names)],
        lambda r: ["retry", r.choice(names)],
    ]
    threads = [threading.Thread(target=loop, args=(i, f)) for i, f in enumerate(loops)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not problems, problems[:5]
    record_property("CLI calls", counts["calls"])

    def settled() -> bool:
        return all(j["state"] in TERMINAL for j in home.status())

    wait_for(settled, 120, 0.5)
    ledger = open_ledger(home)
    try:
        for job in ledger.list_jobs():
            states = [
                e.kind
                for e in ledger.events(job.id, limit=100_000)
                if e.kind in {"queued", "running", "waiting", *TERMINAL}
            ]
            assert states and states[-1] == job.state, (job.id, job.state, states)
    finally:
        ledger.close()
    wal = home.root / "jobs.db-wal"
    size = wal.stat().st_size if wal.exists() else 0
    record_property("WAL bytes after the storm", size)
    assert size < 8 * 1024 * 1024, size
    assert "database is locked" not in home.log()
