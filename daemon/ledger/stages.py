"""Stage records: one row per job and pipeline stage, written by the daemon running it.

Every write passes the daemon's lease token (see leases.py). Finishing the last stage
also records the exports, the job's success and its notification, in one transaction.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from daemon.ledger import outbox
from daemon.ledger.leases import guard, move
from daemon.ledger.outbox import ExportRecord
from daemon.ledger.store import DaemonId, NotFound, Store
from daemon.models import Job, Stage
from daemon.notify import exported_text
from daemon.states import JobState, StageState


def of_job(store: Store, job_id: str) -> list[Stage]:
    """The job's stages in pipeline order."""
    with store.read() as s:
        rows = s.scalars(select(Stage).where(Stage.job_id == job_id).order_by(Stage.seq))
        out = list(rows.all())
        s.expunge_all()
        return out


def running_pids(
    store: Store, workers: Collection[DaemonId] | None = None
) -> list[tuple[str, str, int]]:
    """(job, stage, pid) of running stages; with `workers`, only of jobs they ran."""
    with store.read() as s:
        q = select(Stage.job_id, Stage.name, Stage.pid).where(
            Stage.state == StageState.RUNNING.value, Stage.pid.is_not(None)
        )
        if workers is not None:
            q = q.join(Job, Job.id == Stage.job_id).where(Job.worker.in_(list(workers)))
        rows = s.execute(q).all()
        return [(j, n, int(p)) for j, n, p in rows if p is not None]


def started(
    store: Store, job_id: str, name: str, pid: int, attempt: int, *, token: int | None = None
) -> None:
    now = time.time()
    with store.write() as s:
        guard(s, job_id, token)
        s.execute(
            update(Stage)
            .where(Stage.job_id == job_id, Stage.name == name)
            .values(
                state=StageState.RUNNING.value,
                pid=pid,
                attempt=attempt,
                started_at=now,
                finished_at=None,
                progress=0.0,
                message="started",
            )
        )
        s.execute(update(Job).where(Job.id == job_id).values(stage=name, updated_at=now))
        s.add(outbox.event(job_id, "stage", f"stage {name} started (pid {pid})", now))


def progress(
    store: Store,
    job_id: str,
    name: str,
    fraction: float,
    message: str,
    *,
    token: int | None = None,
) -> None:
    with store.write() as s:
        guard(s, job_id, token)
        s.execute(
            update(Stage)
            .where(Stage.job_id == job_id, Stage.name == name)
            .values(progress=max(0.0, min(1.0, fraction)), message=message[:500])
        )


def finished(
    store: Store,
    job_id: str,
    name: str,
    *,
    metrics: dict[str, Any],
    device: str | None,
    peak_rss_mb: float | None,
    exports: Sequence[ExportRecord] = (),
    last: bool = False,
    token: int | None = None,
) -> None:
    """Record a finished stage; for the last stage also the exports, the success
    and its notification, all in one transaction. Exports that come without size
    and sha256 are measured first, outside the transaction."""
    exports = [e.measured() for e in exports]
    now = time.time()
    with store.write() as s:
        guard(s, job_id, token)
        _record_done(s, job_id, name, now, metrics, device, peak_rss_mb)
        if exports:
            outbox.add_exports(s, job_id, exports, now)
        if last:
            _succeed(s, job_id, exports, now)


def _record_done(
    s: Session,
    job_id: str,
    name: str,
    now: float,
    metrics: dict[str, Any],
    device: str | None,
    peak_rss_mb: float | None,
) -> None:
    st = s.get(Stage, (job_id, name))
    if st is None:
        raise NotFound(f"no stage {name} for job {job_id}")
    duration = now - st.started_at if st.started_at else None
    st.state = StageState.DONE.value
    st.progress = 1.0
    st.message = "done"
    st.finished_at = now
    st.duration_s = duration
    st.metrics = metrics
    st.device = device
    st.peak_rss_mb = peak_rss_mb
    st.pid = None
    s.add(outbox.event(job_id, "stage", f"stage {name} done in {duration or 0:.1f} s", now))


def _succeed(s: Session, job_id: str, exports: Sequence[ExportRecord], now: float) -> None:
    """running -> succeeded; with exports, the notification that they are ready."""
    job = s.get(Job, job_id)
    assert job is not None
    ok = move(
        s,
        job_id,
        JobState.RUNNING,
        JobState.SUCCEEDED,
        now,
        "job succeeded",
        finished_at=now,
        stage=None,
        worker=None,
    )
    if ok and exports:
        took = now - (job.started_at or job.created_at)
        text = exported_text(job.project, [Path(e.path) for e in exports], took)
        s.add(outbox.notification("exported", text, now, job_id))


def failed(
    store: Store,
    job_id: str,
    name: str,
    message: str,
    state: StageState,
    *,
    token: int | None = None,
) -> None:
    """The stage ended without success (`state`: failed or cancelled)."""
    now = time.time()
    with store.write() as s:
        guard(s, job_id, token)
        s.execute(
            update(Stage)
            .where(Stage.job_id == job_id, Stage.name == name)
            .values(state=state.value, message=message[:2000], finished_at=now, pid=None)
        )
