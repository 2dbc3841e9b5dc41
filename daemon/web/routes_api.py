"""The JSON API's read side: jobs, one job, events, and the daemon's health."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query

from daemon.states import ACTIVE
from daemon.web.context import Dash
from daemon.web.data import STATES

router = APIRouter()
# Included last, so that /api/health closes the API reference as it always has.
health = APIRouter()


@router.get("/api/jobs", summary="One page of jobs, newest first")
def api_jobs(
    dash: Dash,
    state: Annotated[str | None, Query(description="a job state, or 'active'")] = None,
    project: str | None = None,
    page: Annotated[int, Query(ge=1)] = 1,
    per_page: Annotated[int, Query(ge=1, le=200)] = 50,
) -> dict[str, Any]:
    """Jobs with state, stage, overall progress, per-stage progress, elapsed, ETA,
    host, attempts and error; `counts` per state and the list of projects."""
    if state and state != "active" and state not in STATES:
        raise HTTPException(
            status_code=400, detail=f"state must be active or one of {', '.join(STATES)}"
        )
    return dash.reader.page(state=state, project=project, page=page, per_page=per_page).to_json()


@router.get("/api/jobs/{job_id}", summary="One job")
def api_job(dash: Dash, job_id: str) -> dict[str, Any]:
    job = dash.job_or_404(job_id)
    job["exports"] = dash.reader.exports(job_id=job_id)
    return job


@router.get("/api/jobs/{job_id}/events", summary="A job's events")
def api_job_events(dash: Dash, job_id: str, after: int = 0) -> dict[str, Any]:
    dash.job_or_404(job_id)
    return {"events": dash.reader.events(job_id=job_id, after=after, limit=1000)}


@router.get("/api/events", summary="Events of every job (and rejected requests)")
def api_events(
    dash: Dash, after: int = 0, limit: Annotated[int, Query(ge=1, le=1000)] = 200
) -> Any:
    return {"events": dash.reader.events(after=after, limit=limit)}


@health.get("/api/health", summary="Liveness and ledger counts")
def api_health(dash: Dash) -> dict[str, Any]:
    counts = dash.reader.page(per_page=1).counts
    return {
        "ok": True,
        "time": time.time(),
        "counts": counts,
        "active": sum(counts.get(s.value, 0) for s in ACTIVE),
    }
