"""Helpers for the reliability suites: processes of a test home, ledger look-ups."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import psutil
from daemon_harness import Home


def home_processes(home: Home) -> list[psutil.Process]:
    """Every live process started for this home (daemon, stage children and anything they
    started): they all carry DROPMESH_HOME in their environment."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid == os.getpid() or p.status() == psutil.STATUS_ZOMBIE:
                continue
            if p.environ().get("DROPMESH_HOME") == str(home.root):
                found.append(p)
        except psutil.Error:
            continue
    return found


def orphans(home: Home) -> list[psutil.Process]:
    """Processes of this home that are neither the running daemon nor below it."""
    mine: set[int] = set()
    if home.proc is not None and home.proc.poll() is None:
        me = psutil.Process(home.proc.pid)
        mine = {me.pid, *(c.pid for c in me.children(recursive=True))}
    return [p for p in home_processes(home) if p.pid not in mine]


def kill_leftovers(home: Home) -> None:
    for p in home_processes(home):
        with contextlib.suppress(psutil.Error):
            p.kill()


def open_ledger(home: Home) -> Any:
    from daemon.ledger import Ledger

    return Ledger.open(f"sqlite:///{home.root / 'jobs.db'}")


def stage_done_counts(home: Home, job_id: str) -> dict[str, int]:
    """How often the ledger recorded each stage of a job as done (its event log)."""
    ledger = open_ledger(home)
    try:
        counts: dict[str, int] = {}
        for e in ledger.events(job_id, limit=100_000):
            words = e.message.split()
            if e.kind == "stage" and len(words) >= 3 and words[2] == "done":
                counts[words[1]] = counts.get(words[1], 0) + 1
        return counts
    finally:
        ledger.close()


def check_exports(home: Home, job: dict[str, Any], formats: list[str]) -> None:
    """Exactly one published file per format, each loading as a mesh; no temporaries."""
    import trimesh

    assert sorted(Path(p).suffix[1:] for p in job["exports"]) == sorted(formats), job
    folder = home.results / job["project"]
    files = sorted(f.name for f in folder.iterdir())
    assert files == sorted(f"{job['id']}_textured_mesh_poisson.{f}" for f in formats), files
    for path in job["exports"]:
        mesh = trimesh.load(path, force="mesh")
        assert len(mesh.faces) == 12, path


def notification_kinds(home: Home) -> dict[str | None, list[str]]:
    """Every notification in the outbox (sent or not), by job id."""
    from sqlalchemy import select

    from daemon.models import Notification

    ledger = open_ledger(home)
    try:
        with ledger.read() as s:
            rows = s.execute(select(Notification.job_id, Notification.kind)).all()
    finally:
        ledger.close()
    out: dict[str | None, list[str]] = {}
    for job_id, kind in rows:
        out.setdefault(job_id, []).append(kind)
    return out


def _stage_log(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if len(line.split()) >= 3]


def classify_kill(home: Home, t_prev: float, t_kill: float) -> str:
    """What a kill at `t_kill` interrupted, from the fake stages' own logs (each stage
    writes `stage_runs.log` when it starts and `stage_times.log` when it has published)
    and the ledger's event times. Every stage process dies with the daemon, so a stage
    that started after the previous kill and had not published by this one was running.

    Returns "stage <name>" (a stage was running), "published <name>" (a stage had
    published its output but the ledger had not yet recorded it done), or "between
    stages" (the daemon itself was starting, committing, or spawning)."""
    running, published = [], []
    for ws in home.workspaces.glob("*"):
        ends = {(r[0], r[1]): float(r[2]) for r in _stage_log(ws / "stage_times.log")}
        for stage, _pid, started in _stage_log(ws / "stage_runs.log"):
            t0 = float(started)
            if not t_prev < t0 <= t_kill:
                continue
            end = ends.get((stage, started))
            if end is None or end > t_kill:
                running.append(stage)
            else:
                published.append((ws.name, stage, end))
    if running:
        return f"stage {running[0]}"
    if published:
        ledger = open_ledger(home)
        try:
            for job_id, stage, end in published:
                done = [
                    e.at
                    for e in ledger.events(job_id, limit=100_000)
                    if e.kind == "stage" and e.message.split()[1:3] == [stage, "done"]
                ]
                if not any(end <= at <= t_kill for at in done):
                    return f"published {stage}"
        finally:
            ledger.close()
    return "between stages"
