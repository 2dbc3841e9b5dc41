"""Leases: who runs a job, and the guarded state changes that go with that.

Every state change is one guarded UPDATE (`WHERE id=? AND state=?`), so of two writers
racing for the same transition exactly one wins.

A claim is a lease: the job records its owner (`jobs.worker`, a DaemonId), the lease
expiry, a heartbeat and a fencing token that grows by one with every claim. Every write a
daemon makes about a running job passes its token; when the job is no longer running
under that token (the lease expired and another daemon took the job over) the write is
refused with `Fenced` and changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, or_, select, update
from sqlalchemy.orm import Session

from daemon.ledger import outbox
from daemon.ledger.store import DaemonId, Fenced, Store
from daemon.models import Job, Stage
from daemon.notify import failed_text
from daemon.states import JobState, StageState, check_transition
from pipeline import STAGES

# Runnable jobs looked at per claim: the first whose guarded update wins is taken.
CLAIM_CANDIDATES = 5


def guard(s: Session, job_id: str, token: int | None) -> None:
    """Lock the job's row and check that the lease `token` is still the job's
    running lease; raise Fenced (the transaction rolls back) when it is not."""
    if token is None:
        return
    row = s.execute(
        select(Job.state, Job.lease_token).where(Job.id == job_id).with_for_update()
    ).first()
    if row is None or row[0] != JobState.RUNNING.value or row[1] != token:
        raise Fenced(
            f"job {job_id}: lease {token} is no longer held"
            + (f" (now {row[0]}, lease {row[1]})" if row is not None else "")
        )


def move(
    s: Session,
    job_id: str,
    src: JobState,
    dst: JobState,
    now: float,
    event: str | None,
    **values: Any,
) -> bool:
    """The guarded update inside an open transaction, with its event; False if the job
    was no longer in `src`."""
    check_transition(src, dst)
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == src.value)
        .values(state=dst.value, updated_at=now, **values)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        return False
    s.add(outbox.event(job_id, dst.value, event or f"{src.value} -> {dst.value}", now))
    return True


def transition(
    store: Store,
    job_id: str,
    src: JobState,
    dst: JobState,
    *,
    event: str | None = None,
    token: int | None = None,
    **values: Any,
) -> bool:
    """Guarded state change; False if the job was no longer in `src`. With the
    daemon's lease token: Fenced if the lease is no longer held."""
    check_transition(src, dst)
    now = time.time()
    with store.write() as s:
        guard(s, job_id, token)
        return move(s, job_id, src, dst, now, event, **values)


# -- claiming ---------------------------------------------------------------------------


def claim_next(
    store: Store,
    worker: DaemonId,
    *,
    now: float | None = None,
    lease_s: float = 30.0,
    skip_next: Collection[str] = (),
) -> Job | None:
    """Move the most urgent runnable job to running under a new lease of `worker`
    and return it (its lease_token is the fencing token for every later write).
    Jobs whose next unfinished stage is in `skip_next` are left to other daemons.

    PostgreSQL: the candidates are locked with FOR UPDATE SKIP LOCKED, so daemons
    claiming at once take different jobs without waiting on each other. SQLite:
    BEGIN IMMEDIATE serialises writers; the guarded update decides either way."""
    now = time.time() if now is None else now
    with store.write() as s:
        for job in s.scalars(_candidates(store, now, skip_next)).all():
            if job.cancel_requested:
                _cancel_before_claim(s, job, now)
                continue
            if _start_lease(s, job, worker, now, lease_s):
                s.flush()
                s.refresh(job)
                s.expunge(job)
                return job
    return None


def _candidates(store: Store, now: float, skip_next: Collection[str]) -> Select[Job]:
    """The most urgent runnable jobs: priority first, then age."""
    runnable = or_(
        Job.state == JobState.QUEUED.value,
        and_(Job.state == JobState.WAITING.value, Job.next_attempt_at <= now),
    )
    q = (
        select(Job)
        .where(runnable)
        .order_by(Job.priority.desc(), Job.created_at)
        .limit(CLAIM_CANDIDATES)
    )
    if skip_next:
        q = q.where(_next_stage_not_in(skip_next))
    if store.shared:
        q = q.with_for_update(skip_locked=True, of=Job)
    return q


def _next_stage_not_in(names: Collection[str]) -> ColumnElement[bool]:
    """The job's first unfinished stage (none when all are done) is not one of `names`."""
    seqs = [i for i, name in enumerate(STAGES) if name in names]
    first_todo = (
        select(func.min(Stage.seq))
        .where(Stage.job_id == Job.id, Stage.state != StageState.DONE.value)
        .scalar_subquery()
    )
    return or_(first_todo.is_(None), first_todo.not_in(seqs))


def _cancel_before_claim(s: Session, job: Job, now: float) -> None:
    # Flagged while running, then requeued (retry backoff, daemon stopped or died)
    # before the daemon acted on the flag.
    move(
        s,
        job.id,
        JobState(job.state),
        JobState.CANCELLED,
        now,
        "cancelled (requested while it was running)",
        finished_at=now,
        cancel_requested=False,
    )


