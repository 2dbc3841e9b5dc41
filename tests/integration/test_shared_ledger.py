"""Three daemons on one PostgreSQL ledger and one shared home, with kill -9."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from daemon_harness import Home, wait_for
from sqlalchemy import select

from daemon.ledger import Ledger
from daemon.models import Job, Notification
from pipeline import STAGES

N_JOBS = 30
N_DAEMONS = 3
SEED = 20240611


class Daemons:
    """Several `dropmesh run` processes on one home folder, each with its own log."""

    def __init__(self, home: Home, **env: str) -> None:
        self.home = home
        self.env = {**home.env, **env}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.starts = 0

    def start(self, slot: int) -> None:
        self.starts += 1
        log_path = self.home.root / f"daemon-{slot}-{self.starts}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "daemon.cli", "run"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.home.root,
            )
        wait_for(lambda: "watching" in log_path.read_text(errors="replace") or proc.poll(), 60)
        assert proc.poll() is None, log_path.read_text()
        self.procs[slot] = proc

    def kill9(self, slot: int) -> None:
        proc = self.procs.pop(slot)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()

    def logs(self) -> str:
        return "".join(
            f"--- {p.name} ---\n{p.read_text(errors='replace')}"
            for p in sorted(self.home.root.glob("daemon-*.log"))
        )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_three_daemons_with_kill9_run_every_job_once(tmp_path: Path, pg_url: str) -> None:
    home = Home(tmp_path / "home")
    home.env["DROPMESH_LEDGER_URL"] = pg_url
    daemons = Daemons(
        home,
        DROPMESH_MAX_JOBS="2",
        DROPMESH_STALE_AFTER_S="3",
        DROPMESH_HEARTBEAT_S="0.5",
        DROPMESH_USE_POLLING="true",
    )
    rng = random.Random(SEED)
    try:
        for slot in range(N_DAEMONS):
            daemons.start(slot)
        projects = [f"p{i:02d}" for i in range(N_JOBS)]
        for p in projects:
            home.images(p, {"_all": {"sleep": 0.4}})
            home.drop(p)

        ledger = Ledger.open(pg_url)
        kills = 0

        def finished() -> int:
            return sum(
                1 for j in ledger.list_jobs() if j.state in ("succeeded", "failed", "cancelled")
            )

        deadline = time.monotonic() + 400
        while finished() < N_JOBS and time.monotonic() < deadline:
            time.sleep(rng.uniform(2.0, 5.0))
            if kills < 4 and daemons.procs:
                slot = rng.choice(sorted(daemons.procs))
                daemons.kill9(slot)
                kills += 1
                # Sometimes back at once (same host: its jobs resume at start-up), sometimes
                # only after the lease expired and another daemon took its jobs over.
                time.sleep(rng.choice([0.0, 5.0]))
                daemons.start(slot)
        wait_for(lambda: finished() == N_JOBS, max(10.0, deadline - time.monotonic()), 0.5)

        jobs = ledger.list_jobs()
        assert sorted(j.project for j in jobs) == projects, "one job per request"
        assert {j.state for j in jobs} == {"succeeded"}, daemons.logs()
        assert kills == 4
        resumed = 0
        hosts_by_attempt: set[str] = set()
        for job in jobs:
            ws = home.workspaces / job.id
            assert not (ws / "overlaps.log").exists(), (ws / "overlaps.log").read_text()
            events = ledger.events(job.id)
            done = Counter(
                e.message.split()[1]
                for e in events
                if e.kind == "stage" and " done in " in e.message
            )
            assert done == Counter(STAGES), f"{job.id}: stages done {done}"
            assert sum(e.kind == "succeeded" for e in events) == 1
            resumed += sum(e.kind == "queued" and "resumed" in e.message for e in events)
            hosts_by_attempt |= {
                e.message.rsplit(" by ", 1)[1] for e in events if "started by" in e.message
            }
            assert job.lease_token >= 1
        assert resumed >= 1, "a kill -9 interrupted no job"
        assert len(hosts_by_attempt) >= N_DAEMONS, "the work was shared between daemons"
        with ledger.read() as s:
            kinds = Counter(
                n.job_id
                for n in s.scalars(select(Notification).where(Notification.kind == "exported"))
            )
            assert set(kinds.values()) == {1} and len(kinds) == N_JOBS
            assert s.scalar(select(Job.id).where(Job.request_key.is_(None))) is None
        assert len(ledger.exports()) == N_JOBS
        ledger.close()
    finally:
        daemons.stop_all()
    if os.environ.get("DROPMESH_TEST_SHOW_LOGS"):
        print(daemons.logs())


def test_workers_and_status_show_hosts(tmp_path: Path, pg_url: str) -> None:
    home = Home(tmp_path / "home")
    home.env["DROPMESH_LEDGER_URL"] = pg_url
    home.env["DROPMESH_STALE_AFTER_S"] = "2"
    daemons = Daemons(home)
    try:
        daemons.start(0)
        daemons.start(1)  # no home lock on a shared ledger
        listed = json.loads(home.cli("workers", "--json").stdout)
        assert len(listed) == 2 and {w["pid"] for w in listed} == {
            p.pid for p in daemons.procs.values()
        }
        assert all(w["live"] and w["heartbeat_age_s"] < 5 for w in listed)
        assert "live" in home.cli("workers").stdout
        home.images("one")
        home.drop("one")
        job = home.wait_state("one", "succeeded")
        assert job["host"] == listed[0]["host"]
        killed = daemons.procs[1].pid
        daemons.kill9(1)
        daemons.stop_all()  # a clean stop removes the daemon's row
        time.sleep(2.5)
        assert json.loads(home.cli("workers", "--json").stdout) == []
        stale = json.loads(home.cli("workers", "--json", "--all").stdout)
        assert [(w["pid"], w["live"]) for w in stale] == [(killed, False)]
    finally:
        daemons.stop_all()
