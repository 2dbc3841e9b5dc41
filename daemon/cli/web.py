"""`dropmesh serve` (the web dashboard) and `dropmesh service install` (a systemd user unit).

Both only read the home's configuration here; the work lives in daemon/web/."""

from __future__ import annotations

from typing import Annotated

import typer

from daemon.cli.app import HomeOpt, app, console, load_config


@app.command()
def serve(
    ctx: typer.Context,
    home: HomeOpt = None,
    host: Annotated[
        str, typer.Option(help="Address to bind; other than loopback needs a token.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8750,
) -> None:
    """Run the web dashboard on the ledger: jobs, live progress, 3D view, downloads.

    Example: dropmesh serve --port 8750, then open http://127.0.0.1:8750/
    """
    from daemon.web.server import serve as serve_dashboard

    raise typer.Exit(serve_dashboard(load_config(ctx, home), host, port))


service_app = typer.Typer(
    help="Run dropmesh as a systemd user service.\n\n"
    "Example: dropmesh service install --home ~/scans",
    no_args_is_help=True,
)
app.add_typer(service_app, name="service")


@service_app.command("install")
def service_install(ctx: typer.Context, home: HomeOpt = None) -> None:
    """Write ~/.config/systemd/user/dropmesh.service running the daemon on this home.

    Example: dropmesh service install --home ~/scans, then
    systemctl --user daemon-reload && systemctl --user enable --now dropmesh
    """
    from daemon.web.unit import install

    path = install(load_config(ctx, home))
    console.print(
        f"wrote {path}\nnext: systemctl --user daemon-reload && "
        "systemctl --user enable --now dropmesh\n(across reboots without a login: "
        "loginctl enable-linger $USER)"
    )
