"""mapping: camera poses and a sparse point cloud (structure from motion).

Reads `matching/database.db` and `ingest/images/`. Publishes `<workspace>/mapping/`:

- `sparse/0/{cameras,images,points3D}.bin`: the largest model, COLMAP binary format;
- `points.ply`: its sparse points (for previews);
- `metrics.json`: registered/total images, mean reprojection error, points, ...

The preset's mapper is "auto": incremental mapping below GLOBAL_FROM photos, global
(GLOMAP) from there, where it is the faster of the two with cameras at least as accurate
(bench mapper, hard demo variant, medium: 17-19 s against 34-43 s at 32 photos, 41-45 s
against 101 s at 64, 98-117 s against 289-293 s at 128); if global mapping leaves photos
out, incremental mapping runs as well and the model that places more wins. "incremental"
or "global" ask for one of them. Global mapping of a handful of photos can settle on a
wrong model (8 photos of the demo: cameras off by the ring's radius).
Incremental mapping uses relaxed absolute-pose thresholds, which register every image
of object rings where COLMAP's defaults leave some out. When some photos stay out,
mapping runs once more with the lens distortion held at zero (short camera paths cannot
tell distortion from focal length) and keeps the model that places more photos. Fewer
than 3 registered images, or fewer than half of them, is a PermanentError that says what
the user can do.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pycolmap

from pipeline.context import StageContext, StageResult
from pipeline.errors import PermanentError
from pipeline.presets import Preset
from pipeline.stages._common import (
    INGEST_IMAGES,
    MAPPING_MODEL,
    MATCHING_DB,
    RANDOM_SEED,
    Timer,
    call_cancellable,
    choose_device,
    require,
    stage_preset,
    thread_count,
)
from pipeline.stages._workspace import building, finished, record

NAME = "mapping"
# Incremental mapping's global bundle adjustments stop once an iteration changes the cost
# by less than this fraction (Ceres's own default; COLMAP's is 0: iterate until nothing
# changes). The extra iterations let a poorly observed lens distortion drift until COLMAP
# rejects the camera and starts another model from scratch. Measured on the same matches,
# alternating: castel's 15 photos 13.0 -> 5.2 s (one model instead of two, all placed),
# its other 15 frames 11.5 -> 7.4 s, the hard demo variant's 16 photos 7.0 -> 6.3 s, with
# the same photos placed and camera errors within 2 %.
BA_FUNCTION_TOLERANCE = 1e-6
GLOBAL_FROM = 32  # photos: `auto` maps this many or more globally
# Global positioning and the bundle adjustments after it use tracks until each photo has
# this many (GLOMAP's track selection; COLMAP's default takes every track); retriangulation
# then builds the full point cloud from all matches. On the hard demo variant's 64 photos
# at medium (41,620 tracks): 125 s -> 45 s, the same 64 photos placed, 44,390 points
# instead of 44,392 and the same camera error; 300 per photo took 37 s.
GLOBAL_TRACKS_PER_VIEW = 1000
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
    options.ba_global_function_tolerance = BA_FUNCTION_TOLERANCE
    options.num_threads = thread_count(ctx)
    options.min_num_matches = 8
    options.mapper.abs_pose_min_num_inliers = 12
    options.mapper.abs_pose_min_inlier_ratio = 0.15
    options.mapper.num_threads = thread_count(ctx)
    options.min_model_size = 3
    options.extract_colors = True
    options.random_seed = RANDOM_SEED
    return options


Models = dict[int, pycolmap.Reconstruction]


@dataclass
class Mapped:
    """The models of one mapping run and the one that places the most photos."""

    models: Models
    best: pycolmap.Reconstruction | None
    distortion: str  # refined | fixed
    mapper: str = "incremental"  # incremental | global

    @property
    def registered(self) -> int:
        return self.best.num_reg_images() if self.best is not None else 0


def auto_mapper(n_images: int) -> str:
    """The mapper `auto` runs first for `n_images` photos."""
    return "global" if n_images >= GLOBAL_FROM else "incremental"


def map_images(
    ctx: StageContext, settings: Preset, db_path: Path, image_dir: Path, folder: Path, total: int
) -> Mapped:
    """Camera poses and sparse points, written below `folder`, with the preset's mapper
    (see the module's docstring for `auto`); incremental mapping runs once more with the
    lens distortion held at zero if some photos stay out. Of several runs, the one that
    places more photos wins."""
    mapper = auto_mapper(total) if settings.mapper == "auto" else settings.mapper
    if mapper == "global":
        models = _global(ctx, db_path, image_dir, _scratch(folder, "models-global"), total)
        glob = _largest(models, mapper="global")
        if settings.mapper == "global" or glob.registered >= total:
            return glob
        ctx.log.info(
            "mapping: global mapping placed %d of %d images; mapping incrementally as well",
            glob.registered,
            total,
        )
        inc = _incremental_with_retry(ctx, db_path, image_dir, folder, total)
        return inc if inc.registered > glob.registered else glob
    return _incremental_with_retry(ctx, db_path, image_dir, folder, total)


def _incremental_with_retry(
    ctx: StageContext, db_path: Path, image_dir: Path, folder: Path, total: int
) -> Mapped:
    mapped = _largest(_incremental(ctx, db_path, image_dir, _scratch(folder, "models"), total))
    if mapped.registered >= total:
        return mapped
    # Short or nearly straight camera paths leave lens distortion unobservable: refining
    # it lets it drift until COLMAP rejects the camera as bogus and stops registering
    # images. Hold it at zero and keep whichever model places more photos.
    retry_dir = _scratch(folder, "models-fixed-distortion")
    fixed = _largest(
        _incremental(ctx, db_path, image_dir, retry_dir, total, refine_distortion=False), "fixed"
    )
    if fixed.registered <= mapped.registered:
        return mapped
    ctx.log.info(
        "mapping: %d of %d images placed with lens distortion held at zero (%d with it refined)",
        fixed.registered,
        total,
        mapped.registered,
    )
    return fixed


def _scratch(folder: Path, name: str) -> Path:
    path = folder / name
    path.mkdir()
    return path


def _largest(models: Models, distortion: str = "refined", mapper: str = "incremental") -> Mapped:
    best = max(models.values(), key=lambda r: r.num_reg_images(), default=None)
    return Mapped(models, best, distortion, mapper)


def model_metrics(best: pycolmap.Reconstruction, all_names: list[str]) -> dict[str, Any]:
    """What the published model looks like, for the ledger and report.json."""
    registered = {image.name for image in best.images.values() if image.has_pose}
    cameras = [
        {"camera_id": int(cid), "model": cam.model.name, "params": cam.params.tolist()}
        for cid, cam in best.cameras.items()
    ]
    return {
        "registered": best.num_reg_images(),
        "total": len(all_names),
        "unregistered": [name for name in all_names if name not in registered][:50],
        "points": best.num_points3D(),
        "mean_reprojection_error": round(float(best.compute_mean_reprojection_error()), 4),
        "mean_track_length": round(float(best.compute_mean_track_length()), 3),
        "mean_observations_per_image": round(
            float(best.compute_mean_observations_per_reg_image()), 1
        ),
        "cameras": cameras[:10],
    }


def image_names(db_path: Path) -> list[str]:
    db = pycolmap.Database.open(db_path)
    try:
        return sorted(image.name for image in db.read_all_images())
    finally:
        db.close()


def run(ctx: StageContext) -> StageResult:
    done = finished(ctx, NAME)
    if done is not None:
        return done
    timer = Timer()
    db_path = require(ctx, MATCHING_DB)
    image_dir = require(ctx, INGEST_IMAGES)
    settings = stage_preset(ctx)
    all_names = image_names(db_path)
    total = len(all_names)
    with building(ctx, NAME) as tmp:
        mapped = map_images(ctx, settings, db_path, image_dir, tmp, total)
        registered = mapped.registered
        if registered < MIN_REGISTERED or registered < MIN_REGISTERED_FRACTION * total:
            raise PermanentError(
                f"only {registered} of {total} images could be placed in one model", hint=HINT
            )
        assert mapped.best is not None
        sparse = tmp.joinpath(*MAPPING_MODEL[1:])
        sparse.mkdir(parents=True)
        mapped.best.write(sparse)
        mapped.best.export_PLY(tmp / "points.ply")
        for scratch in tmp.glob("models*"):
            shutil.rmtree(scratch)
        metrics = {
            "mapper": mapped.mapper,
            "distortion": mapped.distortion,
            "models": len(mapped.models),
            **model_metrics(mapped.best, all_names),
            "seconds": timer.seconds,
        }
        result = record(tmp, StageResult(metrics=metrics))
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
) -> Models:
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

    def mapping(token: pycolmap.CancellationToken) -> Models:
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


def _global(ctx: StageContext, db_path: Path, image_dir: Path, out: Path, total: int) -> Models:
    options = pycolmap.GlobalPipelineOptions()
    options.random_seed = RANDOM_SEED
    options.mapper.num_threads = thread_count(ctx)
    options.mapper.track_required_tracks_per_view = GLOBAL_TRACKS_PER_VIEW
    if choose_device(ctx.device) == "cpu":
        # no CUDA: ask for the CPU solvers instead of falling back
        options.mapper.global_positioning.use_gpu = False
        options.mapper.bundle_adjustment.ceres.use_gpu = False
    ctx.progress(0.05, f"global mapping of {total} images")

    def mapping(token: pycolmap.CancellationToken) -> Models:
        # global mapping takes no cancellation token: a cancel leaves the call running
        # until the stage's process exits
        return pycolmap.global_mapping(db_path, image_dir, out, options=options)

    return call_cancellable(ctx, mapping, abandon_on_cancel=True)
