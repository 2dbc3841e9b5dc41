"""How every stage uses its workspace.

A stage builds its output in a temporary sibling folder `<workspace>/.<name>.tmp-*` and
publishes it with one rename to `<workspace>/<name>`, so a crash leaves either the previous
state or the finished folder, never a half-written one. A finished stage folder holds
`metrics.json`, written last; a stage whose folder has it returns the recorded result
instead of running again. Single files (exports) are published by `publish_bytes` /
`publish_file`: temporary file in the same folder, fsync, rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.context import StageContext, StageResult

METRICS = "metrics.json"


def finished(ctx: StageContext, name: str) -> StageResult | None:
    """The recorded result of a stage that already published its folder, else None."""
    path = ctx.stage_dir(name) / METRICS
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return StageResult(metrics=data.get("metrics", {}), device=data.get("device", "cpu"))


def read_metrics(workspace: Path, name: str) -> dict[str, Any]:
    """Metrics a finished stage recorded in its folder ({} if none)."""
    path = workspace / name / METRICS
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
        out: dict[str, Any] = dict(data["metrics"])
        out.setdefault("device", data.get("device"))
        return out
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def building(ctx: StageContext, name: str) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `<workspace>/<name>`; on normal exit,
    replace `<workspace>/<name>` with it in one rename. On error, remove it."""
    ctx.workspace.mkdir(parents=True, exist_ok=True)
    for stale in ctx.workspace.glob(f".{name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=ctx.workspace))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        final = ctx.stage_dir(name)
        if final.exists() or final.is_symlink():
            old = ctx.workspace / f".{name}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(ctx.workspace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def record(folder: Path, result: StageResult) -> StageResult:
    """Write the stage's metrics.json (the marker of a finished folder) and return it."""
    write_json(folder / METRICS, {"metrics": result.metrics, "device": result.device})
    return result


def write_json(path: Path, data: Any) -> None:
    publish_bytes(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def publish_bytes(path: Path, data: bytes) -> None:
    """Write `path` atomically: temporary file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def publish_file(src: Path, dest: Path) -> None:
    """Move a finished file from a temporary path into place atomically (same folder
    or same file system), after flushing it to disk."""
    with open(src, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(src, dest)
    fsync_dir(dest.parent)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stage_outputs(workspace: Path, stage: str) -> None:
    """Remove what a stage left behind: its folder and its temporary siblings."""
    for p in [workspace / stage, *workspace.glob(f"{stage}.*"), *workspace.glob(f".{stage}*")]:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink(missing_ok=True)
