"""Helpers shared by the sparse stages (ingest, features, matching, mapping, undistort).

A stage builds its output in a temporary sibling folder `<workspace>/.<name>.tmp-*` and
publishes it with one rename to `<workspace>/<name>`; `metrics.json` (written last, inside
the folder, before the rename) marks a finished folder, and a stage that finds it returns
the recorded result instead of running again.

pycolmap calls run in a worker thread (pycolmap releases the GIL) while this thread
watches `ctx.cancelled()` and cancels the call through a `pycolmap.CancellationToken`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.context import StageContext, StageResult
from pipeline.errors import Cancelled, PermanentError
from pipeline.presets import Preset, preset

if TYPE_CHECKING:  # imported where used: ingest's process never loads pycolmap
    import pycolmap

METRICS = "metrics.json"
T = TypeVar("T")

# What each stage publishes (paths relative to the workspace).
INGEST_IMAGES = ("ingest", "images")  # the checked, resized images
INGEST_LIST = ("ingest", "images.json")  # per image: size, focal prior, source
FEATURES_DB = ("features", "database.db")  # cameras, images, keypoints, descriptors
MATCHING_DB = ("matching", "database.db")  # the same plus matches and verified geometry
MAPPING_MODEL = ("mapping", "sparse", "0")  # the largest model, COLMAP binary
UNDISTORT_DIR = ("undistort",)  # COLMAP dense workspace: images/ sparse/ stereo/


def stage_preset(ctx: StageContext) -> Preset:
    return preset(ctx.spec.quality, ctx.spec.options)


def num_threads(ctx: StageContext) -> int:
    """pycolmap's num_threads: ctx.threads, or -1 (every core)."""
    return ctx.threads if ctx.threads and ctx.threads > 0 else -1


def device(ctx: StageContext) -> tuple[pycolmap.Device, str]:
    """The pycolmap device for feature extraction and matching, and its name."""
    import pycolmap

    cuda = getattr(pycolmap, "get_num_cuda_devices", lambda: 0)()
    if ctx.device == "cpu" or cuda == 0:
        return pycolmap.Device.cpu, "cpu"
    return pycolmap.Device.cuda, "gpu"


def finished(ctx: StageContext, name: str) -> StageResult | None:
    """The recorded result of a stage whose folder is already published, else None."""
    path = ctx.stage_dir(name) / METRICS
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return StageResult(metrics=data.get("metrics", {}), device=data.get("device", "cpu"))


def require(ctx: StageContext, by: str, parts: tuple[str, ...]) -> Path:
    """The path of an earlier stage's output; PermanentError if it is missing."""
    path = ctx.workspace.joinpath(*parts)
    if not path.exists() or not (ctx.workspace / parts[0] / METRICS).is_file():
        raise PermanentError(
            f"{path} is missing", stage=by, hint=f"the {parts[0]} stage must finish first"
        )
    return path


@contextlib.contextmanager
def building(ctx: StageContext, name: str) -> Iterator[Path]:
    """Yield a fresh temporary folder; on normal exit it replaces `<workspace>/<name>` in
    one rename. On any error (or cancel) it is removed and nothing is published."""
    ctx.workspace.mkdir(parents=True, exist_ok=True)
    for stale in ctx.workspace.glob(f".{name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=ctx.workspace))
    try:
        yield tmp
        final = ctx.stage_dir(name)
        if final.exists() or final.is_symlink():
            old = ctx.workspace / f".{name}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(ctx.workspace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def record(folder: Path, result: StageResult) -> StageResult:
    """Write metrics.json (the marker of a finished folder) into `folder`."""
    write_json(folder / METRICS, {"metrics": result.metrics, "device": result.device})
    return result


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def call_cancellable(
    ctx: StageContext,
    fn: Callable[[pycolmap.CancellationToken], T],
    *,
    poll: Callable[[], None] | None = None,
    interval: float = 0.1,
    abandon_on_cancel: bool = False,
) -> T:
    """Run `fn(token)` in a worker thread; every `interval` seconds call `poll` (progress)
    and check `ctx.cancelled()`. On cancel, cancel the token, wait for the call to return
    (or, with abandon_on_cancel, for calls that cannot be interrupted, leave it to die with
    the stage's process) and raise Cancelled."""
    import pycolmap

    token = pycolmap.CancellationToken()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(token)
        except BaseException as exc:  # handed to the calling thread
            box["error"] = exc

    ctx.check_cancelled()
    thread = threading.Thread(target=target, name="pycolmap", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(interval)
        if poll is not None:
            poll()
        if ctx.cancelled():
            token.cancel()
            if not abandon_on_cancel:
                thread.join()
            raise Cancelled()
    if "error" in box:
        raise box["error"]
    if token.is_cancelled:
        raise Cancelled()
    value: T = box["value"]
    return value


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 3)


def read_image_list(ctx: StageContext, by: str) -> list[dict[str, Any]]:
    """ingest's per-image records, in order."""
    data = json.loads(require(ctx, by, INGEST_LIST).read_text())
    images: list[dict[str, Any]] = data["images"]
    return images
