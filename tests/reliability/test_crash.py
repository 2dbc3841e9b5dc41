"""Crash matrix: kill -9 the daemon at each commit point, restart, and nothing is lost or
done twice."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import sqlite3
import time
from collections import Counter
from typing import Any

import psutil
import pytest
from daemon_harness import Home, wait_for
from dbus_notifications import private_notification_bus
from rel_helpers import (
    check_exports,
    classify_kill,
    notification_kinds,
    open_ledger,
    orphans,
    stage_done_counts,
)

from pipeline import STAGES

# which pipeline the scenarios run (RELIABILITY.md says so per row)
PIPELINE = "fake (tests/fakepipeline.py)"


def _no_orphans(home: Home) -> None:
    try:
        wait_for(lambda: not orphans(home), 10)
    except AssertionError as exc:
        left = [(p.pid, p.ppid(), " ".join(p.cmdline())[:120]) for p in orphans(home)]
        raise AssertionError(f"processes left behind: {left}") from exc


def test_kill_after_each_stage_published(home: Home) -> None:
    """For every stage in turn: the stage child publishes its output, then (before the
    daemon records the stage as done) the daemon is killed with SIGKILL and restarted.
    The job succeeds once, on its first attempt; the ledger records each stage done
    exactly once; the export loads in trimesh; one notification is queued; no process of
    the old daemon is left."""
    home.images("matrix", {s: {"pause_after_publish": 30} for s in STAGES})
    home.start()
    home.drop("matrix", formats=["glb", "obj"])
    job_id = wait_for(lambda: (home.job("matrix") or {}).get("id"))
    for stage in STAGES:
        wait_for(lambda stage=stage: (home.workspaces / job_id / f".{stage}.published").exists())
        home.kill9()
        _no_orphans(home)
        home.start()
    job = home.wait_state("matrix", "succeeded", timeout=180)
    assert job["attempts"] == 1
    assert stage_done_counts(home, job_id) == dict.fromkeys(STAGES, 1)
    runs = home.stage_runs(job_id)
    assert all(runs.count(s) == 2 for s in STAGES), runs
    check_exports(home, job, ["glb", "obj"])
    assert notification_kinds(home)[job_id] == ["exported"]
    ledger = open_ledger(home)
    try:
        assert len(ledger.exports(job_ids=[job_id])) == 2
    finally:
        ledger.close()
    _no_orphans(home)


def test_kill_mid_export_publish(home: Home) -> None:
    """The export stage has published the first of three formats when the daemon is
    killed. After a restart the job succeeds with exactly one file per format, each
    loading in trimesh, three export rows, and no temporary files in results/."""
    home.images("publish", {"export": {"pause_mid_publish": 30}})
    home.start()
    home.drop("publish", formats=["glb", "ply", "obj"])
    job_id = wait_for(lambda: (home.job("publish") or {}).get("id"))
    wait_for(lambda: (home.workspaces / job_id / ".export.midpublish").exists(), 40)
    home.kill9()
    _no_orphans(home)
    home.start()
    job = home.wait_state("publish", "succeeded")
    check_exports(home, job, ["glb", "ply", "obj"])
    assert stage_done_counts(home, job_id)["export"] == 1
    _no_orphans(home)


def test_kill_while_notification_is_being_sent(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A slow notification server has received the "ready" notification but not yet
    answered when the daemon is killed. After a restart the notification is not shown a
    second time."""
    with private_notification_bus(server=False) as bus:
        bus.start_server(reply_delay_s=3.0)
        home = Home(tmp_path / "home", env=bus.env)
        try:
            home.images("notify")
            home.start()
            home.drop("notify")
            bus.wait_for(1, timeout=180)
            home.kill9()
            home.start()
            home.wait_state("notify", "succeeded")
            home.images("after")
            home.drop("after")  # a later job: its notification proves the outbox moves on
            home.wait_state("after", "succeeded")
            got = bus.wait_for(2, timeout=20)
            time.sleep(4)
            got = bus.received()
            summaries = [g["summary"] for g in got]
            assert summaries.count("dropmesh: notify is ready") == 1, summaries
            assert summaries.count("dropmesh: after is ready") == 1, summaries
        finally:
            home.stop()


def test_kill_while_stage_process_starts(home: Home) -> None:
    """The daemon is killed the moment a new stage process appears (before that child has
    finished starting), three times. The new process is checked to be a stage: forked by
    the stage process server after that server's warm-up child has come and gone. No
    stage process outlives the daemon that started it, and the job then succeeds with
    each stage recorded once."""
    home.images("spawn", {s: {"sleep": 0.3} for s in STAGES})
    home.start()
    home.drop("spawn")
    job_id = wait_for(lambda: (home.job("spawn") or {}).get("id"))
    for _ in range(3):
        wait_for(lambda: "stage processes ready" in home.log_since(), 30)
        me = psutil.Process(home.proc.pid)  # type: ignore[union-attr]
        before = {c.pid for c in me.children(recursive=True)}
        servers = {
            c.pid for c in me.children(recursive=True) if "forkserver" in " ".join(c.cmdline())
        }
        assert servers, "no stage process server under the daemon"

        def new_process(me: psutil.Process = me, before: set[int] = before) -> set[int]:
            with contextlib.suppress(psutil.Error):
                return {c.pid for c in me.children(recursive=True)} - before
            return set()

        born = wait_for(new_process, 20, 0.002)
        parents = set()
        for pid in born:
            with contextlib.suppress(psutil.Error):
                parents.add(psutil.Process(pid).ppid())
        home.kill9()
        assert parents <= servers, (parents, servers)  # a stage, not the server itself
        time.sleep(1.0)  # long enough for a surviving child to get going
        _no_orphans(home)
        home.start()
    home.wait_state("spawn", "succeeded")
    assert stage_done_counts(home, job_id) == dict.fromkeys(STAGES, 1)


