"""Place a photo the job never saw in the job's own model, as COLMAP's `image_registrator`
does: for judging the job from a held-out view.

The photo's SIFT features are matched with those of the job's photos (nearest neighbour,
ratio test, both ways); the matches that land on a keypoint of the job's sparse model give
2D-3D correspondences, and the photo's pose follows from them by RANSAC and refinement,
with the job's own lens held fixed. The pose is in the model's frame, with the model's
lens: no second reconstruction to align, no second self-calibration to disagree with.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.stages._common import MAPPING_MODEL, MATCHING_DB, RANDOM_SEED

RATIO = 0.8  # Lowe's ratio test
MIN_CORRESPONDENCES = 30


@dataclass
class Localised:
    camera: Any  # pycolmap.Camera: the job's lens, distortion included
    cam_from_world: np.ndarray  # 3 x 4, in the job's model frame
    correspondences: int
    inliers: int

    def rays(self) -> np.ndarray:
        """(height, width, 6): origin and unit direction of the ray through each pixel's
        centre, in the model's frame, through the lens (distortion included)."""
        cam = self.camera
        gx, gy = np.meshgrid(np.arange(cam.width) + 0.5, np.arange(cam.height) + 0.5)
        xy = cam.cam_from_img(np.stack([gx.ravel(), gy.ravel()], axis=1))
        rotation, translation = self.cam_from_world[:, :3], self.cam_from_world[:, 3]
        d = np.concatenate([xy, np.ones((len(xy), 1))], axis=1) @ rotation  # R^T d
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        centre = -rotation.T @ translation
        rays = np.concatenate([np.broadcast_to(centre, d.shape), d], axis=1)
        out: np.ndarray = rays.reshape(cam.height, cam.width, 6)
        return out


def _unit(descriptors: np.ndarray) -> np.ndarray:
    d = np.asarray(descriptors, np.float32)
    out: np.ndarray = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    return out


def localise(workspace: Path, photo: Path) -> Localised | None:
    """The pose of `photo` in the model of the job at `workspace` (its `mapping` and
    `matching` outputs), or None when fewer than MIN_CORRESPONDENCES of its features land
    on the model's points."""
    import cv2
    import pycolmap
    from PIL import Image

    model = pycolmap.Reconstruction(str(workspace.joinpath(*MAPPING_MODEL)))
    with Image.open(photo) as im:
        gray = np.ascontiguousarray(np.asarray(im.convert("L")))
    sizes = {(c.width, c.height) for c in model.cameras.values()}
    if (gray.shape[1], gray.shape[0]) not in sizes:
        raise ValueError(
            f"{photo.name} is {gray.shape[1]}x{gray.shape[0]}, the job's photos {sizes}: "
            "give it at the size the job's ingest left them"
        )
    extractor = pycolmap.FeatureExtractor.create(
        pycolmap.FeatureExtractionOptions(), device=pycolmap.Device.cpu
    )
    features, descriptors = extractor.extract(pycolmap.Bitmap.from_array(gray))
    keypoints = np.array([(k.x, k.y) for k in features], np.float64).reshape(-1, 2)
    query = _unit(descriptors.data)
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    votes: dict[int, Counter[int]] = {}  # photo keypoint -> model points it matched
    db = pycolmap.Database.open(workspace.joinpath(*MATCHING_DB))
    try:
        for image_id in model.reg_image_ids():
            image = model.images[image_id]
            train = _unit(db.read_descriptors(image_id).data)
            forward = matcher.knnMatch(query, train, k=2)
            backward = {m.queryIdx: m.trainIdx for m in matcher.match(train, query)}
            for pair in forward:
                if len(pair) < 2 or pair[0].distance >= RATIO * pair[1].distance:
                    continue
                q, t = pair[0].queryIdx, pair[0].trainIdx
                if backward.get(t) != q:
                    continue
                point = image.points2D[t]
                if point.has_point3D():
                    votes.setdefault(q, Counter())[point.point3D_id] += 1
    finally:
        db.close()
    if len(votes) < MIN_CORRESPONDENCES:
        return None
    index = sorted(votes)
    chosen = [votes[q].most_common(1)[0][0] for q in index]
    points2d = keypoints[index]
    points3d = np.array([model.points3D[p].xyz for p in chosen])
    # the lens of the job's photo that sees most of those points (one lens for all, usually)
    seen_by = Counter(e.image_id for p in set(chosen) for e in model.points3D[p].track.elements)
    camera = model.cameras[model.images[seen_by.most_common(1)[0][0]].camera_id]
    estimation = pycolmap.AbsolutePoseEstimationOptions()
    estimation.ransac.random_seed = RANDOM_SEED  # the same photo gets the same pose each time
    found = pycolmap.estimate_and_refine_absolute_pose(points2d, points3d, camera, estimation)
    if found is None:
        return None
    return Localised(
        camera=camera,
        cam_from_world=np.asarray(found["cam_from_world"].matrix()),
        correspondences=len(index),
        inliers=int(found["num_inliers"]),
    )
