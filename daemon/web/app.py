"""The dashboard's web application: pages, JSON API, live streams, downloads, actions.

`create_app` only wires the parts together; the routes live in one module per concern:

- routes_pages.py: the HTML pages (job list, one job, the API reference);
- routes_api.py: the JSON API's read side (jobs, events, health);
- routes_stream.py: Server-Sent Events;
- routes_files.py: exports, logs, zips, and the previous system's `/api/project/...`;
- routes_actions.py: cancel, retry, re-export, new jobs, uploads, request status.

What they share (config, ledger, Reader, Broadcaster, templates, upload limits) is one
`context.Dashboard` on `app.state`, reached with the `Dash` dependency. The whole app is
wrapped in `security.Guard` (token, Host and same-origin checks).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from daemon.config import Config
from daemon.ledger import Ledger
from daemon.web import (
    routes_actions,
    routes_api,
    routes_files,
    routes_pages,
    routes_stream,
    uploads,
)
from daemon.web.context import HERE, Dashboard
from daemon.web.data import Reader
from daemon.web.security import Guard
from daemon.web.stream import Broadcaster


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
    dash = Dashboard(
        cfg=cfg,
        ledger=ledger,
        reader=reader,
        broadcaster=Broadcaster(reader, **({"poll_s": poll_s} if poll_s else {})),
        templates=Jinja2Templates(directory=str(HERE / "templates")),
        limits=limits or uploads.Limits(),
        page_token=token or "local",
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await dash.broadcaster.close()
        ledger.close()

    app = FastAPI(
        lifespan=lifespan,
        title="dropmesh dashboard",
        version="1",
        summary="Jobs, exports and actions of a dropmesh ledger.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.dashboard = dash
    app.state.ledger = ledger
    app.state.broadcaster = dash.broadcaster
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    # The order is the API reference's order (the /api page lists the OpenAPI paths).
    for router in (
        routes_pages.router,
        routes_api.router,
        routes_stream.router,
        routes_files.router,
        routes_actions.router,
        routes_api.health,
    ):
        app.include_router(router)
    return Guard(app, token=token, loopback_only=loopback_only)
