"""The ledger: every read and write of job state goes through this class.

Each state change is one guarded UPDATE (`WHERE id=? AND state=?`), so of two writers
racing for the same transition exactly one wins.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, and_, delete, func, or_, select, update
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import Session

from daemon import db
from daemon.models import Event, ExportFile, Job, Notification, Stage
from daemon.states import ACTIVE, JobState, StageState, check_transition
from pipeline import STAGES


class NotFound(Exception):
    pass


@dataclass
class ExportRecord:
    path: Path
    format: str


class Ledger:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, *, create: bool = False) -> Ledger:
        """Open the ledger. With create=True (the daemon) a new one is created and
        migrated; otherwise (the CLI) it must exist already."""
        sqlite_path = _sqlite_path(url)
        if sqlite_path is not None and not sqlite_path.exists():
            if not create:
                raise db.LedgerError(
                    f"no ledger at {sqlite_path}: start the daemon there first "
                    "(`dropmesh run`), or pass --home"
                )
            sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        engine = db.make_engine(url)
        try:
            head = db.SCHEMA_HEAD
            current = db.current_revision(engine)
            if current != head:
                if not create:
                    raise db.LedgerError(
                        f"the ledger at {url} is at schema {current}, this dropmesh needs "
                        f"{head}: start the daemon once to migrate it"
                    )
                if current is None and db.has_tables(engine):
                    raise db.LedgerError(
                        f"{url} holds tables that are not a dropmesh ledger; refusing to "
                        "write over them"
                    )
                db.upgrade(engine)
        except DatabaseError as exc:
            raise db.LedgerError(
                f"the ledger at {sqlite_path or url} cannot be read ({exc.orig}). "
                "It may be corrupt: stop the daemon, move the file aside, and restore it "
                "from a backup, or try `sqlite3 jobs.db .recover`; dropmesh will not "
                "start an empty ledger over it"
            ) from exc
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def write(self) -> Iterator[Session]:
        with Session(self.engine) as s, s.begin():
            yield s

    @contextmanager
    def read(self) -> Iterator[Session]:
        conn = self.engine.connect().execution_options(sqlite_begin="DEFERRED")
        try:
            with Session(bind=conn) as s, s.begin():
                yield s
        finally:
            conn.close()

    # -- jobs ------------------------------------------------------------------------

    def create_job(
        self,
        *,
        project: str,
        spec: dict[str, Any],
        request_hash: str,
        request_name: str,
        priority: int = 0,
        max_attempts: int = 3,
        job_id: str | None = None,
    ) -> Job:
        now = time.time()
        job_id = job_id or new_job_id()
        spec = {**spec, "job_id": job_id}
        with self.write() as s:
            job = Job(
                id=job_id,
                project=project,
                spec=spec,
                request_hash=request_hash,
                request_name=request_name,
                state=JobState.QUEUED.value,
                priority=priority,
                attempts=0,
                max_attempts=max_attempts,
                cancel_requested=False,
                created_at=now,
                updated_at=now,
            )
            s.add(job)
            for seq, name in enumerate(STAGES):
                s.add(Stage(job_id=job_id, name=name, seq=seq, state=StageState.PENDING.value))
            s.add(_event(job_id, "queued", f"job {job_id} queued for project {project}", now))
            s.flush()
            s.expunge(job)
        return job

    def find_by_hash(self, request_hash: str) -> list[Job]:
        with self.read() as s:
            jobs = s.scalars(
                select(Job).where(Job.request_hash == request_hash).order_by(Job.created_at)
            ).all()
            s.expunge_all()
            return list(jobs)

    def get(self, job_id: str) -> Job:
        with self.read() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise NotFound(f"no job {job_id!r}")
            s.expunge(job)
            return job

    def resolve(self, ref: str) -> list[Job]:
        """A job id, a unique id prefix, or a project name (its active jobs, else its
        latest job)."""
        with self.read() as s:
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

    def list_jobs(self, states: Sequence[str] | None = None, limit: int | None = None) -> list[Any]:
        """Job rows (read-only, attribute access like Job), newest first."""
        with self.read() as s:
            q = select(*Job.__table__.c).order_by(Job.created_at.desc())
            if states:
                q = q.where(Job.state.in_(list(states)))
            if limit:
                q = q.limit(limit)
            return list(s.execute(q).all())

    def count_by_state(self) -> dict[str, int]:
        with self.read() as s:
            rows = s.execute(select(Job.state, func.count()).group_by(Job.state)).all()
            return {state: n for state, n in rows}

    def stages(self, job_id: str) -> list[Stage]:
        with self.read() as s:
            rows = s.scalars(select(Stage).where(Stage.job_id == job_id).order_by(Stage.seq))
            out = list(rows.all())
            s.expunge_all()
            return out

    def stages_for(self, job_ids: Sequence[str], *, every: bool = False) -> dict[str, list[Any]]:
        """Stage rows (read-only, attribute access like Stage) per job; with every=True
        all jobs' stages in one scan, for listings of the whole ledger."""
        out: dict[str, list[Any]] = {j: [] for j in job_ids}
        if not job_ids:
            return out
        q = select(*Stage.__table__.c).order_by(Stage.job_id, Stage.seq)
        if not every:
            q = q.where(Stage.job_id.in_(list(job_ids)))
        with self.read() as s:
            for row in s.execute(q):
                if row.job_id in out:
                    out[row.job_id].append(row)
        return out

    def transition(
        self, job_id: str, src: JobState, dst: JobState, *, event: str | None = None, **values: Any
    ) -> bool:
        """Guarded state change; False if the job was no longer in `src`."""
        check_transition(src, dst)
        now = time.time()
        with self.write() as s:
            return self._transition(s, job_id, src, dst, now, event, **values)

    def _transition(
        self,
        s: Session,
        job_id: str,
        src: JobState,
        dst: JobState,
        now: float,
        event: str | None,
        **values: Any,
    ) -> bool:
        check_transition(src, dst)
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == src.value)
            .values(state=dst.value, updated_at=now, **values)
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            return False
        s.add(_event(job_id, dst.value, event or f"{src.value} -> {dst.value}", now))
        return True

    def claim_next(self, worker: str, *, now: float | None = None) -> Job | None:
        """Move the most urgent runnable job to running and return it."""
        now = time.time() if now is None else now
        with self.write() as s:
            runnable = or_(
                Job.state == JobState.QUEUED.value,
                and_(Job.state == JobState.WAITING.value, Job.next_attempt_at <= now),
            )
            candidates = s.scalars(
                select(Job).where(runnable).order_by(Job.priority.desc(), Job.created_at).limit(5)
            ).all()
            for job in candidates:
                src = JobState(job.state)
                if job.cancel_requested:
                    # Flagged while running, then requeued (retry backoff, daemon
                    # stopped or died) before the daemon acted on the flag.
                    self._transition(
                        s,
                        job.id,
                        src,
                        JobState.CANCELLED,
                        now,
                        "cancelled (requested while it was running)",
                        finished_at=now,
                        cancel_requested=False,
                    )
                    continue
                ok = self._transition(
                    s,
                    job.id,
                    src,
                    JobState.RUNNING,
                    now,
                    f"attempt {job.attempts + 1} of {job.max_attempts} started by {worker}",
                    worker=worker,
                    heartbeat_at=now,
                    attempts=job.attempts + 1,
                    started_at=job.started_at or now,
                    next_attempt_at=None,
                    error=None,
                )
                if ok:
                    s.flush()
                    s.refresh(job)
                    s.expunge(job)
                    return job
        return None

    def heartbeat(self, job_ids: Sequence[str], worker: str) -> None:
        if not job_ids:
            return
        with self.write() as s:
            s.execute(
                update(Job)
                .where(Job.id.in_(list(job_ids)), Job.worker == worker)
                .values(heartbeat_at=time.time())
            )

    def recover(
        self, *, worker: str | None = None, stale_after_s: float | None = None
    ) -> list[str]:
        """Requeue running jobs whose daemon is gone: those of `worker` (a previous run
        of this daemon) or, with stale_after_s, any whose heartbeat is that old."""
        now = time.time()
        conds = []
        if worker is not None:
            conds.append(Job.worker != worker)
        if stale_after_s is not None:
            conds.append(Job.heartbeat_at < now - stale_after_s)
        if not conds:
            return []
        requeued: list[str] = []
        with self.write() as s:
            jobs = s.scalars(
                select(Job).where(Job.state == JobState.RUNNING.value, or_(*conds))
            ).all()
            for job in jobs:
                ok = self._transition(
                    s,
                    job.id,
                    JobState.RUNNING,
                    JobState.QUEUED,
                    now,
                    f"resumed: the daemon running it ({job.worker}) stopped; "
                    f"continuing at stage {job.stage or STAGES[0]}",
                    worker=None,
                    attempts=max(job.attempts - 1, 0),
                )
                if ok:
                    s.execute(
                        update(Stage)
                        .where(Stage.job_id == job.id, Stage.state == StageState.RUNNING.value)
                        .values(state=StageState.PENDING.value, message="interrupted", pid=None)
                    )
                    requeued.append(job.id)
        return requeued

    def running_stage_pids(self) -> list[tuple[str, str, int]]:
        with self.read() as s:
            rows = s.execute(
                select(Stage.job_id, Stage.name, Stage.pid).where(
                    Stage.state == StageState.RUNNING.value, Stage.pid.is_not(None)
                )
            ).all()
            return [(j, n, int(p)) for j, n, p in rows if p is not None]

    # -- stages ----------------------------------------------------------------------

    def stage_started(self, job_id: str, name: str, pid: int, attempt: int) -> None:
        now = time.time()
        with self.write() as s:
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
            s.add(_event(job_id, "stage", f"stage {name} started (pid {pid})", now))

    def stage_progress(self, job_id: str, name: str, fraction: float, message: str) -> None:
        with self.write() as s:
            s.execute(
                update(Stage)
                .where(Stage.job_id == job_id, Stage.name == name)
                .values(progress=max(0.0, min(1.0, fraction)), message=message[:500])
            )

    def stage_finished(
        self,
        job_id: str,
        name: str,
        *,
        metrics: dict[str, Any],
        device: str | None,
        peak_rss_mb: float | None,
        exports: Sequence[ExportRecord] = (),
        last: bool = False,
        notify_title: str = "",
    ) -> None:
        """Record a finished stage; for the last stage also the exports, the success
        and its notification, all in one transaction."""
        now = time.time()
        with self.write() as s:
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
            s.add(_event(job_id, "stage", f"stage {name} done in {duration or 0:.1f} s", now))
            if exports:
                self._add_exports(s, job_id, exports, now)
            if last:
                job = s.get(Job, job_id)
                assert job is not None
                ok = self._transition(
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
                    files = ", ".join(Path(e.path).name for e in exports)
                    took = now - (job.started_at or job.created_at)
                    s.add(
                        Notification(
                            job_id=job_id,
                            kind="exported",
                            title=notify_title or f"dropmesh: {job.project} is ready",
                            body=f"{files}\nin {Path(exports[0].path).parent}\n"
                            f"took {_human_duration(took)}",
                            created_at=now,
                        )
                    )

    def _add_exports(
        self, s: Session, job_id: str, exports: Sequence[ExportRecord], now: float
    ) -> None:
        for e in exports:
            path = Path(e.path)
            data = path.read_bytes()
            existing = s.scalar(
                select(ExportFile).where(ExportFile.job_id == job_id, ExportFile.path == str(path))
            )
            if existing is None:
                existing = ExportFile(job_id=job_id, path=str(path), created_at=now)
                s.add(existing)
            existing.format = e.format
            existing.bytes = len(data)
            existing.sha256 = hashlib.sha256(data).hexdigest()
            existing.created_at = now
            existing.notified_at = None

    def stage_failed(self, job_id: str, name: str, message: str, state: StageState) -> None:
        now = time.time()
        with self.write() as s:
            s.execute(
                update(Stage)
                .where(Stage.job_id == job_id, Stage.name == name)
                .values(state=state.value, message=message[:2000], finished_at=now, pid=None)
            )

    def fail(self, job_id: str, stage: str, message: str) -> bool:
        """running -> failed, with its notification."""
        now = time.time()
        with self.write() as s:
            job = s.get(Job, job_id)
            ok = self._transition(
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
                    Notification(
                        job_id=job_id,
                        kind="failed",
                        title=f"dropmesh: {job.project} failed",
                        body=f"stage {stage}: {message}",
                        created_at=now,
                    )
                )
            return ok

    # -- cancel / retry --------------------------------------------------------------

    def request_cancel(self, job_id: str) -> str:
        """Cancel a queued or waiting job at once; flag a running one for the daemon.
        Returns the resulting state."""
        now = time.time()
        with self.write() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise NotFound(f"no job {job_id!r}")
            state = JobState(job.state)
            if state in (JobState.QUEUED, JobState.WAITING):
                self._transition(
                    s, job_id, state, JobState.CANCELLED, now, "cancelled", finished_at=now
                )
                return JobState.CANCELLED.value
            if state == JobState.RUNNING:
                s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
                s.add(_event(job_id, "cancel", "cancel requested", now))
                return "cancelling"
            return state.value

    def cancel_requested(self, job_ids: Sequence[str]) -> set[str]:
        if not job_ids:
            return set()
        with self.read() as s:
            rows = s.scalars(
                select(Job.id).where(Job.id.in_(list(job_ids)), Job.cancel_requested.is_(True))
            ).all()
            return set(rows)

    def retry(
        self,
        job_id: str,
        *,
        from_stage: str | None = None,
        formats: Sequence[str] | None = None,
    ) -> list[str]:
        """Requeue a finished job from `from_stage` (default: its first unfinished
        stage, or `export` when only new formats are asked for). Returns the stages
        that will run again; their workspace folders must be cleared by the caller."""
        now = time.time()
        with self.write() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise NotFound(f"no job {job_id!r}")
            state = JobState(job.state)
            if state in ACTIVE:
                raise ValueError(f"job {job_id} is {state.value}; only finished jobs can retry")
            stages = {st.name: st for st in s.scalars(select(Stage).where(Stage.job_id == job_id))}
            if from_stage is None:
                pending = [n for n in STAGES if stages[n].state != StageState.DONE.value]
                from_stage = pending[0] if pending else ("export" if formats else STAGES[0])
            if from_stage not in STAGES:
                raise ValueError(f"unknown stage {from_stage!r}; stages: {', '.join(STAGES)}")
            rerun = list(STAGES[STAGES.index(from_stage) :])
            spec = dict(job.spec)
            if formats:
                spec["formats"] = list(formats)
            self._transition(
                s,
                job_id,
                state,
                JobState.QUEUED,
                now,
                f"retry from stage {from_stage}",
                spec=spec,
                attempts=0,
                cancel_requested=False,
                error=None,
                finished_at=None,
                next_attempt_at=None,
            )
            s.execute(
                update(Stage)
                .where(Stage.job_id == job_id, Stage.name.in_(rerun))
                .values(state=StageState.PENDING.value, progress=0.0, message="", attempt=0)
            )
            return rerun

    def schedule_retry(self, job_id: str, stage: str, message: str, delay_s: float) -> bool:
        now = time.time()
        return self.transition(
            job_id,
            JobState.RUNNING,
            JobState.WAITING,
            event=f"stage {stage} failed ({message}); retrying in {delay_s:.0f} s",
            next_attempt_at=now + delay_s,
            error=f"{stage}: {message}",
            worker=None,
        )

    # -- events, exports, notifications ---------------------------------------------

    def add_event(
        self, job_id: str | None, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        with self.write() as s:
            s.add(_event(job_id, kind, message, time.time(), data))

    def reject(self, request_name: str, message: str, notify: bool = True) -> None:
        now = time.time()
        with self.write() as s:
            s.add(_event(None, "rejected", f"{request_name}: {message}", now))
            if notify:
                s.add(
                    Notification(
                        kind="rejected",
                        title=f"dropmesh: request {request_name} rejected",
                        body=message,
                        created_at=now,
                    )
                )

    def events(self, job_id: str | None, after_id: int = 0, limit: int = 1000) -> list[Event]:
        with self.read() as s:
            q = select(Event).where(Event.id > after_id).order_by(Event.id).limit(limit)
            if job_id is not None:
                q = q.where(Event.job_id == job_id)
            rows = list(s.scalars(q).all())
            s.expunge_all()
            return rows

    def exports(
        self, project: str | None = None, job_ids: Sequence[str] | None = None
    ) -> list[tuple[ExportFile, str]]:
        with self.read() as s:
            q = (
                select(ExportFile, Job.project)
                .join(Job, Job.id == ExportFile.job_id)
                .order_by(ExportFile.created_at.desc(), ExportFile.id)
            )
            if project:
                q = q.where(Job.project == project)
            if job_ids is not None:
                q = q.where(ExportFile.job_id.in_(list(job_ids)))
            rows = [(e, p) for e, p in s.execute(q).all()]
            s.expunge_all()
            return rows

    def pending_notifications(self, limit: int = 50) -> list[Notification]:
        with self.read() as s:
            rows = list(
                s.scalars(
                    select(Notification)
                    .where(Notification.sent_at.is_(None))
                    .order_by(Notification.id)
                    .limit(limit)
                ).all()
            )
            s.expunge_all()
            return rows

    def mark_notified(self, notification_id: int, shown: bool | None) -> bool:
        """Mark a notification sent; False if it already was. The daemon marks it before
        handing it to the desktop (shown=None) and records the outcome with
        `record_shown`, so a crash in between can never show it twice."""
        now = time.time()
        with self.write() as s:
            n = s.get(Notification, notification_id)
            if n is None or n.sent_at is not None:
                return False
            n.sent_at = now
            n.shown = shown
            if n.kind == "exported" and n.job_id:
                s.execute(
                    update(ExportFile)
                    .where(ExportFile.job_id == n.job_id, ExportFile.notified_at.is_(None))
                    .values(notified_at=now)
                )
            return True

    def record_shown(self, notification_id: int, shown: bool) -> None:
        with self.write() as s:
            s.execute(
                update(Notification).where(Notification.id == notification_id).values(shown=shown)
            )

    def delete_job(self, job_id: str) -> None:
        with self.write() as s:
            for model in (Stage, ExportFile, Notification):
                s.execute(delete(model).where(model.job_id == job_id))
            s.execute(delete(Job).where(Job.id == job_id))


def new_job_id() -> str:
    return uuid.uuid4().hex[:8]


def _event(
    job_id: str | None, kind: str, message: str, at: float, data: dict[str, Any] | None = None
) -> Event:
    return Event(job_id=job_id, at=at, kind=kind, message=message, data=data or {})


def _sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[1] if "///" in url else ""
    return Path(path) if path and path != ":memory:" else None


def _human_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


__all__ = ["ExportRecord", "Ledger", "NotFound", "OperationalError", "new_job_id"]
