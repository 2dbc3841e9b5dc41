"""The views stereo works on (pinhole cameras at depth-map scale, with the sparse points
each sees), and which views each is matched with and checked against."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pycolmap
from scipy import sparse

from pipeline.errors import PermanentError

# Neighbour selection (degrees are triangulation angles at the scene).
NUM_STEREO_NEIGHBOURS = 4  # pairs matched per view, at most
# and only those scoring at least this share of the view's best pair: a weak pair (few
# shared points, or a wide angle and so a wide disparity range) costs as much to match as
# a good one, or more, and adds little
MIN_RELATIVE_PAIR_SCORE = 0.5
NUM_CHECK_NEIGHBOURS = 8  # views a depth must be consistent with (some of)
MIN_PAIR_ANGLE = 3.0
BEST_PAIR_ANGLE = 10.0
MAX_PAIR_ANGLE = 45.0


@dataclass
class View:
    index: int
    name: str
    K: np.ndarray  # depth-map scale; pixel (col, row) centre at (col, row)
    R: np.ndarray  # world -> camera
    t: np.ndarray
    width: int  # depth-map size
    height: int
    points: np.ndarray = field(repr=False)  # sparse points this view sees, (n, 3)
    point_ids: np.ndarray = field(repr=False)  # their ids, (n,), ascending

    @property
    def centre(self) -> np.ndarray:
        c: np.ndarray = -self.R.T @ self.t
        return c


def depth_map_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """The size COLMAP gives a depth map of an image limited to max_size."""
    if max_size <= 0 or max(width, height) <= max_size:
        return width, height
    scale = max_size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def load_views(sparse_dir: Path, max_size: int) -> list[View]:
    rec = pycolmap.Reconstruction(str(sparse_dir))
    views: list[View] = []
    xyz = {pid: p.xyz for pid, p in rec.points3D.items()}
    for image_id in sorted(rec.reg_image_ids()):
        image = rec.images[image_id]
        cam = rec.cameras[image.camera_id]
        if cam.model.name not in ("PINHOLE", "SIMPLE_PINHOLE"):
            raise PermanentError(
                f"image {image.name} has camera model {cam.model.name}; stereo needs "
                "undistorted (pinhole) images",
            )
        w, h = depth_map_size(cam.width, cam.height, max_size)
        sx, sy = w / cam.width, h / cam.height
        k_full = cam.calibration_matrix()
        K = np.array(
            [
                [k_full[0, 0] * sx, 0.0, k_full[0, 2] * sx - 0.5],
                [0.0, k_full[1, 1] * sy, k_full[1, 2] * sy - 0.5],
                [0.0, 0.0, 1.0],
            ]
        )
        pose = image.cam_from_world()
        ids = sorted({p.point3D_id for p in image.points2D if p.has_point3D()} & xyz.keys())
        pts = np.array([xyz[i] for i in ids], dtype=np.float64).reshape(-1, 3)
        views.append(
            View(
                index=len(views),
                name=image.name,
                K=K,
                R=np.asarray(pose.rotation.matrix(), dtype=np.float64),
                t=np.asarray(pose.translation, dtype=np.float64),
                width=w,
                height=h,
                points=pts,
                point_ids=np.array(ids, dtype=np.int64),
            )
        )
    return views


def covisibility(sparse_dir: Path, views: list[View]) -> np.ndarray:
    """Shared sparse points between every two views, (n, n)."""
    rec = pycolmap.Reconstruction(str(sparse_dir))
    col_of = {rec.find_image_with_name(v.name).image_id: v.index for v in views}
    rows: list[int] = []
    cols: list[int] = []
    for k, point in enumerate(rec.points3D.values()):
        for el in point.track.elements:
            c = col_of.get(el.image_id)
            if c is not None:
                rows.append(k)
                cols.append(c)
    n = len(views)
    if not rows:
        return np.zeros((n, n))
    inc = sparse.csr_matrix(
        (np.ones(len(rows)), (rows, cols)), shape=(max(rows) + 1, n), dtype=np.float64
    )
    inc.data[:] = 1.0
    co = (inc.T @ inc).toarray()
    np.fill_diagonal(co, 0.0)
    return np.asarray(co)


def neighbours(views: list[View], co: np.ndarray) -> tuple[list[list[int]], list[list[int]]]:
    """For each view: the views to match it with, and the views to check it against."""
    centres = np.array([v.centre for v in views])
    stereo_nb: list[list[int]] = []
    check_nb: list[list[int]] = []
    for v in views:
        # where the view looks: its sparse points, or a unit ahead if it has none
        anchor = np.median(v.points, axis=0) if len(v.points) else v.centre + v.R[2]
        a = centres[v.index] - anchor
        b = centres - anchor
        cos = (b @ a) / np.maximum(np.linalg.norm(b, axis=1) * np.linalg.norm(a), 1e-12)
        angle = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
        shared = co[v.index]
        weight = np.clip(angle / BEST_PAIR_ANGLE, 0.0, 1.0) * np.clip(
            (MAX_PAIR_ANGLE - angle) / 15.0, 0.0, 1.0
        )
        score = shared * weight
        score[(angle < MIN_PAIR_ANGLE) | (shared <= 0)] = 0.0
        score[v.index] = 0.0
        keep = (score > 0) & (score >= MIN_RELATIVE_PAIR_SCORE * score.max())
        order = [int(j) for j in np.argsort(-score) if keep[j]]
        stereo_nb.append(order[:NUM_STEREO_NEIGHBOURS])
        check = shared * (angle >= 1.0)
        check[v.index] = 0.0
        check_nb.append([int(j) for j in np.argsort(-check) if check[j] > 0][:NUM_CHECK_NEIGHBOURS])
    return stereo_nb, check_nb
