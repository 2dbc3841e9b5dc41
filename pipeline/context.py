"""What a stage receives (StageContext) and what it returns (StageResult)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pipeline.errors import Cancelled

# What a request may ask for: the types (for validation) and their values.
Quality = Literal["low", "medium", "high"]
Method = Literal["poisson"]
Format = Literal["glb", "ply", "obj"]
QUALITIES: tuple[str, ...] = get_args(Quality)
METHODS: tuple[str, ...] = get_args(Method)
FORMATS: tuple[str, ...] = get_args(Format)
# The photos ingest takes, by file suffix (lower case), and the format it writes them in.
IMAGE_SUFFIXES: dict[str, str] = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


@dataclass(frozen=True)
class JobSpec:
    """A validated request, as the pipeline needs it."""

    project: str
    images: Path
    quality: str = "medium"
    method: str = "poisson"
    formats: tuple[str, ...] = ("glb",)
    options: dict[str, Any] = field(default_factory=dict)
    job_id: str = "job"  # short id, used in export file names

    def to_json(self) -> dict[str, Any]:
        return {
            "project": self.project,
            "images": str(self.images),
            "quality": self.quality,
            "method": self.method,
            "formats": list(self.formats),
            "options": dict(self.options),
            "job_id": self.job_id,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobSpec:
        return cls(
            project=data["project"],
            images=Path(data["images"]),
            quality=data.get("quality", "medium"),
            method=data.get("method", "poisson"),
            formats=tuple(data.get("formats", ("glb",))),
            options=dict(data.get("options", {})),
            job_id=data.get("job_id", "job"),
        )


ProgressFn = Callable[[float, str], None]
CancelledFn = Callable[[], bool]


def _no_progress(fraction: float, message: str) -> None:
    return None


def _never() -> bool:
    return False


@dataclass
class StageContext:
    """Everything a stage may use. A stage writes only below `workspace`,
    except `export`, which publishes into `results_dir` by atomic rename."""

    spec: JobSpec
    workspace: Path
    results_dir: Path
    progress: ProgressFn = _no_progress
    cancelled: CancelledFn = _never
    device: str = "auto"  # auto | cpu | gpu
    threads: int = 0  # 0: all cores
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("pipeline"))

    def stage_dir(self, name: str) -> Path:
        return self.workspace / name

    def check_cancelled(self) -> None:
        if self.cancelled():
            raise Cancelled()


@dataclass
class Export:
    """A published file; size and sha256 when the stage knows them (the daemon records
    both, and reads the file only for an export that comes without them)."""

    path: Path
    format: str
    size: int | None = None
    sha256: str | None = None

    @classmethod
    def of_bytes(cls, path: Path, format: str, data: bytes) -> Export:
        """The export of `data`, just published at `path`."""
        return cls(path, format, len(data), hashlib.sha256(data).hexdigest())


@dataclass
class StageResult:
    """metrics end up in the ledger and in report.json; exports only from `export`."""

    metrics: dict[str, Any] = field(default_factory=dict)
    exports: list[Export] = field(default_factory=list)
    device: str = "cpu"
