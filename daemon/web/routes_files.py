"""Exports and logs: listings, downloads (range requests), a job's zip, and the
previous system's `/api/project/...` paths.

A file is served only when the ledger lists it (or it is the job's log) and
`safe_file` finds it under results/<project>/ (or the job's workspace); every other
case gets the same 404.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from starlette.background import BackgroundTask

from daemon.web.context import Dash, Dashboard, not_found
from daemon.web.data import export_json
from daemon.web.security import safe_file

router = APIRouter()

MEDIA = {"glb": "model/gltf-binary", "png": "image/png", "json": "application/json"}


def export_file(dash: Dashboard, row: Any, project: str) -> Path:
    path = safe_file(row.path, dash.cfg.results / project)
    if path is None:
        raise not_found()
    return path


def send(path: Path, name: str, media: str | None = None) -> FileResponse:
    return FileResponse(path, filename=name, media_type=media)


@router.get("/api/jobs/{job_id}/exports", summary="A job's exports")
def api_job_exports(dash: Dash, job_id: str) -> dict[str, Any]:
    dash.job_or_404(job_id)
    return {"exports": dash.reader.exports(job_id=job_id)}


@router.get("/api/exports/{export_id}", summary="Download an export (range requests)")
def api_export(dash: Dash, export_id: int, inline: bool = False) -> Response:
    found = dash.reader.export_row(export_id)
    if found is None:
        raise not_found()
    row, project = found
    path = export_file(dash, row, project)
    resp = send(path, Path(row.path).name, MEDIA.get(row.format))
    if inline:
        resp.headers["content-disposition"] = "inline"
    return resp


@router.get(
    "/api/project/{project}/available_exports",
    summary="A project's exports (the previous system's API)",
)
def api_available_exports(dash: Dash, project: str) -> dict[str, Any]:
    """`{"exports": [{filename, format, size, size_mb, created_at, download_url}]}`,
    newest first."""
    rows = dash.reader.export_rows(project=project)
    results = dash.cfg.results
    return {"exports": [export_json(r, p) for r, p in rows if safe_file(r.path, results / p)]}


@router.get(
    "/api/project/{project}/download_mesh/{filename}",
    summary="Download a project's export by file name (the previous system's API)",
)
def api_download_mesh(dash: Dash, project: str, filename: str) -> Response:
    """The file name must be one the ledger lists for this project; range requests
    are served."""
    for row, p in dash.reader.export_rows(project=project):
        if Path(row.path).name == filename:
            return send(export_file(dash, row, p), filename)
    raise not_found()


def job_log(dash: Dashboard, job_id: str) -> Path | None:
    return safe_file(dash.cfg.workspace(job_id) / "job.log", dash.cfg.workspace(job_id))


@router.get("/api/jobs/{job_id}/log", summary="A job's log (job.log)")
def api_job_log(dash: Dash, job_id: str) -> Response:
    dash.job_or_404(job_id)
    path = job_log(dash, job_id)
    if path is None:
        raise not_found()
    return FileResponse(path, media_type="text/plain; charset=utf-8", filename=f"{job_id}.log")


@router.get("/api/jobs/{job_id}/zip", summary="Every export of a job and its log, as one zip")
def api_job_zip(dash: Dash, job_id: str) -> Response:
    job = dash.job_or_404(job_id)
    files = []
    for row, p in dash.reader.export_rows(job_id=job_id):
        path = safe_file(row.path, dash.cfg.results / p)
        if path is not None:
            files.append((path, Path(row.path).name))
    log = job_log(dash, job_id)
    if log is not None:
        files.append((log, "job.log"))
    if not files:
        raise not_found()
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
