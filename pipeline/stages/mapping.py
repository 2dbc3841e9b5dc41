"""mapping: camera poses and a sparse point cloud (structure from motion).

Reads `matching/database.db` and `ingest/images/`. Publishes `<workspace>/mapping/`:

- `sparse/0/{cameras,images,points3D}.bin`: the largest model, COLMAP binary format;
- `points.ply`: its sparse points (for previews);
- `metrics.json`: registered/total images, mean reprojection error, points, ...

Incremental mapping by default, global (GLOMAP) when the preset's mapper is "global".
Incremental mapping uses relaxed absolute-pose thresholds, which register every image
of object rings where COLMAP's defaults leave some out. When some photos stay out,
mapping runs once more with the lens distortion held at zero (short camera paths cannot
tell distortion from focal length) and keeps the model that places more photos. Fewer
than 3 registered images, or fewer than half of them, is a PermanentError that says what
the user can do.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pycolmap

from pipeline.context import StageContext, StageResult
from pipeline.errors import PermanentError
from pipeline.stages._sparse import (
    INGEST_IMAGES,
    MATCHING_DB,
    RANDOM_SEED,
    call_cancellable,
    device,
    num_threads,
    require,
)
from pipeline.stages._workspace import (
    Timer,
    building,
    finished,
    record,
    stage_preset,
)

NAME = "mapping"
MIN_REGISTERED = 3
MIN_REGISTERED_FRACTION = 0.5
HINT = (
    "take more photos with more overlap (each part of the subject in at least 3 photos, "
    "neighbouring photos sharing 60-80% of the view), avoid blur, reflections and plain "
    "untextured surfaces; or retry with quality='high' or options.mapper='global'"
)


def incremental_options(
    ctx: StageContext, *, refine_distortion: bool = True
) -> pycolmap.IncrementalPipelineOptions:
    options = pycolmap.IncrementalPipelineOptions()
    options.ba_refine_extra_params = refine_distortion
    options.num_threads = num_threads(ctx)
    options.min_num_matches = 8
    options.mapper.abs_pose_min_num_inliers = 12
    options.mapper.abs_pose_min_inlier_ratio = 0.15
    options.mapper.num_threads = num_threads(ctx)
    options.min_model_size = 3
    options.extract_colors = True
    options.random_seed = RANDOM_SEED
    return options


def run(ctx: StageContext) -> StageResult:
    done = finished(ctx, NAME)
    if done is not None:
        return done
    timer = Timer()
    db_path = require(ctx, NAME, MATCHING_DB)
    image_dir = require(ctx, NAME, INGEST_IMAGES)
    settings = stage_preset(ctx)

    db = pycolmap.Database.open(db_path)
    try:
        total = db.num_images()
    finally:
        db.close()

    with building(ctx, NAME) as tmp:
        models_dir = tmp / "models"
        models_dir.mkdir()
        distortion = "refined"
        if settings.mapper == "global":
            models = _global(ctx, db_path, image_dir, models_dir, total)
        else:
            models = _incremental(ctx, db_path, image_dir, models_dir, total)
        best = max(models.values(), key=lambda r: r.num_reg_images(), default=None)
        registered = best.num_reg_images() if best is not None else 0
        if settings.mapper != "global" and registered < total:
            # Short or nearly straight camera paths leave lens distortion unobservable:
            # refining it lets it drift until COLMAP rejects the camera as bogus and
            # stops registering images. Hold it at zero and keep whichever model places
            # more photos.
            retry_dir = tmp / "models-fixed-distortion"
            retry_dir.mkdir()
            fixed = _incremental(ctx, db_path, image_dir, retry_dir, total, refine_distortion=False)
            fixed_best = max(fixed.values(), key=lambda r: r.num_reg_images(), default=None)
            if fixed_best is not None and fixed_best.num_reg_images() > registered:
                ctx.log.info(
                    "mapping: %d of %d images placed with lens distortion held at zero "
                    "(%d with it refined)",
                    fixed_best.num_reg_images(),
                    total,
                    registered,
                )
                models, best, distortion = fixed, fixed_best, "fixed"
                registered = fixed_best.num_reg_images()
        if registered < MIN_REGISTERED or registered < MIN_REGISTERED_FRACTION * total:
            raise PermanentError(
                f"only {registered} of {total} images could be placed in one model",
                hint=HINT,
            )
        assert best is not None
        sparse = tmp / "sparse" / "0"
        sparse.mkdir(parents=True)
        best.write(sparse)
        best.export_PLY(tmp / "points.ply")
        for scratch in tmp.glob("models*"):
            shutil.rmtree(scratch)

        registered_names = {image.name for image in best.images.values() if image.has_pose}
        db = pycolmap.Database.open(db_path)
        try:
            all_names = sorted(image.name for image in db.read_all_images())
        finally:
            db.close()
        missing = [name for name in all_names if name not in registered_names]
        cameras = [
            {"camera_id": int(cid), "model": cam.model.name, "params": cam.params.tolist()}
            for cid, cam in best.cameras.items()
        ]
        result = StageResult(
            metrics={
                "mapper": settings.mapper,
                "distortion": distortion,
                "registered": registered,
                "total": total,
                "unregistered": missing[:50],
                "models": len(models),
                "points": best.num_points3D(),
                "mean_reprojection_error": round(float(best.compute_mean_reprojection_error()), 4),
                "mean_track_length": round(float(best.compute_mean_track_length()), 3),
                "mean_observations_per_image": round(
                    float(best.compute_mean_observations_per_reg_image()), 1
                ),
                "cameras": cameras[:10],
                "seconds": timer.seconds,
            }
        )
        record(tmp, result)
    ctx.progress(1.0, f"registered {registered}/{total} images")
    return result


def _incremental(
    ctx: StageContext,
    db_path: Path,
    image_dir: Path,
    out: Path,
    total: int,
    *,
    refine_distortion: bool = True,
) -> dict[int, pycolmap.Reconstruction]:
    options = incremental_options(ctx, refine_distortion=refine_distortion)
    count = {"registered": 0, "reported": -1}

    def on_image() -> None:  # called by the mapper after each registered image
        count["registered"] += 1

    def on_pair() -> None:
        count["registered"] += 2

    def poll() -> None:
        n = min(count["registered"], total)
        if n != count["reported"]:
            count["reported"] = n
            ctx.progress(0.95 * n / max(1, total), f"registered {n}/{total} images")

    def mapping(token: pycolmap.CancellationToken) -> dict[int, pycolmap.Reconstruction]:
        return pycolmap.incremental_mapping(
            db_path,
            image_dir,
            out,
            options=options,
            initial_image_pair_callback=on_pair,
            next_image_callback=on_image,
            cancellation_token=token,
        )

    return call_cancellable(ctx, mapping, poll=poll)


def _global(
    ctx: StageContext, db_path: Path, image_dir: Path, out: Path, total: int
) -> dict[int, pycolmap.Reconstruction]:
    options = pycolmap.GlobalPipelineOptions()
    options.random_seed = RANDOM_SEED
    options.mapper.num_threads = num_threads(ctx)
    _, dev_name = device(ctx)
    if dev_name == "cpu":  # no CUDA: ask for the CPU solvers instead of falling back
        options.mapper.global_positioning.use_gpu = False
        options.mapper.bundle_adjustment.ceres.use_gpu = False
    ctx.progress(0.05, f"global mapping of {total} images")

    def mapping(token: pycolmap.CancellationToken) -> dict[int, pycolmap.Reconstruction]:
        # global mapping takes no cancellation token: a cancel leaves the call running
        # until the stage's process exits
        return pycolmap.global_mapping(db_path, image_dir, out, options=options)

    return call_cancellable(ctx, mapping, abandon_on_cancel=True)
