"""job.log: the daemon's lines in a job's folder, beside its stages' own output."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("dropmesh")


class JobLog:
    """Appends the daemon's account of a job (taken, started, failed, resumed) to
    <workspace>/job.log. The stage children write their output to the same file."""

    def __init__(self, workspace: Callable[[str], Path]) -> None:
        self._workspace = workspace

    def path(self, job_id: str) -> Path:
        return self._workspace(job_id) / "job.log"

    def write(self, job_id: str, message: str) -> None:
        """One line; a log that cannot be written is a warning, never a failure."""
        ws = self._workspace(job_id)
        try:
            ws.mkdir(parents=True, exist_ok=True)
            with open(ws / "job.log", "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} dropmesh: {message}\n")
        except OSError as exc:
            log.warning("cannot write the log of job %s: %s", job_id, exc)
