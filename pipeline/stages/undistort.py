"""undistort: a COLMAP dense workspace with undistorted (pinhole) images.

Reads `mapping/sparse/0/` and `ingest/images/`. Publishes `<workspace>/undistort/`, the
layout COLMAP's PatchMatch stereo and fusion expect:

- `images/<name>`: undistorted images, longest side at most the preset's stereo_max_size;
- `sparse/{cameras,images,points3D}.bin`: the model with PINHOLE cameras matching them;
- `stereo/{depth_maps,normal_maps,consistency_graphs}/`: empty, for the stereo stage;
- `stereo/patch-match.cfg`, `stereo/fusion.cfg`: the source images per reference image;
- `metrics.json`.
"""

from __future__ import annotations

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
NUM_SOURCE_IMAGES = 20  # source images per reference image in patch-match.cfg


def run(ctx: StageContext) -> StageResult:
    done = finished(ctx, NAME)
    if done is not None:
        return done
    timer = Timer()
    model_dir = require(ctx, MAPPING_MODEL)
    image_dir = require(ctx, INGEST_IMAGES)
    settings = stage_preset(ctx)

    options = pycolmap.UndistortCameraOptions()
    options.max_image_size = settings.stereo_max_size if settings.stereo_max_size > 0 else -1
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
                "seconds": timer.seconds,
            }
        )
        record(tmp, result)
    ctx.progress(1.0, f"undistorted {result.metrics['images']} images")
    return result
