"""Jobs: creating them from requests, finding them, and what people ask of them
(cancel, retry)."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from daemon.ledger import outbox
from daemon.ledger.leases import move
from daemon.ledger.store import NotFound, RequestTaken, Store
from daemon.models import Job, Stage
from daemon.states import ACTIVE, JobState, StageState
from pipeline import STAGES


def new_job_id() -> str:
    return uuid.uuid4().hex[:8]


def request_key(content_hash: str, name: str, mtime_ns: int, size: int) -> str:
    """Identity of one request file as dropped: the same file seen by several daemons
    (even after one of them moved it) has the same key; a new drop has a new one."""
    return hashlib.sha256(f"{content_hash}|{name}|{mtime_ns}|{size}".encode()).hexdigest()


# -- creating ---------------------------------------------------------------------------


def create(
    store: Store,
    *,
    project: str,
    spec: dict[str, Any],
    request_hash: str,
    request_name: str,
    priority: int = 0,
    max_attempts: int = 3,
    job_id: str | None = None,
    request_key: str | None = None,
) -> Job:
    """Queue a new job. With request_key (the identity of the request file), a second
    daemon that reads the same file gets RequestTaken instead of a second job."""
    now = time.time()
    job_id = job_id or new_job_id()
    job = Job(
        id=job_id,
        project=project,
        spec={**spec, "job_id": job_id},
        request_hash=request_hash,
        request_name=request_name,
        state=JobState.QUEUED.value,
        priority=priority,
        attempts=0,
        max_attempts=max_attempts,
        cancel_requested=False,
        created_at=now,
        updated_at=now,
        lease_token=0,
        request_key=request_key,
    )
    try:
        with store.write() as s:
            _insert(s, job, now)
    except IntegrityError as exc:
        if request_key is not None and find_by_key(store, request_key) is not None:
            raise RequestTaken(request_name) from exc
        raise
    return job


def _insert(s: Session, job: Job, now: float) -> None:
    """The job, its pending stages and its `queued` event."""
    s.add(job)
    for seq, name in enumerate(STAGES):
        s.add(Stage(job_id=job.id, name=name, seq=seq, state=StageState.PENDING.value))
    s.add(outbox.event(job.id, "queued", f"job {job.id} queued for project {job.project}", now))
    s.flush()
    s.expunge(job)


# -- finding ----------------------------------------------------------------------------


def find_by_hash(store: Store, request_hash: str) -> list[Job]:
    with store.read() as s:
        jobs = s.scalars(
            select(Job).where(Job.request_hash == request_hash).order_by(Job.created_at)
        ).all()
        s.expunge_all()
        return list(jobs)


def find_by_key(store: Store, request_key: str) -> Job | None:
    with store.read() as s:
        job = s.scalar(select(Job).where(Job.request_key == request_key))
        if job is not None:
            s.expunge(job)
        return job


def get(store: Store, job_id: str) -> Job:
    with store.read() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        s.expunge(job)
        return job


def resolve(store: Store, ref: str) -> list[Job]:
    """A job id, a unique id prefix, or a project name (its active jobs, else its
    latest job)."""
    with store.read() as s:
        job = s.get(Job, ref)
        if job is not None:
            s.expunge(job)
            return [job]
        by_prefix = s.scalars(select(Job).where(Job.id.startswith(ref))).all()
        if len(by_prefix) == 1:
            s.expunge_all()
            return list(by_prefix)
        by_project = s.scalars(
            select(Job).where(Job.project == ref).order_by(Job.created_at.desc())
        ).all()
        s.expunge_all()
        if by_project:
            active = [j for j in by_project if j.state in ACTIVE]
            return active or [by_project[0]]
        if len(by_prefix) > 1:
            ids = ", ".join(j.id for j in by_prefix[:5])
            raise NotFound(f"{ref!r} matches several jobs ({ids}); give more of the id")
        raise NotFound(f"no job or project {ref!r} (see `dropmesh status`)")


def count_by_state(store: Store) -> dict[str, int]:
    with store.read() as s:
        rows = s.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        return {state: n for state, n in rows}


# -- cancel and retry -------------------------------------------------------------------


def request_cancel(store: Store, job_id: str) -> str:
    """Cancel a queued or waiting job at once; flag a running one for the daemon.
    Returns the resulting state."""
    now = time.time()
    with store.write() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        state = JobState(job.state)
        if state in (JobState.QUEUED, JobState.WAITING):
            move(s, job_id, state, JobState.CANCELLED, now, "cancelled", finished_at=now)
            return JobState.CANCELLED.value
        if state == JobState.RUNNING:
            s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
            s.add(outbox.event(job_id, "cancel", "cancel requested", now))
            return "cancelling"
        return state.value


def cancel_requested(store: Store, job_ids: Sequence[str]) -> set[str]:
    """Those of `job_ids` flagged for cancelling."""
    if not job_ids:
        return set()
    with store.read() as s:
        rows = s.scalars(
            select(Job.id).where(Job.id.in_(list(job_ids)), Job.cancel_requested.is_(True))
        ).all()
        return set(rows)


def retry(
    store: Store,
    job_id: str,
    *,
    from_stage: str | None = None,
    formats: Sequence[str] | None = None,
) -> list[str]:
    """Requeue a finished job from `from_stage` (default: its first unfinished
    stage, or `export` when only new formats are asked for). Returns the stages
    that will run again; their workspace folders must be cleared by the caller."""
    now = time.time()
    with store.write() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        state = JobState(job.state)
        if state in ACTIVE:
            raise ValueError(f"job {job_id} is {state.value}; only finished jobs can retry")
        if from_stage is None:
            from_stage = _first_unfinished(s, job_id, bool(formats))
        if from_stage not in STAGES:
            raise ValueError(f"unknown stage {from_stage!r}; stages: {', '.join(STAGES)}")
        rerun = list(STAGES[STAGES.index(from_stage) :])
        _requeue(s, job, rerun, formats, now)
        return rerun


def _requeue(
    s: Session, job: Job, rerun: list[str], formats: Sequence[str] | None, now: float
) -> None:
    """finished -> queued as a fresh job (no attempts, no error), with `formats` if
    given; the stages in `rerun` pending again."""
    spec = dict(job.spec)
    if formats:
        spec["formats"] = list(formats)
    move(
        s,
        job.id,
        JobState(job.state),
        JobState.QUEUED,
        now,
        f"retry from stage {rerun[0]}",
        spec=spec,
        attempts=0,
        cancel_requested=False,
        error=None,
        finished_at=None,
        next_attempt_at=None,
    )
    s.execute(
        update(Stage)
        .where(Stage.job_id == job.id, Stage.name.in_(rerun))
        .values(state=StageState.PENDING.value, progress=0.0, message="", attempt=0)
    )


def _first_unfinished(s: Session, job_id: str, new_formats: bool) -> str:
    """Where a retry starts by default: the first stage not done; when all are done,
    `export` for new formats, else from the start."""
    stages = {st.name: st for st in s.scalars(select(Stage).where(Stage.job_id == job_id))}
    pending = [n for n in STAGES if stages[n].state != StageState.DONE.value]
    return pending[0] if pending else ("export" if new_formats else STAGES[0])
