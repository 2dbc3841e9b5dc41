"""Photos taken by a fixed camera of a subject that moves (a turntable, or a hand turning
the object in front of a camera on a tripod) also show a background that stands still:
its matches sit at the same pixel in every photo. Verification keeps them, since a point
that does not move fits any pair's epipolar geometry of a pure translation, and mapping,
which takes the whole scene as one rigid body, then bends the subject to fit a background
that moved with the camera. On ViSP's castel sequence (a castle moved before a fixed
RealSense) half of all verified matches stood still, and the castle came out tilted, the
box behind it at less than half its distance; without them the sparse depth correlates
at +0.84 with the depth sensor's instead of -0.47, and reprojects at 0.48 px, not 1.0.

`still_pairs` finds such a background in the verified pairs; `verify_without_still`
verifies every pair again without the matches that stand still (COLMAP's stationary-match
filter), from the raw matches and the inliers verification (or guided matching) found:
between neighbouring photos of a slow turntable that also drops the subject's matches,
which are the ones with the least parallax.

The background also has depth: stereo finds the textured wall behind a turntable in every
depth map, each time where the camera was in the subject's frame, and fusion keeps the
fragments that happen to agree. `background_masks` draws, in each undistorted photo, the
pixels nearer to a keypoint that stands still than to one the sparse model placed, for
fusion to leave out. On the turntable demo variant that lifts the mesh's object precision
from 0.55 to 0.99.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pycolmap
from PIL import Image

from pipeline.stages._common import RANDOM_SEED

# A match whose two keypoints lie less than this apart stands still (keypoints of a still
# background moved at most 0.5 px between castel's photos).
STILL_PX = 1.0
# A pair shows a still background when at least this share of its inliers stands still:
# verification often keeps the background alone, the subject's matches being the outliers
# of a background that does not move (the turntable demo variant: 98 % of the inliers,
# median). Measured: every pair of castel (median 49 %) and of the turntable; on the other
# demo variants no pair, at most 5 % of a pair's inliers.
STILL_SHARE = 0.2
# The photos were taken by a fixed camera when this share of the verified pairs shows it.
STILL_PAIRS = 0.25
MIN_INLIERS = 15  # pairs with fewer inliers are not counted (COLMAP's verification minimum)
# A keypoint stands still when more than this share of its raw matches does (a point of
# the background sits at the same pixel in every photo; one of a subject that moves,
# only in the photos nearest to its own).
STILL_MATCHES = 0.5


def _displacements(keypoints: dict[int, np.ndarray], i: int, j: int, m: np.ndarray) -> np.ndarray:
    return np.asarray(np.linalg.norm(keypoints[i][m[:, 0]] - keypoints[j][m[:, 1]], axis=1))


def still_pairs(db_path: Path) -> tuple[int, int]:
    """(pairs showing a still background, pairs counted)."""
    db = pycolmap.Database.open(db_path)
    try:
        keypoints = {
            im.image_id: db.read_keypoints(im.image_id)[:, :2] for im in db.read_all_images()
        }
        pair_ids, geometries = db.read_two_view_geometries()
    finally:
        db.close()
    still = counted = 0
    for pair_id, geometry in zip(pair_ids, geometries, strict=True):
        inliers = geometry.inlier_matches
        if len(inliers) < MIN_INLIERS:
            continue
        counted += 1
        moved = _displacements(keypoints, *pycolmap.pair_id_to_image_pair(pair_id), inliers)
        if (moved < STILL_PX).mean() >= STILL_SHARE:
            still += 1
    return still, counted


def verify_without_still(db_path: Path) -> tuple[int, int]:
    """Verify every pair again, leaving out the matches that stand still; (inliers before,
    inliers after), over all pairs."""
    options = pycolmap.TwoViewGeometryOptions()
    options.ransac.random_seed = RANDOM_SEED
    # COLMAP's default: matches that move less than 4 px. Castel's sparse depth against the
    # sensor's: correlation 0.48 at 1 px, 0.68 at 1.5, 0.74 at 3, 0.84 at 4.
    options.filter_stationary_matches = True
    before = after = 0
    db = pycolmap.Database.open(db_path)
    try:
        images = {im.image_id: im for im in db.read_all_images()}
        cameras = {c.camera_id: c for c in db.read_all_cameras()}
        keypoints = {i: db.read_keypoints(i)[:, :2].astype(np.float64) for i in images}
        pair_ids, geometries = db.read_two_view_geometries()
        for pair_id, geometry in zip(pair_ids, geometries, strict=True):
            i, j = pycolmap.pair_id_to_image_pair(pair_id)
            raw = db.read_matches(i, j) if db.exists_matches(i, j) else np.zeros((0, 2))
            matches = np.unique(np.vstack([raw, geometry.inlier_matches]).astype(np.uint32), axis=0)
            again = pycolmap.estimate_two_view_geometry(
                cameras[images[i].camera_id],
                keypoints[i],
                cameras[images[j].camera_id],
                keypoints[j],
                matches,
                options,
            )
            before += len(geometry.inlier_matches)
            after += len(again.inlier_matches)
            db.update_two_view_geometry(i, j, again)
    finally:
        db.close()
    return before, after


def still_keypoints(db_path: Path) -> dict[str, np.ndarray]:
    """Per photo name, which of its keypoints stand still (a boolean per keypoint): more
    than STILL_MATCHES of their raw matches moved less than STILL_PX."""
    db = pycolmap.Database.open(db_path)
    try:
        names = {im.image_id: im.name for im in db.read_all_images()}
        keypoints = {i: db.read_keypoints(i)[:, :2] for i in names}
        still = {i: np.zeros(len(k), np.int32) for i, k in keypoints.items()}
        matched = {i: np.zeros(len(k), np.int32) for i, k in keypoints.items()}
        for pair_id in db.read_two_view_geometries()[0]:
            i, j = pycolmap.pair_id_to_image_pair(pair_id)
            if not db.exists_matches(i, j):
                continue
            m = db.read_matches(i, j).astype(np.int64)
            moved = _displacements(keypoints, i, j, m)
            for image, column in ((i, 0), (j, 1)):
                np.add.at(matched[image], m[:, column], 1)
                np.add.at(still[image], m[moved < STILL_PX, column], 1)
    finally:
        db.close()
    return {names[i]: still[i] > STILL_MATCHES * np.maximum(matched[i], 1) for i in names}


def background_mask(
    still_xy: np.ndarray, subject_xy: np.ndarray, width: int, height: int
) -> np.ndarray:
    """(height, width) booleans, true where the nearest of these keypoints stands still.
    (A vote of the 3, 5 or 7 nearest keypoints cut off the far side of the turntable demo
    variant's plate, where few keypoints were placed: scene F 0.88-0.86 against 0.91.)"""

    def distance_to(points: np.ndarray) -> np.ndarray:
        seeds = np.full((height, width), 255, np.uint8)
        cells = np.clip(np.rint(points).astype(np.int64), 0, [width - 1, height - 1])
        seeds[cells[:, 1], cells[:, 0]] = 0
        return np.asarray(cv2.distanceTransform(seeds, cv2.DIST_L2, cv2.DIST_MASK_PRECISE))

    if not len(still_xy) or not len(subject_xy):
        return np.full((height, width), bool(len(still_xy)))
    return distance_to(still_xy) < distance_to(subject_xy)


def background_masks(db_path: Path, model_dir: Path, out: Path) -> dict[str, float]:
    """Write COLMAP masks (`<photo name>.png`, 0 on the still background, 255 elsewhere)
    into `out` for the photos of the undistorted model in `model_dir`, whose keypoints are
    the database's, in the same order. The share of each photo left out, by name."""
    still = still_keypoints(db_path)
    model = pycolmap.Reconstruction(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    shares = {}
    for image in model.images.values():
        camera = model.cameras[image.camera_id]
        xy = np.array([p.xy for p in image.points2D]).reshape(-1, 2)
        placed = np.array([p.has_point3D() for p in image.points2D], bool)
        background = still[image.name] & ~placed
        mask = background_mask(xy[background], xy[placed], camera.width, camera.height)
        # PIL, not cv2.imwrite, which returns False on a full disk instead of raising
        Image.fromarray(np.where(mask, 0, 255).astype(np.uint8)).save(out / f"{image.name}.png")
        shares[image.name] = float(mask.mean())
    return shares
