"""The HTML pages: the job list, one job, and the API's own reference page."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from daemon.web.context import Dash

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def jobs_page(
    request: Request,
    dash: Dash,
    state: str | None = None,
    project: str | None = None,
    page: int = 1,
) -> HTMLResponse:
    data = dash.reader.page(state=state or None, project=project or None, page=page).to_json()
    return dash.render(
        request,
        "jobs.html",
        data=data,
        state=state or "",
        project=project or "",
        roots=[str(r) for r in dash.cfg.allowed_roots],
    )


@router.get("/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
def job_page(request: Request, dash: Dash, job_id: str) -> HTMLResponse:
    job = dash.job_or_404(job_id)
    ex = dash.reader.exports(job_id=job_id)
    glb = next((e for e in ex if e["format"] == "glb"), None)
    preview = next((e for e in ex if e["format"] == "png"), None)
    return dash.render(request, "job.html", job=job, exports=ex, glb=glb, preview=preview)


@router.get("/api", response_class=HTMLResponse, include_in_schema=False)
def api_page(request: Request, dash: Dash) -> HTMLResponse:
    schema = request.app.openapi()
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
    return dash.render(request, "api.html", ops=ops)
