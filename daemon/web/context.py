"""What every route of the dashboard shares, reached through one object on `app.state`.

Routes ask for it as a dependency: `dash: Dash` (see `Dash` below).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from daemon.config import Config
from daemon.ledger import Ledger
from daemon.web import uploads
from daemon.web.data import STATES, Reader
from daemon.web.stream import Broadcaster
from pipeline import FORMATS, QUALITIES, STAGES

HERE = Path(__file__).resolve().parent
NOT_FOUND = "not found"


def not_found() -> HTTPException:
    """One answer for every file that is not served: missing, outside, or another's."""
    return HTTPException(status_code=404, detail=NOT_FOUND)


@dataclass
class Dashboard:
    """The configuration, the ledger and its readers, the live-update broadcaster, the
    page templates and the upload limits of one running dashboard."""

    cfg: Config
    ledger: Ledger
    reader: Reader
    broadcaster: Broadcaster
    templates: Jinja2Templates
    limits: uploads.Limits
    page_token: str

    def render(self, request: Request, name: str, **ctx: Any) -> HTMLResponse:
        """A page from templates/, with what every page needs in its context."""
        ctx.update(request=request, token=self.page_token, stages=STAGES, formats=FORMATS)
        ctx.update(qualities=QUALITIES, states=STATES)
        return self.templates.TemplateResponse(request, name, ctx)

    def job_or_404(self, job_id: str) -> dict[str, Any]:
        job = self.reader.job(job_id)
        if job is None:
            raise HTTPException(status_code=404, detail=f"no job {job_id!r}")
        return job


def dashboard(request: Request) -> Dashboard:
    """The dependency behind `Dash`: the Dashboard that create_app stored on app.state."""
    dash: Dashboard = request.app.state.dashboard
    return dash


Dash = Annotated[Dashboard, Depends(dashboard)]