def _start_lease(s: Session, job: Job, worker: DaemonId, now: float, lease_s: float) -> bool:
    """queued/waiting -> running under a new lease of `worker`, with the next token."""
    return move(
        s,
        job.id,
        JobState(job.state),
        JobState.RUNNING,
        now,
        f"attempt {job.attempts + 1} of {job.max_attempts} started by {worker}",
        worker=worker,
        host=worker.split(":", 1)[0],
        heartbeat_at=now,
        lease_expires_at=now + lease_s,
        lease_token=Job.lease_token + 1,
        attempts=job.attempts + 1,
        started_at=job.started_at or now,
        next_attempt_at=None,
        error=None,
    )


# -- holding ----------------------------------------------------------------------------


def heartbeat(
    store: Store, leases: Mapping[str, int], worker: DaemonId, *, lease_s: float = 30.0
) -> set[str]:
    """Renew the leases {job_id: token} of `worker`; returns the jobs whose lease
    is lost (taken over by another daemon): their work must stop."""
    if not leases:
        return set()
    now = time.time()
    lost: set[str] = set()
    with store.write() as s:
        for job_id, token in leases.items():
            res = s.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.lease_token == token,
                    Job.state == JobState.RUNNING.value,
                )
                .values(heartbeat_at=now, lease_expires_at=now + lease_s)
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                lost.add(job_id)
    return lost


def running_workers(store: Store) -> set[DaemonId]:
    """Owners of the leases of running jobs."""
    with store.read() as s:
        rows = s.scalars(
            select(Job.worker).where(Job.state == JobState.RUNNING.value, Job.worker.is_not(None))
        ).all()
        return {w for w in rows if w}


# -- ending -----------------------------------------------------------------------------


def recover(
    store: Store,
    *,
    worker: DaemonId | None = None,
    stale_after_s: float | None = None,
    dead_workers: Collection[DaemonId] = (),
) -> list[str]:
    """Requeue running jobs whose daemon is gone: with `worker`, those of any other
    daemon (for a daemon alone on its ledger); those of `dead_workers`; with
    stale_after_s, any whose heartbeat is that old (its lease expired)."""
    now = time.time()
    conds = []
    if worker is not None:
        conds.append(or_(Job.worker.is_(None), Job.worker != worker))
    if dead_workers:
        conds.append(Job.worker.in_(list(dead_workers)))
    if stale_after_s is not None:
        conds.append(or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < now - stale_after_s))
    if not conds:
        return []
    requeued: list[str] = []
    with store.write() as s:
        q = select(Job).where(Job.state == JobState.RUNNING.value, or_(*conds))
        if store.shared:
            q = q.with_for_update(skip_locked=True)
        for job in s.scalars(q).all():
            if _requeue_orphan(s, job, now):
                requeued.append(job.id)
    return requeued


def _requeue_orphan(s: Session, job: Job, now: float) -> bool:
    """running -> queued for a job whose daemon is gone; its running stage becomes
    pending again. The interrupted attempt is not counted."""
    ok = move(
        s,
        job.id,
        JobState.RUNNING,
        JobState.QUEUED,
        now,
        f"resumed: the daemon running it ({job.worker}) stopped; "
        f"continuing at stage {job.stage or STAGES[0]}",
        worker=None,
        lease_expires_at=None,
        attempts=max(job.attempts - 1, 0),
    )
    if ok:
        s.execute(
            update(Stage)
            .where(Stage.job_id == job.id, Stage.state == StageState.RUNNING.value)
            .values(state=StageState.PENDING.value, message="interrupted", pid=None)
        )
    return ok


def release(store: Store, job_id: str, token: int, reason: str) -> bool:
    """Give a running job back to the queue (not counted as an attempt), e.g. for a
    daemon with a GPU to run its next stage."""
    with store.write() as s:
        guard(s, job_id, token)
        job = s.get(Job, job_id)
        assert job is not None
        return move(
            s,
            job_id,
            JobState.RUNNING,
            JobState.QUEUED,
            time.time(),
            reason,
            worker=None,
            lease_expires_at=None,
            attempts=max(job.attempts - 1, 0),
        )


def schedule_retry(
    store: Store,
    job_id: str,
    stage: str,
    message: str,
    delay_s: float,
    *,
    token: int | None = None,
) -> bool:
    """running -> waiting: the lease ends and the job is runnable again in `delay_s`."""
    now = time.time()
    return transition(
        store,
        job_id,
        JobState.RUNNING,
        JobState.WAITING,
        token=token,
        event=f"stage {stage} failed ({message}); retrying in {delay_s:.0f} s",
        next_attempt_at=now + delay_s,
        error=f"{stage}: {message}",
        worker=None,
        lease_expires_at=None,
    )


def fail(store: Store, job_id: str, stage: str, message: str, *, token: int | None = None) -> bool:
    """running -> failed, with its notification."""
    now = time.time()
    with store.write() as s:
        guard(s, job_id, token)
        job = s.get(Job, job_id)
        ok = move(
            s,
            job_id,
            JobState.RUNNING,
            JobState.FAILED,
            now,
            f"failed at stage {stage}: {message}",
            error=f"{stage}: {message}",
            finished_at=now,
            worker=None,
        )
        if ok and job is not None:
            s.add(
                outbox.notification("failed", failed_text(job.project, stage, message), now, job_id)
            )
        return ok
