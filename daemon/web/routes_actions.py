"""What changes things: cancel, retry, re-export, a new job from a folder or from
uploaded photos, and what became of a request file.

Writes go through the Ledger's public methods (cancel, retry); a new job is a request
file written into the inbox, so the daemon validates it like any other.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Request
from fastapi.responses import JSONResponse

from daemon.ledger import NotFound
from daemon.requests import (
    PROJECT_RE,
    RequestError,
    count_images,
    render_toml,
    resolve_images,
    write_request,
)
from daemon.states import JobState
from daemon.web import uploads
from daemon.web.context import Dash, Dashboard, not_found
from pipeline import FORMATS, QUALITIES, STAGES

router = APIRouter()


@router.post("/api/jobs/{job_id}/cancel", summary="Cancel a job")
def api_cancel(dash: Dash, job_id: str) -> dict[str, Any]:
    """Queued or waiting: cancelled at once. Running: flagged; the daemon stops it."""
    try:
        state = dash.ledger.request_cancel(job_id)
    except NotFound as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc
    return {"id": job_id, "state": state}


def retry(
    dash: Dashboard, job_id: str, from_stage: str | None, formats: list[str] | None
) -> dict[str, Any]:
    from pipeline.stages import remove_stage_outputs

    if from_stage and from_stage not in STAGES:
        raise HTTPException(
            status_code=400, detail=f"from_stage must be one of {', '.join(STAGES)}"
        )
    bad = [f for f in formats or [] if f not in FORMATS]
    if bad:
        raise HTTPException(status_code=400, detail=f"formats must be among {', '.join(FORMATS)}")
    try:
        rerun = dash.ledger.retry(job_id, from_stage=from_stage, formats=formats or None)
    except NotFound as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from exc
    for stage in rerun:
        remove_stage_outputs(dash.cfg.workspace(job_id), stage)
    return {"id": job_id, "state": JobState.QUEUED.value, "stages": rerun}


@router.post("/api/jobs/{job_id}/retry", summary="Run a finished job again from a stage")
def api_retry(
    dash: Dash,
    job_id: str,
    body: Annotated[dict[str, Any] | None, Body()] = None,
) -> dict[str, Any]:
    """Body (optional): `{"from_stage": "meshing", "formats": ["obj"]}`."""
    body = body or {}
    fmts = body.get("formats")
    if fmts is not None and not isinstance(fmts, list):
        raise HTTPException(status_code=400, detail="formats must be a list")
    return retry(dash, job_id, body.get("from_stage"), fmts)


@router.post("/api/jobs/{job_id}/reexport", summary="Export a finished job in other formats")
def api_reexport(
    dash: Dash, job_id: str, body: Annotated[dict[str, Any], Body()]
) -> dict[str, Any]:
    """Body: `{"formats": ["obj", "ply"]}`; re-runs only the export stage."""
    fmts = body.get("formats")
    if not isinstance(fmts, list) or not fmts:
        raise HTTPException(status_code=400, detail="formats must be a non-empty list")
    return retry(dash, job_id, "export", fmts)


def request_body(
    images: Path, project: str | None, quality: str, formats: list[str], force: bool
) -> dict[str, Any]:
    """A request's TOML body, or a 400 naming the field that is wrong."""
    if project is not None and not PROJECT_RE.match(project):
        raise HTTPException(
            status_code=400,
            detail="project must be 1-64 characters of a-z, 0-9, '_' or '-'",
        )
    if quality not in QUALITIES:
        raise HTTPException(
            status_code=400, detail=f"quality must be one of {', '.join(QUALITIES)}"
        )
    if not formats or any(f not in FORMATS for f in formats):
        raise HTTPException(status_code=400, detail=f"formats must be among {', '.join(FORMATS)}")
    body: dict[str, Any] = {
        "project": project or images.name.lower(),
        "images": str(images),
        "quality": quality,
        "formats": list(dict.fromkeys(formats)),
    }
    if force:
        body["force"] = True
    return body


def submit(dash: Dashboard, body: dict[str, Any]) -> dict[str, Any]:
    stem = body.get("project") or "request"
    if not PROJECT_RE.match(stem):
        stem = "upload"
    path = write_request(dash.cfg.inbox, stem, render_toml(body), tag=uuid.uuid4().hex[:8])
    return {"request": path.name, "status_url": f"/api/requests/{path.name}"}


@router.post("/api/jobs", status_code=202, summary="New job from a folder under allowed_roots")
def api_new_job(dash: Dash, body: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
    """Body: `{"images": "/path/to/photos", "project": "fountain", "quality":
    "medium", "formats": ["glb"], "force": false}`. Writes a request file into the
    inbox; follow it at `status_url`."""
    cfg = dash.cfg
    images = body.get("images")
    if not isinstance(images, str):
        raise HTTPException(status_code=400, detail="images must name a folder")
    try:
        folder = resolve_images(images, base=cfg.home, allowed_roots=cfg.allowed_roots)
        count_images(folder)
    except RequestError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from exc
    formats = body.get("formats") or ["glb"]
    if not isinstance(formats, list):
        raise HTTPException(status_code=400, detail="formats must be a list")
    return submit(
        dash,
        request_body(
            folder,
            body.get("project") or None,
            str(body.get("quality") or "medium"),
            [str(f) for f in formats],
            bool(body.get("force")),
        ),
    )


@router.post("/api/uploads", status_code=202, summary="New job from uploaded photos")
async def api_upload(request: Request, dash: Dash) -> JSONResponse:
    """multipart/form-data: files in `photos` (JPEG or PNG), optional fields
    `project`, `quality`, `formats` (repeatable). Streamed to <home>/uploads/ with
    limits checked as it arrives; then a request file goes into the inbox."""
    try:
        up = await uploads.receive(
            request.headers.get("content-type", ""),
            request.headers.get("content-length"),
            request.stream(),
            dash.cfg.home / "uploads",
            dash.limits,
        )
    except uploads.UploadError as exc:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)
    f = up.fields
    project = (f.get("project") or [""])[0].strip() or None
    try:
        body = request_body(
            up.folder,
            project,
            (f.get("quality") or ["medium"])[0],
            f.get("formats") or ["glb"],
            True,
        )
    except HTTPException as exc:
        shutil.rmtree(up.folder, ignore_errors=True)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
    body["project"] = project or "upload"
    out = submit(dash, body)
    out.update(photos=len(up.files), bytes=up.total, folder=str(up.folder))
    return JSONResponse(out, status_code=202)


@router.get("/api/requests/{name}", summary="What became of a request file")
def api_request(dash: Dash, name: str) -> dict[str, Any]:
    """`pending` (still in the inbox), `accepted` with the job, or `rejected` with
    the daemon's reason."""
    if "/" in name or name.startswith("."):
        raise not_found()
    job = job_by_request(dash, name)
    if job is not None:
        return {"request": name, "status": "accepted", "job": job}
    err = dash.cfg.rejected / f"{name}.error.txt"
    if err.is_file():
        text = err.read_text(encoding="utf-8", errors="replace")
        return {"request": name, "status": "rejected", "error": text.strip()}
    if (dash.cfg.inbox / name).exists():
        return {"request": name, "status": "pending"}
    raise not_found()


def job_by_request(dash: Dashboard, name: str) -> dict[str, Any] | None:
    """The newest job made from the request file `name`, if any."""
    from sqlalchemy import select

    from daemon.schema import jobs

    with dash.ledger.read_rows() as conn:
        row = conn.execute(
            select(jobs.c.id).where(jobs.c.request_name == name).order_by(jobs.c.created_at.desc())
        ).first()
    return dash.reader.job(row.id) if row is not None else None
