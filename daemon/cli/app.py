"""The typer application, its global options and what every command shares: the home
folder, the consoles, errors, and opening the ledger.

Commands register themselves on `app` (see daemon/cli/__init__.py for the modules that do).
Nothing here imports the ORM at module level: `dropmesh status` reads through `Listing`
(SQLAlchemy Core only) and must stay quick to start.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from daemon import config as config_mod
from daemon.ledgerfile import LedgerError
from daemon.listing import Listing

if TYPE_CHECKING:
    from daemon.ledger import Ledger

# The key under which the root callback keeps `--home` given before the command.
HOME_KEY = "dropmesh.home"


def _drop_flag_metavars(params: list[Any]) -> list[Any]:
    """On/off flags take no value, so `--help` shows no type after them (typer would
    write `<bool>`)."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


COMMAND_ORDER = (
    "run", "submit", "status", "cancel", "retry", "exports", "logs", "prune", "demo",
    "workers", "serve", "service", "doctor",
)  # fmt: skip


class Group(TyperGroup):
    """The root command group. Every command it hands out, including ones that other
    modules register later, shows its flags without a value type in `--help`."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _drop_flag_metavars(super().get_params(ctx))

    def list_commands(self, ctx: Any) -> list[str]:
        """`--help` lists the commands in the order a user meets them; commands
        registered elsewhere come after, in the order they were registered."""
        names = list(super().list_commands(ctx))
        known = [n for n in COMMAND_ORDER if n in names]
        return known + [n for n in names if n not in COMMAND_ORDER]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            _drop_flag_metavars([*cmd.params, cmd.get_help_option(ctx)])
        return cmd


app = typer.Typer(
    cls=Group,
    help="dropmesh turns folders of photos into coloured 3D meshes in the background.\n\n"
    "Start the daemon with `dropmesh run`, drop request files into ./inbox (or use "
    "`dropmesh submit`), and follow them with `dropmesh status`.\n\n"
    "Example: dropmesh --home ~/scans status",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# Wide enough for the status table when the output goes to a file or a pipe.
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

HOME_HELP = "Folder holding config.toml, jobs.db, inbox/ and results/ (default: .)."

HomeOpt = Annotated[
    Path | None,
    typer.Option(
        "--home",
        help=HOME_HELP + " Also accepted before the command, or as DROPMESH_HOME.",
        show_default=False,
    ),
]


@app.callback()
def options(
    ctx: typer.Context,
    home: Annotated[
        Path | None,
        typer.Option("--home", envvar="DROPMESH_HOME", help=HOME_HELP, show_default=False),
    ] = None,
) -> None:
    # The group's help is the app's (above); this only keeps --home for the command.
    ctx.meta[HOME_KEY] = home


def home_folder(ctx: typer.Context, home: Path | None) -> Path | None:
    """The home a command works on: its own `--home`, else the one given before the
    command (or DROPMESH_HOME), else None (config.load then uses DROPMESH_HOME or .)."""
    if home is not None:
        return home
    found = ctx.meta.get(HOME_KEY)
    return Path(found) if found is not None else None


def _jobs_for_completion(ctx: typer.Context) -> list[Any]:
    """The newest jobs of the ledger of the home given on the command line (else
    DROPMESH_HOME or .); none when there is no ledger to read."""
    home = ctx.params.get("home")
    if home is None and ctx.parent is not None:
        home = ctx.parent.params.get("home")
    try:
        listing = Listing.open(config_mod.load(home).url)
    except (config_mod.ConfigError, LedgerError, OSError):
        return []
    try:
        return listing.list_jobs(limit=500)
    except Exception:  # a completion must never print a traceback into the shell
        return []
    finally:
        listing.close()


def complete_job(ctx: typer.Context, incomplete: str) -> list[tuple[str, str]]:
    """Shell completion for a job argument: job ids and project names."""
    found: dict[str, str] = {}
    for j in _jobs_for_completion(ctx):
        found.setdefault(j.project, "project")
        found.setdefault(j.id, f"{j.project}, {j.state}")
    return [(k, v) for k, v in found.items() if k.startswith(incomplete)]


def complete_project(ctx: typer.Context, incomplete: str) -> list[str]:
    """Shell completion for a project argument."""
    names = dict.fromkeys(j.project for j in _jobs_for_completion(ctx))
    return [n for n in names if n.startswith(incomplete)]


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def load_config(ctx: typer.Context, home: Path | None) -> config_mod.Config:
    try:
        return config_mod.load(home_folder(ctx, home))
    except config_mod.ConfigError as exc:
        raise fail(str(exc)) from exc


def open_ledger(cfg: config_mod.Config) -> Ledger:
    from daemon.ledger import Ledger

    try:
        return Ledger.open(cfg.url)
    except LedgerError as exc:
        raise fail(str(exc)) from exc


def open_listing(cfg: config_mod.Config) -> Listing:
    try:
        return Listing.open(cfg.url)
    except LedgerError as exc:
        raise fail(str(exc)) from exc


def resolve(ledger: Ledger, ref: str) -> list[Any]:
    from daemon.ledger import NotFound

    try:
        return ledger.resolve(ref)
    except NotFound as exc:
        raise fail(str(exc)) from exc


def main() -> None:
    app()
