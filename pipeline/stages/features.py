"""features: SIFT keypoints and descriptors into a COLMAP database.

Reads `ingest/images/` and `ingest/images.json`. Publishes `<workspace>/features/`:

- `database.db`: COLMAP database with cameras, images, keypoints and descriptors;
- `metrics.json`.

Images that share size, EXIF make/model and focal length share one camera (SIMPLE_RADIAL),
so bundle adjustment refines one set of intrinsics; its focal starts from the EXIF prior
when there is one. Every image is entered in the database, in name order, before its
features are extracted: COLMAP's extractor would number images in the order its threads
finish them, and image ids decide the order of every later stage's work (pairs, mapping), so
the same photos would not always give the same model. Images are extracted in small batches
so that progress is real and a cancel stops the stage within one batch (the running batch is
cancelled through pycolmap's CancellationToken).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pycolmap

from pipeline.context import StageContext, StageResult
from pipeline.stages._common import (
    FEATURES_DB,
    INGEST_IMAGES,
    Timer,
    call_cancellable,
    colmap_device,
    read_image_list,
    require,
    stage_preset,
    thread_count,
)
from pipeline.stages._workspace import building, finished, record

NAME = "features"
BATCH = 8  # images per extraction call
DEFAULT_FOCAL_FACTOR = 1.2  # focal = factor * longest side when EXIF has none


def camera_groups(images: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Images that should share one camera: same size, make, model and focal prior."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for image in images:
        focal = image.get("focal_px")
        key = (
            image["width"],
            image["height"],
            image.get("make"),
            image.get("model"),
            None if focal is None else round(float(focal), 1),
        )
        groups.setdefault(key, []).append(image)
    return list(groups.values())


def run(ctx: StageContext) -> StageResult:
    done = finished(ctx, NAME)
    if done is not None:
        return done
    timer = Timer()
    images = read_image_list(ctx)
    image_dir = require(ctx, INGEST_IMAGES)
    settings = stage_preset(ctx)
    dev, dev_name = colmap_device(ctx)

    extraction = pycolmap.FeatureExtractionOptions()
    extraction.num_threads = thread_count(ctx)
    extraction.max_image_size = settings.max_image_size if settings.max_image_size > 0 else -1
    extraction.sift.max_num_features = settings.max_num_features

    with building(ctx, NAME) as tmp:
        db_path = tmp / FEATURES_DB[-1]
        extract_all(ctx, db_path, image_dir, images, extraction, dev)
        num_images, num_cameras, keypoints = database_counts(db_path)
        result = StageResult(
            metrics={
                "images": num_images,
                "cameras": num_cameras,
                "keypoints_total": int(sum(keypoints)),
                "keypoints_mean": round(sum(keypoints) / max(1, len(keypoints)), 1),
                "keypoints_min": int(min(keypoints, default=0)),
                "max_num_features": settings.max_num_features,
                "seconds": timer.seconds,
            },
            device=dev_name,
        )
        record(tmp, result)
    return result


def extract_all(
    ctx: StageContext,
    db_path: Path,
    image_dir: Path,
    images: list[dict[str, Any]],
    extraction: pycolmap.FeatureExtractionOptions,
    dev: pycolmap.Device,
) -> None:
    """Features of every image into the database, one camera per group, in batches of
    BATCH images (real progress, and a cancel stops within one batch)."""
    done = 0
    for group in camera_groups(images):
        reader = pycolmap.ImageReaderOptions()
        names = sorted(image["name"] for image in group)
        reader.existing_camera_id = _enter_group(db_path, group[0], names)
        for start in range(0, len(names), BATCH):
            batch = names[start : start + BATCH]
            call_cancellable(
                ctx, partial(_extract, db_path, image_dir, batch, reader, extraction, dev)
            )
            done += len(batch)
            ctx.progress(done / len(images), f"extracted features from {done}/{len(images)}")


def database_counts(db_path: Path) -> tuple[int, int, list[int]]:
    """Images, cameras, and keypoints per image in a features database."""
    db = pycolmap.Database.open(db_path)
    try:
        keypoints = [db.num_keypoints_for_image(im.image_id) for im in db.read_all_images()]
        return db.num_images(), db.num_cameras(), keypoints
    finally:
        db.close()


def _extract(
    db_path: Path,
    image_dir: Path,
    names: list[str],
    reader: pycolmap.ImageReaderOptions,
    extraction: pycolmap.FeatureExtractionOptions,
    dev: pycolmap.Device,
    token: pycolmap.CancellationToken,
) -> None:
    pycolmap.extract_features(
        db_path,
        image_dir,
        image_names=names,
        camera_mode=pycolmap.CameraMode.SINGLE,
        reader_options=reader,
        extraction_options=extraction,
        device=dev,
        cancellation_token=token,
    )


def _enter_group(db_path: Path, image: dict[str, Any], names: list[str]) -> int:
    """Write the camera of a group of images (`image` is one of them), its rig, and an image
    and a frame for each of `names`, in that order; the camera's id."""
    width, height = int(image["width"]), int(image["height"])
    prior = image.get("focal_px")
    focal = float(prior) if prior else DEFAULT_FOCAL_FACTOR * max(width, height)
    camera = pycolmap.Camera(
        model="SIMPLE_RADIAL",
        width=width,
        height=height,
        params=[focal, width / 2.0, height / 2.0, 0.0],
    )
    camera.has_prior_focal_length = bool(prior)
    db = pycolmap.Database.open(db_path)
    try:
        camera_id = int(db.write_camera(camera))
        rig = pycolmap.Rig()
        rig.add_ref_sensor(db.read_camera(camera_id).sensor_id)
        rig_id = db.write_rig(rig)
        for name in names:
            entered = db.read_image(db.write_image(pycolmap.Image(name=name, camera_id=camera_id)))
            frame = pycolmap.Frame()
            frame.rig_id = rig_id
            frame.add_data_id(entered.data_id)
            db.write_frame(frame)
        return camera_id
    finally:
        db.close()
