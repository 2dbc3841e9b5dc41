"""`dropmesh`: the daemon and the commands that work on its ledger from any terminal.

app.py holds the typer app, `--home` and what the commands share; commands.py,
submit.py, doctor.py and web.py register the commands on it; render.py is everything they print.
A new command module registers with `@app.command()` and is imported here.
"""

from __future__ import annotations

from daemon.cli import commands, doctor, submit, web  # noqa: F401  (register the commands)
from daemon.cli.app import app, main
from daemon.cli.render import job_progress

__all__ = ["app", "job_progress", "main"]
