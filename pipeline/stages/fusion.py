"""fusion: merge the depth maps into one coloured, oriented point cloud.

Runs `pycolmap.stereo_fusion` on the dense workspace that `stereo` published and writes
`<ws>/fusion/fused.ply` (binary PLY with normals and colours). A cloud too small to mesh
is a PermanentError: Poisson meshing crashes on an empty cloud, so it is never reached.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap

from pipeline.context import StageContext, StageResult
from pipeline.errors import Cancelled, PermanentError, TransientError
from pipeline.stages._workspace import (
    Timer,
    building,
    finished,
    num_threads,
    read_metrics,
    record,
    require,
)

STAGE = "fusion"
FUSED = "fused.ply"
MIN_POINTS = 1000  # fewer fused points than this cannot make a useful mesh
SGBM_MIN_NUM_PIXELS = 3  # views a fused point needs (depth maps from pair matching)
SGBM_MAX_NORMAL_ERROR = 20.0  # degrees


_PLY_TYPES = {
    "char": "i1", "uchar": "u1", "short": "<i2", "ushort": "<u2", "int": "<i4",
    "uint": "<u4", "float": "<f4", "double": "<f8",
    "int8": "i1", "uint8": "u1", "int16": "<i2", "uint16": "<u2", "int32": "<i4",
    "uint32": "<u4", "float32": "<f4", "float64": "<f8",
}  # fmt: skip


def read_ply_points(path: Path) -> np.ndarray:
    """The vertex positions (n, 3) of a binary little-endian PLY point cloud, as COLMAP's
    fusion writes it, read with numpy (no open3d import: this stage's process starts
    faster). Other PLY flavours go through open3d."""
    with open(path, "rb") as fh:
        header: list[str] = []
        while True:
            raw = fh.readline()
            if not raw:
                break
            header.append(raw.decode("ascii", "replace").strip())
            if header[-1] == "end_header":
                break
        fields: list[tuple[str, str]] = []
        count, only_vertices, element = 0, True, ""
        for line in header:
            parts = line.split()
            if parts[:1] == ["element"]:
                element = parts[1]
                if element == "vertex":
                    count = int(parts[2])
                elif int(parts[2]) > 0:
                    only_vertices = False
            elif parts[:1] == ["property"] and element == "vertex":
                if parts[1] == "list" or parts[1] not in _PLY_TYPES:
                    only_vertices = False
                else:
                    fields.append((parts[2], _PLY_TYPES[parts[1]]))
        names = {name for name, _ in fields}
        if (
            "format binary_little_endian 1.0" in header
            and only_vertices
            and {"x", "y", "z"} <= names
        ):
            data = np.fromfile(fh, dtype=np.dtype(fields), count=count)
            return np.stack([data["x"], data["y"], data["z"]], axis=-1).astype(np.float64)
    import open3d as o3d

    return np.asarray(o3d.io.read_point_cloud(path).points)


def fusion_options(engine: str, threads: int) -> pycolmap.StereoFusionOptions:
    options = pycolmap.StereoFusionOptions()
    options.num_threads = threads
    options.max_reproj_error = 2.0
    options.max_depth_error = 0.01
    if engine == "opencv-sgbm":
        # normals from plane fits of matched depth are rougher than PatchMatch's, and the
        # depth maps were already checked against their neighbours
        options.max_normal_error = SGBM_MAX_NORMAL_ERROR
        options.min_num_pixels = SGBM_MIN_NUM_PIXELS
    else:
        options.max_normal_error = 10.0
        options.min_num_pixels = 5
    return options


def _fuse(
    ctx: StageContext, workspace: Path, options: pycolmap.StereoFusionOptions
) -> pycolmap.Reconstruction:
    """stereo_fusion on a helper thread, so a cancel can stop it."""
    token = pycolmap.CancellationToken()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["rec"] = pycolmap.stereo_fusion(
                str(workspace / FUSED),
                str(ctx.stage_dir("stereo")),
                workspace_format="COLMAP",
                input_type="geometric",
                options=options,
                output_type="PLY",
                cancellation_token=token,
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="stereo-fusion", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
        if ctx.cancelled():
            token.cancel()
            thread.join()
            raise Cancelled()
    if "error" in box:
        exc = box["error"]
        raise TransientError(f"stereo fusion failed: {exc}") from exc
    rec: pycolmap.Reconstruction = box["rec"]
    return rec


def run(ctx: StageContext) -> StageResult:
    done = finished(ctx, STAGE)
    if done is not None:
        return done
    require(ctx, STAGE, "stereo", "metrics.json")
    timer = Timer()
    stereo = read_metrics(ctx.workspace, "stereo")
    device = str(stereo.get("device") or "cpu")
    ctx.progress(0.0, "fusing depth maps")
    with building(ctx, STAGE) as out:
        options = fusion_options(str(stereo.get("engine", "")), num_threads(ctx))
        _fuse(ctx, out, options)
        ply = out / FUSED
        pts = read_ply_points(ply) if ply.is_file() else np.zeros((0, 3))
        n = len(pts)
        if n < MIN_POINTS:
            raise PermanentError(
                f"the fused point cloud has {n} points (at least {MIN_POINTS} are needed)",
                hint="the photos may lack texture or overlap; take more photos, closer together",
            )
        lo, hi = np.percentile(pts, 1, axis=0), np.percentile(pts, 99, axis=0)
        metrics: dict[str, Any] = {
            "points": n,
            "bbox_p01_p99": [lo.round(4).tolist(), hi.round(4).tolist()],
            "max_normal_error": options.max_normal_error,
            "min_num_pixels": options.min_num_pixels,
            "seconds": timer.seconds,
        }
        result = record(out, StageResult(metrics=metrics, device=device))
    ctx.progress(1.0, f"{n} fused points")
    return result
