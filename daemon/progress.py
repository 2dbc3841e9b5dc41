"""How far a job has come, as every reader of the ledger shows it (CLI, dashboard).

Pure functions of ledger rows and the clock; they read nothing themselves."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from daemon.states import JobState, StageState
from pipeline.stages import STAGE_WEIGHTS


def iso(ts: float | None) -> str | None:
    """A ledger timestamp as local ISO 8601 to the second; None stays None."""
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds") if ts else None


def reads_stages(job: Any) -> bool:
    """Whether job_progress needs the job's stage rows (a succeeded job's does not)."""
    return bool(job.state != JobState.SUCCEEDED)


def job_progress(job: Any, stages: Sequence[Any]) -> float:
    """A job's overall progress in [0, 1]: each stage counts by its weight in
    pipeline.stages.STAGE_WEIGHTS (1 for a stage missing there); a done stage counts
    fully, a running one by its own progress, the others not at all. A succeeded job is
    complete whatever its stage rows say (a retry from a later stage leaves earlier rows)."""
    if not reads_stages(job):
        return 1.0
    total = sum(STAGE_WEIGHTS.get(s.name, 1) for s in stages) or 1
    done = 0.0
    for s in stages:
        w = STAGE_WEIGHTS.get(s.name, 1)
        if s.state == StageState.DONE:
            done += w
        elif s.state == StageState.RUNNING:
            done += w * s.progress
    return done / total


def seconds_left(job: Any, progress: float, now: float) -> float | None:
    """Time left, extrapolated from the time spent so far; None unless the job runs and
    has made enough progress (over 2 %) for the guess to mean something."""
    if job.state != JobState.RUNNING or not job.started_at or progress <= 0.02:
        return None
    elapsed = now - job.started_at
    return elapsed * (1 - progress) / progress
