"""Helpers of the sparse stages (ingest, features, matching, mapping, undistort); how
they publish their folders is in `_workspace`.

pycolmap calls run in a worker thread (pycolmap releases the GIL) while this thread
watches `ctx.cancelled()` and cancels the call through a `pycolmap.CancellationToken`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.context import StageContext
from pipeline.errors import Cancelled, PermanentError
from pipeline.stages._workspace import METRICS

if TYPE_CHECKING:  # imported where used: ingest's process never loads pycolmap
    import pycolmap

T = TypeVar("T")

# What each stage publishes (paths relative to the workspace).
INGEST_IMAGES = ("ingest", "images")  # the checked, resized images
INGEST_LIST = ("ingest", "images.json")  # per image: size, focal prior, source
FEATURES_DB = ("features", "database.db")  # cameras, images, keypoints, descriptors
MATCHING_DB = ("matching", "database.db")  # the same plus matches and verified geometry
MAPPING_MODEL = ("mapping", "sparse", "0")  # the largest model, COLMAP binary
UNDISTORT_DIR = ("undistort",)  # COLMAP dense workspace: images/ sparse/ stereo/
# Seed for every RANSAC and mapper run: the same photos give the same model on every run,
# so a retry or a re-run does not trade one reconstruction for another.
RANDOM_SEED = 0


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


def require(ctx: StageContext, by: str, parts: tuple[str, ...]) -> Path:
    """The path of an earlier stage's output; PermanentError if it is missing."""
    path = ctx.workspace.joinpath(*parts)
    if not path.exists() or not (ctx.workspace / parts[0] / METRICS).is_file():
        raise PermanentError(f"{path} is missing", hint=f"the {parts[0]} stage must finish first")
    return path


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


def read_image_list(ctx: StageContext, by: str) -> list[dict[str, Any]]:
    """ingest's per-image records, in order."""
    data = json.loads(require(ctx, by, INGEST_LIST).read_text())
    images: list[dict[str, Any]] = data["images"]
    return images
