"""The ledger: every read and write of job state goes through this class.

Each state change is one guarded UPDATE (`WHERE id=? AND state=?`), so of two writers
racing for the same transition exactly one wins.

Several daemons may share one ledger (PostgreSQL). A claim is a lease: the job records
its owner (`worker`), the lease expiry, a heartbeat and a fencing token that grows by one
with every claim. Every write a daemon makes about a running job passes its token; when
the job is no longer running under that token (the lease expired and another daemon took
the job over) the write is refused with `Fenced` and changes nothing.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from daemon import db
from daemon.humanize import words
from daemon.listing import Listing
from daemon.models import Event, ExportFile, Job, Notification, Stage, Worker
from daemon.states import ACTIVE, JobState, StageState, check_transition
from pipeline import STAGES


class NotFound(Exception):
    pass


class Fenced(Exception):
    """A write about a running job came from a daemon that no longer holds its lease."""


class RequestTaken(Exception):
    """Another daemon already turned this request file into a job."""


@dataclass
class ExportRecord:
    path: Path
    format: str


class Ledger(Listing):
    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        # Several daemons may use this ledger at once (a server database, not a file).
        self.shared = not db.is_sqlite(engine)

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, *, create: bool = False) -> Ledger:
        """Open the ledger. With create=True (the daemon) a new one is created and
        migrated; otherwise (the CLI) it must exist already."""
        return cls(db.open_engine(url, create=create))

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
        request_key: str | None = None,
    ) -> Job:
        """Queue a new job. With request_key (the identity of the request file), a second
        daemon that reads the same file gets RequestTaken instead of a second job."""
        now = time.time()
        job_id = job_id or new_job_id()
        spec = {**spec, "job_id": job_id}
        try:
            return self._create_job(
                job_id,
                project,
                spec,
                request_hash,
                request_name,
                priority,
                max_attempts,
                request_key,
                now,
            )
        except IntegrityError as exc:
            if request_key is not None and self.find_by_key(request_key) is not None:
                raise RequestTaken(request_name) from exc
            raise

    def _create_job(
        self,
        job_id: str,
        project: str,
        spec: dict[str, Any],
        request_hash: str,
        request_name: str,
        priority: int,
        max_attempts: int,
        request_key: str | None,
        now: float,
    ) -> Job:
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
                lease_token=0,
                request_key=request_key,
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

    def find_by_key(self, request_key: str) -> Job | None:
        with self.read() as s:
            job = s.scalar(select(Job).where(Job.request_key == request_key))
            if job is not None:
                s.expunge(job)
            return job

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

    def transition(
        self,
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
        with self.write() as s:
            self._guard(s, job_id, token)
            return self._transition(s, job_id, src, dst, now, event, **values)

    def _guard(self, s: Session, job_id: str, token: int | None) -> None:
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

    def claim_next(
        self,
        worker: str,
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
        with self.write() as s:
            runnable = or_(
                Job.state == JobState.QUEUED.value,
                and_(Job.state == JobState.WAITING.value, Job.next_attempt_at <= now),
            )
            q = select(Job).where(runnable).order_by(Job.priority.desc(), Job.created_at).limit(5)
            if skip_next:
                seqs = [i for i, name in enumerate(STAGES) if name in skip_next]
                first_todo = (
                    select(func.min(Stage.seq))
                    .where(Stage.job_id == Job.id, Stage.state != StageState.DONE.value)
                    .scalar_subquery()
                )
                q = q.where(or_(first_todo.is_(None), first_todo.not_in(seqs)))
            if self.shared:
                q = q.with_for_update(skip_locked=True, of=Job)
            candidates = s.scalars(q).all()
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
                    host=worker.split(":", 1)[0],
                    heartbeat_at=now,
                    lease_expires_at=now + lease_s,
                    lease_token=Job.lease_token + 1,
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

    def heartbeat(
        self, leases: Mapping[str, int], worker: str, *, lease_s: float = 30.0
    ) -> set[str]:
        """Renew the leases {job_id: token} of `worker`; returns the jobs whose lease
        is lost (taken over by another daemon): their work must stop."""
        if not leases:
            return set()
        now = time.time()
        lost: set[str] = set()
        with self.write() as s:
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

    def recover(
        self,
        *,
        worker: str | None = None,
        stale_after_s: float | None = None,
        dead_workers: Collection[str] = (),
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
        with self.write() as s:
            q = select(Job).where(Job.state == JobState.RUNNING.value, or_(*conds))
            if self.shared:
                q = q.with_for_update(skip_locked=True)
            jobs = s.scalars(q).all()
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
                    lease_expires_at=None,
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

    def release(self, job_id: str, token: int, reason: str) -> bool:
        """Give a running job back to the queue (not counted as an attempt), e.g. for a
        daemon with a GPU to run its next stage."""
        with self.write() as s:
            self._guard(s, job_id, token)
            job = s.get(Job, job_id)
            assert job is not None
            return self._transition(
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

    def running_stage_pids(
        self, workers: Collection[str] | None = None
    ) -> list[tuple[str, str, int]]:
        """(job, stage, pid) of running stages; with `workers`, only of jobs they ran."""
        with self.read() as s:
            q = select(Stage.job_id, Stage.name, Stage.pid).where(
                Stage.state == StageState.RUNNING.value, Stage.pid.is_not(None)
            )
            if workers is not None:
                q = q.join(Job, Job.id == Stage.job_id).where(Job.worker.in_(list(workers)))
            rows = s.execute(q).all()
            return [(j, n, int(p)) for j, n, p in rows if p is not None]

    def running_workers(self) -> set[str]:
        """Owners of the leases of running jobs."""
        with self.read() as s:
            rows = s.scalars(
                select(Job.worker).where(
                    Job.state == JobState.RUNNING.value, Job.worker.is_not(None)
                )
            ).all()
            return {w for w in rows if w}

    # -- daemons ---------------------------------------------------------------------

    def register_worker(
        self, worker: str, *, cuda_devices: int, max_jobs: int, gpu_stages: str
    ) -> None:
        host, pid = worker.split(":")[:2]
        now = time.time()
        with self.write() as s:
            w = s.get(Worker, worker)
            if w is None:
                w = Worker(id=worker, host=host, pid=int(pid), started_at=now)
                s.add(w)
            w.heartbeat_at = now
            w.cuda_devices = cuda_devices
            w.max_jobs = max_jobs
            w.gpu_stages = gpu_stages

    def worker_heartbeat(self, worker: str) -> bool:
        """False when the daemon's row is gone (removed as dead): register again."""
        with self.write() as s:
            res = s.execute(
                update(Worker).where(Worker.id == worker).values(heartbeat_at=time.time())
            )
            return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    def unregister_worker(self, worker: str) -> None:
        with self.write() as s:
            s.execute(delete(Worker).where(Worker.id == worker))

    def workers(self) -> list[Worker]:
        with self.read() as s:
            rows = list(s.scalars(select(Worker).order_by(Worker.host, Worker.started_at)).all())
            s.expunge_all()
            return rows

    def gpu_worker_alive(self, stale_after_s: float, *, now: float | None = None) -> bool:
        """Whether a live daemon with a CUDA device shares this ledger."""
        now = time.time() if now is None else now
        with self.read() as s:
            n = s.scalar(
                select(func.count())
                .select_from(Worker)
                .where(Worker.cuda_devices > 0, Worker.heartbeat_at >= now - stale_after_s)
            )
            return bool(n)

    def prune_workers(self, older_than_s: float) -> int:
        """Forget daemons silent for that long (killed without a clean stop)."""
        with self.write() as s:
            res = s.execute(delete(Worker).where(Worker.heartbeat_at < time.time() - older_than_s))
            return int(res.rowcount or 0)  # type: ignore[attr-defined]

    # -- stages ----------------------------------------------------------------------

    def stage_started(
        self, job_id: str, name: str, pid: int, attempt: int, *, token: int | None = None
    ) -> None:
        now = time.time()
        with self.write() as s:
            self._guard(s, job_id, token)
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

    def stage_progress(
        self, job_id: str, name: str, fraction: float, message: str, *, token: int | None = None
    ) -> None:
        with self.write() as s:
            self._guard(s, job_id, token)
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
        token: int | None = None,
    ) -> None:
        """Record a finished stage; for the last stage also the exports, the success
        and its notification, all in one transaction."""
        now = time.time()
        with self.write() as s:
            self._guard(s, job_id, token)
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
                            body=f"{files}\nin {Path(exports[0].path).parent}\ntook {words(took)}",
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

    def stage_failed(
        self,
        job_id: str,
        name: str,
        message: str,
        state: StageState,
        *,
        token: int | None = None,
    ) -> None:
        now = time.time()
        with self.write() as s:
            self._guard(s, job_id, token)
            s.execute(
                update(Stage)
                .where(Stage.job_id == job_id, Stage.name == name)
                .values(state=state.value, message=message[:2000], finished_at=now, pid=None)
            )

    def fail(self, job_id: str, stage: str, message: str, *, token: int | None = None) -> bool:
        """running -> failed, with its notification."""
        now = time.time()
        with self.write() as s:
            self._guard(s, job_id, token)
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

    def schedule_retry(
        self, job_id: str, stage: str, message: str, delay_s: float, *, token: int | None = None
    ) -> bool:
        now = time.time()
        return self.transition(
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

    def deliver_notifications(self, send: Callable[[Notification], bool], limit: int = 50) -> int:
        """Claim pending notifications (mark them sent), then show them and record whether
        they were shown. Claimed first, so a crash while one is being shown never shows it
        twice; on a shared ledger claims take FOR UPDATE SKIP LOCKED, so of several daemons
        exactly one shows each."""
        now = time.time()
        with self.write() as s:
            q = (
                select(Notification)
                .where(Notification.sent_at.is_(None))
                .order_by(Notification.id)
                .limit(limit)
            )
            if self.shared:
                q = q.with_for_update(skip_locked=True)
            claimed = list(s.scalars(q).all())
            for n in claimed:
                self._mark(s, n, None, now)
            s.flush()
            s.expunge_all()
        for n in claimed:
            self.record_shown(n.id, bool(send(n)))
        return len(claimed)

    def mark_notified(self, notification_id: int, shown: bool | None) -> bool:
        """Mark a notification sent; False if it already was."""
        now = time.time()
        with self.write() as s:
            n = s.get(Notification, notification_id)
            if n is None or n.sent_at is not None:
                return False
            self._mark(s, n, shown, now)
            return True

    def record_shown(self, notification_id: int, shown: bool) -> None:
        with self.write() as s:
            s.execute(
                update(Notification).where(Notification.id == notification_id).values(shown=shown)
            )

    def _mark(self, s: Session, n: Notification, shown: bool | None, now: float) -> None:
        n.sent_at = now
        n.shown = shown
        if n.kind == "exported" and n.job_id:
            s.execute(
                update(ExportFile)
                .where(ExportFile.job_id == n.job_id, ExportFile.notified_at.is_(None))
                .values(notified_at=now)
            )


def new_job_id() -> str:
    return uuid.uuid4().hex[:8]


def _event(
    job_id: str | None, kind: str, message: str, at: float, data: dict[str, Any] | None = None
) -> Event:
    return Event(job_id=job_id, at=at, kind=kind, message=message, data=data or {})


def request_key(content_hash: str, name: str, mtime_ns: int, size: int) -> str:
    """Identity of one request file as dropped: the same file seen by several daemons
    (even after one of them moved it) has the same key; a new drop has a new one."""
    return hashlib.sha256(f"{content_hash}|{name}|{mtime_ns}|{size}".encode()).hexdigest()


__all__ = [
    "ExportRecord",
    "Fenced",
    "Ledger",
    "NotFound",
    "RequestTaken",
    "new_job_id",
    "request_key",
]
