"""dropmesh's photogrammetry library: photos in, coloured mesh out.

It knows nothing of the daemon. Each stage is `run(ctx) -> StageResult`, idempotent,
writing only inside `ctx.workspace / <stage>` and publishing by rename.
"""

from __future__ import annotations

from pipeline.context import (
    FORMATS,
    METHODS,
    QUALITIES,
    Export,
    JobSpec,
    StageContext,
    StageResult,
)
from pipeline.errors import Cancelled, PermanentError, StageError, TransientError
from pipeline.stages import STAGES, run, run_stage

__all__ = [
    "FORMATS",
    "METHODS",
    "QUALITIES",
    "STAGES",
    "Cancelled",
    "Export",
    "JobSpec",
    "PermanentError",
    "StageContext",
    "StageError",
    "StageResult",
    "TransientError",
    "run",
    "run_stage",
]
