"""undistort: a COLMAP dense workspace with undistorted (pinhole) images.

Reads `mapping/sparse/0/` and `ingest/images/`. Publishes `<workspace>/undistort/`, the
layout COLMAP's PatchMatch stereo and fusion expect:

- `images/<name>`: undistorted images at the size the depth maps are made at
  (`stereo_size`): half the photos' longest side, as OpenMVS (`--resolution-level 1`) and
  Meshroom (downscale 2) make theirs, but not below MIN_STEREO_SIZE (OpenMVS's
  `--min-resolution`) and not above the preset's stereo_max_size;
- `sparse/{cameras,images,points3D}.bin`: the model with PINHOLE cameras matching them;
- `stereo/{depth_maps,normal_maps,consistency_graphs}/`: empty, for the stereo stage;
- `stereo/patch-match.cfg`, `stereo/fusion.cfg`: the source images per reference image;
- `metrics.json`.
"""

from __future__ import annotations

import math

import pycolmap

from pipeline.context import StageContext, StageResult
from pipeline.stages._common import (
    INGEST_IMAGES,
    MAPPING_MODEL,
    Timer,
    call_cancellable,
    require,
    stage_preset,
    thread_count,
)
from pipeline.stages._workspace import building, finished, record

NAME = "undistort"
# Depth maps at half the photos' resolution are more complete, at an object-scale threshold,
# than at full resolution, where semi-global matching loses more pixels to noise and blur.
# Measured (object F-score at 1 % of the object's diagonal, the same sparse model): hard
# variant, 16 photos of 1600 px, 0.834 at 1600 px against 0.879 at 800; easy scene, 21
# photos of 1024 px, 0.983 at 1024 and 800, 0.987 at 640, 0.990 at 512.
STEREO_SCALE = 0.5
MIN_STEREO_SIZE = 640
NUM_SOURCE_IMAGES = 20  # source images per reference image in patch-match.cfg


def run(ctx: StageContext) -> StageResult:
    done = finished(ctx, NAME)
    if done is not None:
        return done
    timer = Timer()
    model_dir = require(ctx, MAPPING_MODEL)
    image_dir = require(ctx, INGEST_IMAGES)
    settings = stage_preset(ctx)

    longest = max(
        max(c.width, c.height) for c in pycolmap.Reconstruction(model_dir).cameras.values()
    )
    size = stereo_size(settings.stereo_max_size, longest)
    options = pycolmap.UndistortCameraOptions()
    options.max_image_size = size if size < longest else -1
    ctx.progress(0.0, "undistorting images")

    with building(ctx, NAME) as tmp:

        def undistort(token: pycolmap.CancellationToken) -> None:
            pycolmap.undistort_images(
                tmp,
                model_dir,
                image_dir,
                output_type="COLMAP",
                num_patch_match_src_images=NUM_SOURCE_IMAGES,
                undistort_options=options,
                jpeg_quality=95,
                num_threads=thread_count(ctx),
                cancellation_token=token,
            )

        call_cancellable(ctx, undistort)
        for sub in ("depth_maps", "normal_maps", "consistency_graphs"):
            (tmp / "stereo" / sub).mkdir(parents=True, exist_ok=True)
        model = pycolmap.Reconstruction(tmp / "sparse")
        sizes = sorted({f"{c.width}x{c.height}" for c in model.cameras.values()})
        result = StageResult(
            metrics={
                "images": model.num_reg_images(),
                "sizes": sizes,
                "stereo_max_size": settings.stereo_max_size,
                "stereo_size": size,
                "seconds": timer.seconds,
            }
        )
        record(tmp, result)
    ctx.progress(1.0, f"undistorted {result.metrics['images']} images")
    return result


def stereo_size(cap: int, longest: int) -> int:
    """Longest side of the depth maps of photos whose longest side is `longest`: half of it,
    at least MIN_STEREO_SIZE, at most `cap` (0: no cap) and the photos' own."""
    size = max(MIN_STEREO_SIZE, math.ceil(longest * STEREO_SCALE))
    return min(longest, size, cap) if cap > 0 else min(longest, size)