def test_cancel_then_kill_before_daemon_acts(home: Home) -> None:
    """The daemon is frozen (SIGSTOP) during a long stage, `dropmesh cancel` flags the
    running job, and the daemon is killed before it sees the flag. After a restart the
    job ends cancelled (it must not wait forever in the queue) and a later job runs."""
    home.images("stopme", {"features": {"sleep": 60, "steps": 60}})
    home.images("next")
    home.start()
    home.drop("stopme")
    wait_for(lambda: (home.job("stopme") or {}).get("stage") == "features")
    _freeze_outside_a_write(home)
    try:
        assert "cancelling" in home.cli("cancel", "stopme").stdout
    finally:
        home.kill9()
    home.start()
    home.wait_state("stopme", "cancelled", timeout=10)
    home.drop("next")
    home.wait_state("next", "succeeded")
    _no_orphans(home)


def _freeze_outside_a_write(home: Home) -> None:
    """SIGSTOP the daemon at a moment it holds no write lock on the ledger. Frozen inside
    a write (a progress update, more likely on a loaded machine) it would block every
    other writer, the CLI too, which is the frozen-disk case, not this test's."""
    assert home.proc is not None
    for _ in range(50):
        home.proc.send_signal(signal.SIGSTOP)
        try:
            with contextlib.closing(sqlite3.connect(home.root / "jobs.db", timeout=0.5)) as db:
                db.execute("BEGIN IMMEDIATE")
                db.rollback()
            return
        except sqlite3.OperationalError:
            home.proc.send_signal(signal.SIGCONT)
            time.sleep(0.05)
    raise AssertionError("the daemon held the ledger's write lock at every try")


@pytest.mark.slow
def test_random_kill_soak(home: Home, record_property: Any) -> None:
    """20 jobs (some with transient failures) run two at a time while the daemon is
    killed with SIGKILL 30 times at random moments (seeded, so a failure can be replayed)
    and restarted; each restart waits for that start's own "watching" line, each kill
    comes 0.3-1.5 s after that start's stage processes are ready. Every job
    succeeds exactly once with every stage recorded done once, every export loads, one
    notification per job, and no process is left over. What each kill interrupted is
    recorded; at least 2 of 3 kills must land while a stage runs."""
    seed = 20240607
    rng = random.Random(seed)
    env = {"DROPMESH_MAX_JOBS": "2"}
    names = [f"soak{i:02d}" for i in range(20)]
    for i, name in enumerate(names):
        beh: dict[str, object] = {s: {"sleep": rng.choice([0.3, 0.6, 1.0])} for s in STAGES}
        if i % 5 == 0:
            beh[rng.choice(STAGES)] = {"fail": 1, "how": rng.choice(["segv", "transient"])}
        home.images(name, beh)
    home.start(**env)
    for name in names:
        home.drop(name)
    deadline = time.monotonic() + 600
    kills: list[str] = []
    t_prev = time.time()
    for _ in range(30):
        # a random moment once this start's stage processes are ready (before that, a
        # kill would only ever interrupt the daemon's own start-up)
        wait_for(lambda: "stage processes ready" in home.log_since(), 30)
        time.sleep(rng.uniform(0.3, 1.5))
        t_kill = time.time()
        home.kill9()
        kills.append(classify_kill(home, t_prev, t_kill))
        t_prev = t_kill
        home.start(**env)
        assert time.monotonic() < deadline, f"soak took too long (seed {seed})"
    counts = Counter(kills)
    in_stage = sum(n for k, n in counts.items() if k.startswith("stage "))
    print(f"\nkills: {counts}")
    record_property(
        "kills",
        f"{in_stage} of {len(kills)} in a running stage; "
        + ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())),
    )
    assert in_stage * 3 >= 2 * len(kills), counts
    jobs = {}
    for name in names:
        jobs[name] = home.wait_state(name, "succeeded", timeout=max(deadline - time.monotonic(), 5))
    notes = notification_kinds(home)
    ledger = open_ledger(home)
    try:
        for name, job in jobs.items():
            assert stage_done_counts(home, job["id"]) == dict.fromkeys(STAGES, 1), name
            check_exports(home, job, ["glb"])
            assert notes[job["id"]] == ["exported"], name
            events = [e.message for e in ledger.events(job["id"], limit=100_000)]
            assert events.count("job succeeded") == 1, name
    finally:
        ledger.close()
    _no_orphans(home)
    assert len(home.status()) == 20
    assert json.loads(home.cli("status", "--json").stdout)
