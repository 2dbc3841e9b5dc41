"""fusion: merge the depth maps into one coloured, oriented point cloud.

Runs `pycolmap.stereo_fusion` on the dense workspace that `stereo` published and writes
`<ws>/fusion/fused.ply` (binary PLY with normals and colours). A cloud too small to mesh
is a PermanentError: Poisson meshing crashes on an empty cloud, so it is never reached.

Photos taken by a fixed camera of a subject that moved (matching's `fixed_camera`) are
fused through masks of the background that stood still (`<ws>/fusion/masks`, see _still):
its depth, taken each time from where the camera was in the subject's frame, would
otherwise leave fragments round the subject.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import open3d as o3d
import pycolmap

from pipeline.context import StageContext, StageResult
from pipeline.errors import Cancelled, PermanentError, TransientError
from pipeline.stages._common import (
    FUSED_CLOUD,
    MATCHING_DB,
    STEREO_WORKSPACE,
    Timer,
    call_cancellable,
    require,
    thread_count,
)
from pipeline.stages._still import background_masks
from pipeline.stages._workspace import building, finished, read_metrics, record

NAME = "fusion"
MIN_POINTS = 1000  # fewer fused points than this cannot make a useful mesh
SGBM_MIN_NUM_PIXELS = 3  # views a fused point needs (depth maps from pair matching)
SGBM_MAX_NORMAL_ERROR = 20.0  # degrees


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


def fuse(
    ctx: StageContext, dense_workspace: Path, out: Path, options: pycolmap.StereoFusionOptions
) -> None:
    """stereo_fusion of a COLMAP dense workspace into `out` (a PLY file); a cancel stops it."""

    def fusion(token: pycolmap.CancellationToken) -> None:
        pycolmap.stereo_fusion(
            str(out),
            str(dense_workspace),
            workspace_format="COLMAP",
            input_type="geometric",
            options=options,
            output_type="PLY",
            cancellation_token=token,
        )

    try:
        call_cancellable(ctx, fusion, interval=0.5)
    except Cancelled:
        raise
    except Exception as exc:
        raise TransientError(f"stereo fusion failed: {exc}") from exc


def read_points(path: Path) -> np.ndarray:
    """The positions (n, 3) of a PLY point cloud; none if the file is missing."""
    if not path.is_file():
        return np.zeros((0, 3))
    return np.asarray(o3d.io.read_point_cloud(path).points)


def run(ctx: StageContext) -> StageResult:
    done = finished(ctx, NAME)
    if done is not None:
        return done
    dense_workspace = require(ctx, STEREO_WORKSPACE)
    timer = Timer()
    stereo = read_metrics(ctx.workspace, STEREO_WORKSPACE[0])
    device = str(stereo.get("device") or "cpu")
    with building(ctx, NAME) as out:
        options = fusion_options(str(stereo.get("engine", "")), thread_count(ctx))
        masked = None
        if read_metrics(ctx.workspace, MATCHING_DB[0]).get("fixed_camera"):
            ctx.progress(0.0, "masking the background that stood still")
            shares = background_masks(
                require(ctx, MATCHING_DB), dense_workspace / "sparse", out / "masks"
            )
            options.mask_path = str(out / "masks")
            masked = round(float(np.median(list(shares.values()))), 3)
            ctx.log.info("fusion: the still background masked, %.0f %% of a photo", 100 * masked)
        ctx.progress(0.0, "fusing depth maps")
        fused = out / FUSED_CLOUD[-1]
        fuse(ctx, dense_workspace, fused, options)
        pts = read_points(fused)
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
            # the median share of a photo masked as still background; None: no mask
            "background_masked": masked,
            "seconds": timer.seconds,
        }
        result = record(out, StageResult(metrics=metrics, device=device))
    ctx.progress(1.0, f"{n} fused points")
    return result
