"""What the stages share: where each stage's output lives, the threads and the device a
stage uses, its quality preset, `require` for an earlier stage's output, and pycolmap
calls that a cancel can stop. How a stage publishes its folder is in `_workspace`.

pycolmap calls run in a worker thread (pycolmap releases the GIL) while the stage's thread
watches `ctx.cancelled()` and cancels the call through a `pycolmap.CancellationToken`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.context import StageContext
from pipeline.devices import available_cores, cuda_support
from pipeline.errors import Cancelled, PermanentError
from pipeline.presets import Preset, preset

if TYPE_CHECKING:  # imported where used: ingest never needs pycolmap
    import pycolmap

T = TypeVar("T")

# What each stage publishes, relative to the workspace; the first part names the stage.
INGEST_IMAGES = ("ingest", "images")  # the checked, resized images
INGEST_LIST = ("ingest", "images.json")  # per image: size, focal prior, source
FEATURES_DB = ("features", "database.db")  # cameras, images, keypoints, descriptors
MATCHING_DB = ("matching", "database.db")  # the same plus matches and verified geometry
MAPPING_MODEL = ("mapping", "sparse", "0")  # the largest model, COLMAP binary
UNDISTORT_MODEL = ("undistort", "sparse")  # that model with pinhole cameras
UNDISTORT_IMAGES = ("undistort", "images")  # the images undistorted to match it
STEREO_WORKSPACE = ("stereo",)  # COLMAP dense workspace with depth and normal maps
FUSED_CLOUD = ("fusion", "fused.ply")  # oriented, coloured points
MESH = ("meshing", "mesh.ply")  # trimmed, decimated Poisson surface
COLOURED_MESH = ("color", "mesh.ply")  # the same with vertex colours
TEXTURED_MESH = ("texture", "mesh.npz")  # UV-mapped mesh; texture.png beside it

# Seed for every RANSAC and mapper run: the same photos give the same model on every run,
# so a retry or a re-run does not trade one reconstruction for another.
RANDOM_SEED = 0


def require(ctx: StageContext, output: tuple[str, ...]) -> Path:
    """The path of an earlier stage's output (one of the constants above);
    PermanentError if it is missing."""
    path = ctx.workspace.joinpath(*output)
    if not path.exists():
        raise PermanentError(f"{path} is missing", hint=f"the {output[0]} stage must finish first")
    return path


def read_image_list(ctx: StageContext) -> list[dict[str, Any]]:
    """ingest's per-image records, in order."""
    data = json.loads(require(ctx, INGEST_LIST).read_text())
    images: list[dict[str, Any]] = data["images"]
    return images


def stage_preset(ctx: StageContext) -> Preset:
    """The job's quality preset with its [options] overrides (unknown keys ignored)."""
    names = {f.name for f in fields(Preset)}
    options = {k: v for k, v in (ctx.spec.options or {}).items() if k in names}
    return preset(ctx.spec.quality, options)


def thread_count(ctx: StageContext) -> int:
    """Threads a stage uses: ctx.threads (the daemon shares the cores among the stages it
    runs at once), or else every core this process may run on."""
    if ctx.threads and ctx.threads > 0:
        return ctx.threads
    return available_cores()


def choose_device(requested: str) -> str:
    """'gpu' or 'cpu' for a requested device (auto | cpu | gpu); PermanentError for an
    unknown name, or for 'gpu' where pycolmap has no CUDA device."""
    if requested == "cpu":
        return "cpu"
    if requested not in ("auto", "gpu"):
        raise PermanentError(f"unknown device {requested!r}", hint="auto, cpu or gpu")
    cuda = cuda_support()
    if cuda.devices > 0:
        return "gpu"
    if requested == "gpu":
        raise PermanentError(
            f"device=gpu was requested but no GPU is available: {cuda.why_not}",
            hint="use device=auto; on a machine with an NVIDIA GPU, `make venv` installs the "
            "CUDA build of pycolmap",
        )
    return "cpu"


def colmap_device(ctx: StageContext) -> tuple[pycolmap.Device, str]:
    """The pycolmap device for this stage, and its name ('gpu' or 'cpu')."""
    import pycolmap

    name = choose_device(ctx.device)
    return (pycolmap.Device.cuda if name == "gpu" else pycolmap.Device.cpu), name


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
