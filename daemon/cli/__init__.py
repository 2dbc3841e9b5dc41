"""`dropmesh`: the daemon and the commands that work on its ledger from any terminal.

app.py holds the typer app, `--home` and what the commands share; commands.py and
doctor.py register the commands on it; render.py is everything they print.
"""

from __future__ import annotations

from daemon.cli import commands, doctor  # noqa: F401  (register the commands)
from daemon.cli.app import app, main
from daemon.cli.commands import write_request
from daemon.cli.render import job_progress

__all__ = ["app", "job_progress", "main", "write_request"]
