"""What the dashboard reads from the ledger, shaped as JSON.

Listings go through SQLAlchemy Core (daemon/schema.py's tables), one page of jobs and
only that page's stages at a time, so the jobs page costs the same with ten or ten
thousand jobs in the ledger.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import case, func, or_, select

from daemon.listing import Listing
from daemon.progress import iso, job_progress, seconds_left
from daemon.schema import events, exports, jobs, stages
from daemon.states import ACTIVE, JobState, StageState

PER_PAGE_MAX = 200
STATES = [s.value for s in JobState]


def stage_json(s: Any, now: float) -> dict[str, Any]:
    duration = s.duration_s
    if s.state == StageState.RUNNING.value and s.started_at:
        duration = now - s.started_at
    return {
        "name": s.name,
        "state": s.state,
        "progress": round(s.progress, 4),
        "message": s.message,
        "attempt": s.attempt,
        "started_at": iso(s.started_at),
        "finished_at": iso(s.finished_at),
        "duration_s": round(duration, 2) if duration is not None else None,
        "peak_rss_mb": s.peak_rss_mb,
        "device": s.device,
    }


def job_json(job: Any, stage_rows: Sequence[Any], *, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    progress = job_progress(job, stage_rows)
    elapsed = None
    if job.started_at:
        elapsed = (job.finished_at or now) - job.started_at
    eta = seconds_left(job, progress, now)
    return {
        "id": job.id,
        "project": job.project,
        "state": job.state,
        "stage": job.stage,
        "progress": round(progress, 4),
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "priority": job.priority,
        "error": job.error,
        "cancel_requested": bool(job.cancel_requested),
        "host": job.host,
        "request_name": job.request_name,
        "formats": list((job.spec or {}).get("formats") or []),
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "next_attempt_at": iso(job.next_attempt_at),
        "updated_ts": job.updated_at,
        "elapsed_s": round(elapsed, 1) if elapsed is not None else None,
        "eta_s": round(eta, 1) if eta is not None else None,
        "stages": [stage_json(s, now) for s in stage_rows],
    }


def export_json(row: Any, project: str) -> dict[str, Any]:
    name = Path(row.path).name
    return {
        "id": row.id,
        "job_id": row.job_id,
        "project": project,
        "filename": name,
        "format": row.format,
        "size": row.bytes,
        "size_mb": round(row.bytes / 1e6, 3),
        "sha256": row.sha256,
        "created_at": iso(row.created_at),
        "url": f"/api/exports/{row.id}",
        "download_url": f"/api/project/{project}/download_mesh/{name}",
    }


def event_json(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "job_id": row.job_id,
        "at": iso(row.at),
        "kind": row.kind,
        "message": row.message,
    }


@dataclass
class Page:
    jobs: list[dict[str, Any]]
    total: int
    page: int
    per_page: int
    counts: dict[str, int]
    projects: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "total": self.total,
            "page": self.page,
            "per_page": self.per_page,
            "pages": max(1, -(-self.total // self.per_page)),
            "counts": self.counts,
            "projects": self.projects,
        }


class Reader:
    """The dashboard's reads. Every method is one short read transaction (or a few)."""

    def __init__(self, listing: Listing) -> None:
        self.listing = listing

    def _stages(self, conn: Any, ids: Sequence[str]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {j: [] for j in ids}
        if not ids:
            return out
        q = select(*stages.c).where(stages.c.job_id.in_(list(ids)))
        for row in conn.execute(q.order_by(stages.c.job_id, stages.c.seq)):
            out[row.job_id].append(row)
        return out

    def page(
        self,
        *,
        state: str | None = None,
        project: str | None = None,
        page: int = 1,
        per_page: int = 50,
    ) -> Page:
        per_page = max(1, min(per_page, PER_PAGE_MAX))
        page = max(1, page)
        where: list[Any] = []
        if state == "active":
            where.append(jobs.c.state.in_([s.value for s in ACTIVE]))
        elif state:
            where.append(jobs.c.state == state)
        if project:
            where.append(jobs.c.project == project)
        now = time.time()
        with self.listing.read_rows() as conn:
            q = select(*jobs.c).where(*where).order_by(jobs.c.created_at.desc(), jobs.c.id)
            rows = list(conn.execute(q.limit(per_page).offset((page - 1) * per_page)))
            counts_q = select(jobs.c.state, func.count()).group_by(jobs.c.state)
            if project:
                counts_q = counts_q.where(jobs.c.project == project)
            counts = {s: n for s, n in conn.execute(counts_q)}
            if state == "active":
                total = sum(counts.get(s.value, 0) for s in ACTIVE)
            elif state:
                total = counts.get(state, 0)
            else:
                total = sum(counts.values())
            projects = [
                p for (p,) in conn.execute(select(jobs.c.project).distinct().order_by("project"))
            ]
            st = self._stages(conn, [r.id for r in rows])
        return Page(
            jobs=[job_json(r, st[r.id], now=now) for r in rows],
            total=total,
            page=page,
            per_page=per_page,
            counts=counts,
            projects=projects,
        )

    def job(self, job_id: str) -> dict[str, Any] | None:
        with self.listing.read_rows() as conn:
            row = conn.execute(select(*jobs.c).where(jobs.c.id == job_id)).first()
            if row is None:
                return None
            st = self._stages(conn, [job_id])
        return job_json(row, st[job_id])

    def changed_jobs(self, since: float) -> list[dict[str, Any]]:
        """Active jobs, and jobs whose row changed after `since` (finished, requeued)."""
        now = time.time()
        with self.listing.read_rows() as conn:
            q = select(*jobs.c).where(
                or_(jobs.c.state.in_([s.value for s in ACTIVE]), jobs.c.updated_at > since)
            )
            running_first = case((jobs.c.state == JobState.RUNNING.value, 0), else_=1)
            q = q.order_by(running_first, jobs.c.updated_at.desc()).limit(PER_PAGE_MAX)
            rows = list(conn.execute(q))
            st = self._stages(conn, [r.id for r in rows])
        return [job_json(r, st[r.id], now=now) for r in rows]

    def events(
        self, *, job_id: str | None = None, after: int = 0, limit: int = 200
    ) -> list[dict[str, Any]]:
        q = select(*events.c).where(events.c.id > after)
        if job_id is not None:
            q = q.where(events.c.job_id == job_id)
        with self.listing.read_rows() as conn:
            rows = list(conn.execute(q.order_by(events.c.id).limit(limit)))
        return [event_json(r) for r in rows]

    def last_event_id(self) -> int:
        with self.listing.read_rows() as conn:
            value = conn.execute(select(func.max(events.c.id))).scalar()
        return int(value or 0)

    def export_rows(
        self, *, job_id: str | None = None, project: str | None = None
    ) -> list[tuple[Any, str]]:
        q = (
            select(*exports.c, jobs.c.project)
            .join(jobs, jobs.c.id == exports.c.job_id)
            .order_by(exports.c.created_at.desc(), exports.c.id)
        )
        if job_id is not None:
            q = q.where(exports.c.job_id == job_id)
        if project is not None:
            q = q.where(jobs.c.project == project)
        with self.listing.read_rows() as conn:
            return [(r, r.project) for r in conn.execute(q)]

    def export_row(self, export_id: int) -> tuple[Any, str] | None:
        q = (
            select(*exports.c, jobs.c.project)
            .join(jobs, jobs.c.id == exports.c.job_id)
            .where(exports.c.id == export_id)
        )
        with self.listing.read_rows() as conn:
            row = conn.execute(q).first()
        return (row, row.project) if row is not None else None

    def exports(
        self, *, job_id: str | None = None, project: str | None = None
    ) -> list[dict[str, Any]]:
        return [export_json(r, p) for r, p in self.export_rows(job_id=job_id, project=project)]
