"""dropmesh's photogrammetry library: photos in, coloured mesh out.

It knows nothing of the daemon. Each stage is `run(ctx) -> StageResult`, idempotent,
writing only inside `ctx.workspace / <stage>` and publishing by rename.
"""

from __future__ import annotations

from pipeline.context import (
    FORMATS,
    IMAGE_SUFFIXES,
    METHODS,
    QUALITIES,
    Export,
    Format,
    JobSpec,
    Method,
    Quality,
    StageContext,
    StageResult,
)
from pipeline.errors import Cancelled, PermanentError, StageError, TransientError
from pipeline.stages import STAGES, run, run_stage

__all__ = [
    "FORMATS",
    "IMAGE_SUFFIXES",
    "METHODS",
    "QUALITIES",
    "STAGES",
    "Cancelled",
    "Export",
    "Format",
    "JobSpec",
    "Method",
    "PermanentError",
    "Quality",
    "StageContext",
    "StageError",
    "StageResult",
    "TransientError",
    "run",
    "run_stage",
]
