"""Server-Sent Events: every job's changes, and one job's changes and log."""

from __future__ import annotations

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from daemon.web.context import Dash
from daemon.web.stream import PING_S, job_stream

router = APIRouter()


@router.get("/api/stream", summary="Server-Sent Events: job changes and new events")
async def api_stream(request: Request, dash: Dash) -> EventSourceResponse:
    """Events `hello`, `jobs` (changed job summaries), `events` (new ledger events),
    `reload`. Reconnects resume from Last-Event-ID."""
    last = request.headers.get("last-event-id")
    broadcaster = dash.broadcaster
    queue = await broadcaster.subscribe(int(last) if last and last.isdigit() else None)
    return EventSourceResponse(broadcaster.stream(queue, request.is_disconnected), ping=PING_S)


@router.get("/api/jobs/{job_id}/stream", summary="Server-Sent Events for one job")
async def api_job_stream(request: Request, dash: Dash, job_id: str) -> EventSourceResponse:
    """Events `job` (when it changes), `events`, `exports`, `log` (new text of job.log,
    starting with its tail), `gone`."""
    log_path = dash.cfg.workspace(job_id) / "job.log"
    return EventSourceResponse(
        job_stream(dash.reader, job_id, log_path, request.is_disconnected), ping=PING_S
    )
