"""The dashboard's web application: pages, JSON API, live streams, downloads, actions.

It reads the ledger (SQLAlchemy Core listings) and, like the CLI, writes to it only
through the Ledger's public methods (cancel, retry). A new job is a request file
written into the inbox, so the daemon validates it like any other.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import uuid
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from daemon.config import Config
from daemon.ledger import Ledger, NotFound
from daemon.requests import (
    PROJECT_RE,
    RequestError,
    count_images,
    render_toml,
    resolve_images,
)
from daemon.states import ACTIVE, JobState
from daemon.web import uploads
from daemon.web.data import STATES, Reader, export_json
from daemon.web.security import Guard, safe_file
from daemon.web.stream import PING_S, Broadcaster, job_stream
from pipeline import FORMATS, QUALITIES, STAGES

HERE = Path(__file__).resolve().parent
NOT_FOUND = "not found"


def _404() -> HTTPException:
    # One answer for every file that is not served: missing, outside, or another's.
    return HTTPException(status_code=404, detail=NOT_FOUND)


def write_request(inbox: Path, stem: str, text: str) -> Path:
    """A request file, written to a hidden temporary name and renamed into the inbox."""
    inbox.mkdir(parents=True, exist_ok=True)
    path = inbox / f"{stem}-{uuid.uuid4().hex[:8]}.toml"
    tmp = inbox / f".{path.name}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def create_app(
    cfg: Config,
    *,
    token: str | None = None,
    loopback_only: bool = True,
    limits: uploads.Limits | None = None,
    poll_s: float | None = None,
) -> Any:
    ledger = Ledger.open(cfg.url)
    reader = Reader(ledger)
    broadcaster = Broadcaster(reader, **({"poll_s": poll_s} if poll_s else {}))
    limits = limits or uploads.Limits()
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    page_token = token or "local"

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await broadcaster.close()
        ledger.close()

    app = FastAPI(
        lifespan=lifespan,
        title="dropmesh dashboard",
        version="1",
        summary="Jobs, exports and actions of a dropmesh ledger.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.ledger = ledger
    app.state.broadcaster = broadcaster
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def render(request: Request, name: str, **ctx: Any) -> HTMLResponse:
        ctx.update(request=request, token=page_token, stages=STAGES, formats=FORMATS)
        ctx.update(qualities=QUALITIES, states=STATES)
        return templates.TemplateResponse(request, name, ctx)

    def job_or_404(job_id: str) -> dict[str, Any]:
        job = reader.job(job_id)
        if job is None:
            raise HTTPException(status_code=404, detail=f"no job {job_id!r}")
        return job

    # -- pages -----------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def jobs_page(
        request: Request,
        state: str | None = None,
        project: str | None = None,
        page: int = 1,
    ) -> HTMLResponse:
        data = reader.page(state=state or None, project=project or None, page=page).to_json()
        return render(
            request,
            "jobs.html",
            data=data,
            state=state or "",
            project=project or "",
            roots=[str(r) for r in cfg.allowed_roots],
        )

    @app.get("/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
    def job_page(request: Request, job_id: str) -> HTMLResponse:
        job = job_or_404(job_id)
        ex = reader.exports(job_id=job_id)
        glb = next((e for e in ex if e["format"] == "glb"), None)
        preview = next((e for e in ex if e["format"] == "png"), None)
        return render(request, "job.html", job=job, exports=ex, glb=glb, preview=preview)

    @app.get("/api", response_class=HTMLResponse, include_in_schema=False)
    def api_page(request: Request) -> HTMLResponse:
        schema = app.openapi()
        ops = []
        for path, methods in schema["paths"].items():
            for method, op in methods.items():
                params = [p["name"] for p in op.get("parameters", [])]
                ops.append(
                    {
                        "method": method.upper(),
                        "path": path,
                        "summary": op.get("summary", ""),
                        "doc": op.get("description", ""),
                        "params": params,
                    }
                )
        return render(request, "api.html", ops=ops)

    # -- JSON ------------------------------------------------------------------------

    @app.get("/api/jobs", summary="One page of jobs, newest first")
    def api_jobs(
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
        return reader.page(state=state, project=project, page=page, per_page=per_page).to_json()

    @app.get("/api/jobs/{job_id}", summary="One job")
    def api_job(job_id: str) -> dict[str, Any]:
        job = job_or_404(job_id)
        job["exports"] = reader.exports(job_id=job_id)
        return job

    @app.get("/api/jobs/{job_id}/events", summary="A job's events")
    def api_job_events(job_id: str, after: int = 0) -> dict[str, Any]:
        job_or_404(job_id)
        return {"events": reader.events(job_id=job_id, after=after, limit=1000)}

    @app.get("/api/events", summary="Events of every job (and rejected requests)")
    def api_events(after: int = 0, limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> Any:
        return {"events": reader.events(after=after, limit=limit)}

    @app.get("/api/stream", summary="Server-Sent Events: job changes and new events")
    async def api_stream(request: Request) -> EventSourceResponse:
        """Events `hello`, `jobs` (changed job summaries), `events` (new ledger events),
        `reload`. Reconnects resume from Last-Event-ID."""
        last = request.headers.get("last-event-id")
        queue = await broadcaster.subscribe(int(last) if last and last.isdigit() else None)
        return EventSourceResponse(broadcaster.stream(queue, request.is_disconnected), ping=PING_S)

    @app.get("/api/jobs/{job_id}/stream", summary="Server-Sent Events for one job")
    async def api_job_stream(request: Request, job_id: str) -> EventSourceResponse:
        """Events `job` (when it changes), `events`, `exports`, `log` (new text of job.log,
        starting with its tail), `gone`."""
        log_path = cfg.workspace(job_id) / "job.log"
        return EventSourceResponse(
            job_stream(reader, job_id, log_path, request.is_disconnected), ping=PING_S
        )

    @app.get("/api/jobs/{job_id}/exports", summary="A job's exports")
    def api_job_exports(job_id: str) -> dict[str, Any]:
        job_or_404(job_id)
        return {"exports": reader.exports(job_id=job_id)}

    # -- downloads -------------------------------------------------------------------

    def export_file(row: Any, project: str) -> Path:
        path = safe_file(row.path, cfg.results / project)
        if path is None:
            raise _404()
        return path

    def send(path: Path, name: str, media: str | None = None) -> FileResponse:
        return FileResponse(path, filename=name, media_type=media)

    @app.get("/api/exports/{export_id}", summary="Download an export (range requests)")
    def api_export(export_id: int, inline: bool = False) -> Response:
        found = reader.export_row(export_id)
        if found is None:
            raise _404()
        row, project = found
        path = export_file(row, project)
        media = {"glb": "model/gltf-binary", "png": "image/png", "json": "application/json"}
        resp = send(path, Path(row.path).name, media.get(row.format))
        if inline:
            resp.headers["content-disposition"] = "inline"
        return resp

    @app.get(
        "/api/project/{project}/available_exports",
        summary="A project's exports (the previous system's API)",
    )
    def api_available_exports(project: str) -> dict[str, Any]:
        """`{"exports": [{filename, format, size, size_mb, created_at, download_url}]}`,
        newest first."""
        rows = reader.export_rows(project=project)
        return {
            "exports": [export_json(r, p) for r, p in rows if safe_file(r.path, cfg.results / p)]
        }

    @app.get(
        "/api/project/{project}/download_mesh/{filename}",
        summary="Download a project's export by file name (the previous system's API)",
    )
    def api_download_mesh(project: str, filename: str) -> Response:
        """The file name must be one the ledger lists for this project; range requests
        are served."""
        for row, p in reader.export_rows(project=project):
            if Path(row.path).name == filename:
                return send(export_file(row, p), filename)
        raise _404()

    @app.get("/api/jobs/{job_id}/log", summary="A job's log (job.log)")
    def api_job_log(job_id: str) -> Response:
        job_or_404(job_id)
        path = safe_file(cfg.workspace(job_id) / "job.log", cfg.workspace(job_id))
        if path is None:
            raise _404()
        return FileResponse(path, media_type="text/plain; charset=utf-8", filename=f"{job_id}.log")

    @app.get("/api/jobs/{job_id}/zip", summary="Every export of a job and its log, as one zip")
    def api_job_zip(job_id: str) -> Response:
        job = job_or_404(job_id)
        files = []
        for row, p in reader.export_rows(job_id=job_id):
            path = safe_file(row.path, cfg.results / p)
            if path is not None:
                files.append((path, Path(row.path).name))
        log = safe_file(cfg.workspace(job_id) / "job.log", cfg.workspace(job_id))
        if log is not None:
            files.append((log, "job.log"))
        if not files:
            raise _404()
        fd, tmp = tempfile.mkstemp(suffix=".zip", prefix="dropmesh-")
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            for path, name in files:
                z.write(path, arcname=name)
        return FileResponse(
            tmp,
            media_type="application/zip",
            filename=f"{job['project']}-{job_id}.zip",
            background=BackgroundTask(os.unlink, tmp),
        )

    # -- actions ---------------------------------------------------------------------

    @app.post("/api/jobs/{job_id}/cancel", summary="Cancel a job")
    def api_cancel(job_id: str) -> dict[str, Any]:
        """Queued or waiting: cancelled at once. Running: flagged; the daemon stops it."""
        try:
            state = ledger.request_cancel(job_id)
        except NotFound as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc
        return {"id": job_id, "state": state}

    def _retry(job_id: str, from_stage: str | None, formats: list[str] | None) -> dict[str, Any]:
        from pipeline.stages import remove_stage_outputs

        if from_stage and from_stage not in STAGES:
            raise HTTPException(
                status_code=400, detail=f"from_stage must be one of {', '.join(STAGES)}"
            )
        bad = [f for f in formats or [] if f not in FORMATS]
        if bad:
            raise HTTPException(
                status_code=400, detail=f"formats must be among {', '.join(FORMATS)}"
            )
        try:
            rerun = ledger.retry(job_id, from_stage=from_stage, formats=formats or None)
        except NotFound as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc
        except ValueError as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from exc
        for stage in rerun:
            remove_stage_outputs(cfg.workspace(job_id), stage)
        return {"id": job_id, "state": JobState.QUEUED.value, "stages": rerun}

    @app.post("/api/jobs/{job_id}/retry", summary="Run a finished job again from a stage")
    def api_retry(
        job_id: str,
        body: Annotated[dict[str, Any] | None, Body()] = None,
    ) -> dict[str, Any]:
        """Body (optional): `{"from_stage": "meshing", "formats": ["obj"]}`."""
        body = body or {}
        fmts = body.get("formats")
        if fmts is not None and not isinstance(fmts, list):
            raise HTTPException(status_code=400, detail="formats must be a list")
        return _retry(job_id, body.get("from_stage"), fmts)

    @app.post("/api/jobs/{job_id}/reexport", summary="Export a finished job in other formats")
    def api_reexport(job_id: str, body: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
        """Body: `{"formats": ["obj", "ply"]}`; re-runs only the export stage."""
        fmts = body.get("formats")
        if not isinstance(fmts, list) or not fmts:
            raise HTTPException(status_code=400, detail="formats must be a non-empty list")
        return _retry(job_id, "export", fmts)

    def request_body(
        images: Path, project: str | None, quality: str, formats: list[str], force: bool
    ) -> dict[str, Any]:
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
            raise HTTPException(
                status_code=400, detail=f"formats must be among {', '.join(FORMATS)}"
            )
        body: dict[str, Any] = {
            "project": project or images.name.lower(),
            "images": str(images),
            "quality": quality,
            "formats": list(dict.fromkeys(formats)),
        }
        if force:
            body["force"] = True
        return body

    def submit(body: dict[str, Any]) -> dict[str, Any]:
        stem = body.get("project") or "request"
        if not PROJECT_RE.match(stem):
            stem = "upload"
        path = write_request(cfg.inbox, stem, render_toml(body))
        return {"request": path.name, "status_url": f"/api/requests/{path.name}"}

    @app.post("/api/jobs", status_code=202, summary="New job from a folder under allowed_roots")
    def api_new_job(body: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
        """Body: `{"images": "/path/to/photos", "project": "fountain", "quality":
        "medium", "formats": ["glb"], "force": false}`. Writes a request file into the
        inbox; follow it at `status_url`."""
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
            request_body(
                folder,
                body.get("project") or None,
                str(body.get("quality") or "medium"),
                [str(f) for f in formats],
                bool(body.get("force")),
            )
        )

    @app.post("/api/uploads", status_code=202, summary="New job from uploaded photos")
    async def api_upload(request: Request) -> JSONResponse:
        """multipart/form-data: files in `photos` (JPEG or PNG), optional fields
        `project`, `quality`, `formats` (repeatable). Streamed to <home>/uploads/ with
        limits checked as it arrives; then a request file goes into the inbox."""
        try:
            up = await uploads.receive(
                request.headers.get("content-type", ""),
                request.headers.get("content-length"),
                request.stream(),
                cfg.home / "uploads",
                limits,
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
            import shutil

            shutil.rmtree(up.folder, ignore_errors=True)
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        body["project"] = project or "upload"
        out = submit(body)
        out.update(photos=len(up.files), bytes=up.total, folder=str(up.folder))
        return JSONResponse(out, status_code=202)

    @app.get("/api/requests/{name}", summary="What became of a request file")
    def api_request(name: str) -> dict[str, Any]:
        """`pending` (still in the inbox), `accepted` with the job, or `rejected` with
        the daemon's reason."""
        if "/" in name or name.startswith("."):
            raise _404()
        job = _job_by_request(name)
        if job is not None:
            return {"request": name, "status": "accepted", "job": job}
        err = cfg.rejected / f"{name}.error.txt"
        if err.is_file():
            text = err.read_text(encoding="utf-8", errors="replace")
            return {"request": name, "status": "rejected", "error": text.strip()}
        if (cfg.inbox / name).exists():
            return {"request": name, "status": "pending"}
        raise _404()

    def _job_by_request(name: str) -> dict[str, Any] | None:
        from sqlalchemy import select

        from daemon.schema import jobs

        with ledger.read_rows() as conn:
            row = conn.execute(
                select(jobs.c.id)
                .where(jobs.c.request_name == name)
                .order_by(jobs.c.created_at.desc())
            ).first()
        return reader.job(row.id) if row is not None else None

    @app.get("/api/health", summary="Liveness and ledger counts")
    def api_health() -> dict[str, Any]:
        counts = reader.page(per_page=1).counts
        return {
            "ok": True,
            "time": time.time(),
            "counts": counts,
            "active": sum(counts.get(s.value, 0) for s in ACTIVE),
        }

    return Guard(app, token=token, loopback_only=loopback_only)
