"""stereo: a depth map and a normal map for every undistorted image.

Reads the COLMAP dense workspace that `undistort` wrote (`<ws>/undistort/images`,
`sparse/`) and publishes `<ws>/stereo/` as a complete COLMAP dense workspace of its own:
`images` and `sparse` are relative links to undistort's, `stereo/` holds
`depth_maps/<image>.{photometric,geometric}.bin`, `normal_maps/<image>.geometric.bin`
(PatchMatch also writes photometric normal maps), `patch-match.cfg` and `fusion.cfg`:
exactly what `pycolmap.stereo_fusion` reads with input_type="geometric".

Two engines, chosen by `ctx.device` (auto | cpu | gpu):

- gpu: COLMAP PatchMatch (`pycolmap.patch_match_stereo`, geometric consistency) on CUDA.
  The CUDA build of pycolmap aborts the process if PatchMatch runs without a GPU, so the
  GPU is counted first, in a throwaway subprocess.
- cpu: OpenCV semi-global matching on rectified pairs of neighbouring views (chosen from
  the sparse model by shared points and triangulation angle), one matching per pair
  giving depths to both of its views, with an occlusion (left-right) check, agreement
  between the pairs of a view, a multi-view geometric consistency check against the
  neighbours' depth maps, and normals from local plane fits of the depth map. Pairs and
  views are processed in parallel threads (OpenCV and numpy release the GIL).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pycolmap
from scipy import sparse

from pipeline.context import StageContext, StageResult
from pipeline.devices import cuda_device_count
from pipeline.errors import Cancelled, PermanentError, TransientError
from pipeline.stages._workspace import (
    Timer,
    building,
    finished,
    num_threads,
    record,
    require,
    stage_preset,
)

STAGE = "stereo"

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
MIN_SHARED_POINTS = 20  # sparse points a pair must share to take its depth range from them

# Filtering.
PAIR_AGREEMENT = 0.015  # relative depth difference for two pairs to agree
MIN_AGREEING_PAIRS = 1  # pairs of a view that must agree on a depth (where pairs overlap,
# a disagreeing pair vetoes)
GEOMETRIC_AGREEMENT = 0.01  # relative depth difference for two views to agree
MIN_CONSISTENT_VIEWS = 1  # other views whose depth maps must agree (fusion then asks for 3)
MIN_TEXTURE_STD = 2.0  # grey-level standard deviation (0..255) below which a pixel is blank
LR_MAX_DIFF = 1.0  # px: a match hidden behind one nearer by more than this is dropped

DEPTH_DIR = "depth_maps"
NORMAL_DIR = "normal_maps"


# ---------------------------------------------------------------- COLMAP array files


def write_colmap_array(path: Path, array: np.ndarray) -> None:
    """Write a (H, W) or (H, W, C) float32 array in COLMAP's mvs::Mat format:
    an ASCII header `width&height&channels&`, then the channels one after another,
    each row-major, little-endian float32."""
    a = np.asarray(array, dtype="<f4")
    if a.ndim == 2:
        a = a[:, :, None]
    h, w, c = a.shape
    with open(path, "wb") as fh:
        fh.write(f"{w}&{h}&{c}&".encode())
        fh.write(np.ascontiguousarray(a.transpose(2, 0, 1)).tobytes())


def read_colmap_array(path: Path) -> np.ndarray:
    """Read a COLMAP depth map (H, W) or normal map (H, W, 3)."""
    data = Path(path).read_bytes()
    fields, pos = [], 0
    for _ in range(3):
        end = data.index(b"&", pos)
        fields.append(int(data[pos:end]))
        pos = end + 1
    w, h, c = fields
    a = np.frombuffer(data, dtype="<f4", count=w * h * c, offset=pos).reshape(c, h, w)
    a = a.transpose(1, 2, 0)
    return a[:, :, 0].copy() if c == 1 else a.copy()


# ---------------------------------------------------------------- device


def choose_device(requested: str) -> str:
    """'gpu' or 'cpu' for a requested device (auto | cpu | gpu)."""
    if requested == "cpu":
        return "cpu"
    if requested not in ("auto", "gpu"):
        raise PermanentError(f"unknown device {requested!r}", hint="auto, cpu or gpu")
    gpus = cuda_device_count()
    if gpus > 0:
        return "gpu"
    if requested == "gpu":
        why = (
            "this pycolmap build has no CUDA support"
            if not getattr(pycolmap, "has_cuda", False)
            else "no CUDA device is visible"
        )
        raise PermanentError(
            f"device=gpu was requested but GPU stereo is not available: {why}",
            hint="install dropmesh[gpu] on a machine with an NVIDIA GPU, or use device=auto",
        )
    return "cpu"


# ---------------------------------------------------------------- views


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


# ---------------------------------------------------------------- pair matching


@dataclass
class Rectified:
    """A pair of views rotated to a common orientation whose x axis is the baseline,
    so that matching pixels share a row. The left view (`ref`) sees a point at column
    u_ref, the right view at u_src = u_ref - disparity, with disparity = f * b / z + shift
    and shift chosen so that every disparity in the scene's depth range is <= 0 (OpenCV's
    matcher then loses no columns at the left border)."""

    rotation: np.ndarray  # world -> rectified camera
    f: float
    cx_ref: float
    cx_src: float
    cy: float
    size: tuple[int, int]  # width, height
    h_ref: np.ndarray  # reference pixels -> rectified pixels
    h_src: np.ndarray
    baseline: float
    min_disp: int
    num_disp: int

    @property
    def shift(self) -> float:
        return self.cx_ref - self.cx_src


def _warp_corners(H: np.ndarray, w: int, h: int) -> np.ndarray | None:
    c = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], dtype=np.float64)
    p = c @ H.T
    if np.any(p[:, 2] <= 1e-9):
        return None
    out: np.ndarray = p[:, :2] / p[:, 2:]
    return out


def rectify(ref: View, src: View) -> Rectified | None:
    """Rectification of a pair with the source to the right; None if degenerate."""
    base = src.centre - ref.centre
    b = float(np.linalg.norm(base))
    if b <= 1e-12 or len(ref.points) < 3:
        return None
    x = base / b
    y = np.cross(ref.R[2] + src.R[2], x)
    if np.linalg.norm(y) < 1e-9:
        return None
    y /= np.linalg.norm(y)
    rot = np.stack([x, y, np.cross(x, y)])
    f = float((ref.K[0, 0] + ref.K[1, 1]) / 2.0)
    k0 = np.diag([f, f, 1.0])
    to_ref = rot @ ref.R.T @ np.linalg.inv(ref.K)
    to_src = rot @ src.R.T @ np.linalg.inv(src.K)
    c_ref = _warp_corners(k0 @ to_ref, ref.width, ref.height)
    c_src = _warp_corners(k0 @ to_src, src.width, src.height)
    if c_ref is None or c_src is None:
        return None
    # depth range (along the rectified axis) of the sparse points both views see (the
    # reference's, if they share too few)
    _, shared, _ = np.intersect1d(ref.point_ids, src.point_ids, return_indices=True)
    seen = ref.points[shared] if len(shared) >= MIN_SHARED_POINTS else ref.points
    zs = (seen - ref.centre) @ rot[2]
    zs = zs[zs > 1e-9]
    if len(zs) < 3:
        return None
    z_near, z_far = np.percentile(zs, 0.5) * 0.9, np.percentile(zs, 99.5) * 1.15
    d_near, d_far = f * b / z_near, f * b / z_far  # true disparities, d_near > d_far
    limit_w, limit_h = 2 * ref.width, 2 * ref.height
    # only rows both images reach can match
    v_lo = max(c_ref[:, 1].min(), c_src[:, 1].min())
    v_hi = min(c_ref[:, 1].max(), c_src[:, 1].max())
    if v_hi - v_lo < 1:
        return None
    if v_hi - v_lo > limit_h:  # keep the rows around the reference image's centre
        mid = float(c_ref[:, 1].mean())
        v_lo, v_hi = mid - limit_h / 2, mid + limit_h / 2
    num_disp = int(np.clip(int(np.ceil((d_near - d_far + 4) / 16.0)) * 16, 16, 512))
    min_disp = 2 - num_disp
    # measured disparity = d_true - d_near <= 0: a reference column u looks for its match
    # in source columns u .. u + num_disp; reference columns that cannot reach the source
    # image are left out
    cx_ref = -float(c_ref[:, 0].min())
    cx_src = cx_ref + d_near
    skip = max(0.0, c_src[:, 0].min() + cx_src - num_disp)
    cx_ref, cx_src = cx_ref - skip, cx_src - skip
    # the reference's columns plus the search range: source columns beyond are unused
    width = min(c_ref[:, 0].max() + cx_ref + num_disp, c_src[:, 0].max() + cx_src) + 1
    if width < 1:
        return None
    width_r = int(np.ceil(min(width, limit_w)))
    height_r = int(np.ceil(v_hi - v_lo + 1))
    cy = -v_lo
    k_ref = np.array([[f, 0, cx_ref], [0, f, cy], [0, 0, 1.0]])
    k_src = np.array([[f, 0, cx_src], [0, f, cy], [0, 0, 1.0]])
    return Rectified(
        rotation=rot,
        f=f,
        cx_ref=cx_ref,
        cx_src=cx_src,
        cy=cy,
        size=(width_r, height_r),
        h_ref=k_ref @ to_ref,
        h_src=k_src @ to_src,
        baseline=b,
        min_disp=min_disp,
        num_disp=num_disp,
    )


def _valid_area(view: View, H: np.ndarray, size: tuple[int, int], erode: int) -> np.ndarray:
    ones = np.full((view.height, view.width), 255, np.uint8)
    warped = cv2.warpPerspective(ones, H, size, flags=cv2.INTER_NEAREST)
    out: np.ndarray = cv2.erode(warped, np.ones((erode, erode), np.uint8)) > 0
    return out


def _to_view(view: View, rect: Rectified, H: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """Sample a rectified disparity map on a view's own pixel grid and turn it into the
    view's depth map (NaN where unknown).

    H = K_rect rot R^T K^-1 maps view pixels to rectified ones, so the rectified ray of a
    view pixel (u, v) is H (u, v, 1) / w with w = H[2] . (u, v, 1), and a point at depth
    z_rect along the rectified axis lies at depth z_rect / w in the view."""
    d = cv2.warpPerspective(
        disp,
        H,
        (view.width, view.height),
        flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=np.nan,
    )
    uu = np.arange(view.width, dtype=np.float32)[None, :]
    vv = np.arange(view.height, dtype=np.float32)[:, None]
    w = np.float32(H[2, 0]) * uu + np.float32(H[2, 1]) * vv + np.float32(H[2, 2])
    d_true = d - np.float32(rect.shift)
    with np.errstate(invalid="ignore", divide="ignore"):
        depth = np.float32(rect.f * rect.baseline) / (d_true * w)
    depth[~((d_true > 0) & (depth > 0))] = np.nan
    out: np.ndarray = depth.astype(np.float32, copy=False)
    return out


def pair_depths(
    ref: View, src: View, ref_img: np.ndarray, src_img: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Depth maps of both views of a pair (NaN where unknown), from one semi-global
    matching of the reference against the source.

    The source's map comes from the reference's by forward warping: each matched
    reference pixel lands on the source pixels either side of its sub-pixel match, and
    where several land on one pixel the nearest wins (a z-buffer). That z-buffer is also
    the left-right check: a reference pixel whose match is taken by a nearer one (more
    than LR_MAX_DIFF px of disparity nearer) is hidden in the source and dropped."""
    rect = rectify(ref, src)
    if rect is None:
        return None
    size = rect.size
    left = cv2.warpPerspective(ref_img, rect.h_ref, size, flags=cv2.INTER_LINEAR)
    right = cv2.warpPerspective(src_img, rect.h_src, size, flags=cv2.INTER_LINEAR)
    block = 5
    channels = 1 if ref_img.ndim == 2 else ref_img.shape[2]
    sgbm = cv2.StereoSGBM.create(
        minDisparity=rect.min_disp,
        numDisparities=rect.num_disp,
        blockSize=block,
        P1=8 * channels * block * block,
        P2=32 * channels * block * block,
        disp12MaxDiff=-1,
        preFilterCap=63,
        uniquenessRatio=10,
        speckleWindowSize=100,
        speckleRange=2,
        mode=cv2.STEREO_SGBM_MODE_SGBM_3WAY,
    )
    disp = sgbm.compute(left, right).astype(np.float32) / 16.0
    in_l = _valid_area(ref, rect.h_ref, size, block)
    in_r = _valid_area(src, rect.h_src, size, block)
    height, width = disp.shape
    # reference column x matches source column x - disp on the same row
    lo = np.floor(np.arange(width, dtype=np.float32)[None, :] - disp)
    matched = (disp > rect.min_disp - 0.5) & in_l & (lo >= 0) & (lo + 1 < width)
    rows, cols = np.nonzero(matched)
    d = disp[rows, cols]
    at = rows.astype(np.intp) * width + lo[rows, cols].astype(np.intp)  # flat, left of match
    seen = in_r.ravel()
    # larger disparity = nearer; assigning in ascending order leaves the nearest
    order = np.argsort(d, kind="stable")
    nearest = np.full(height * width, -np.inf, np.float32)
    nearest[at[order]] = d[order]
    nearest[at[order] + 1] = d[order]
    front = np.maximum(nearest[at], nearest[at + 1])
    keep = (front - d <= LR_MAX_DIFF) & seen[at] & seen[at + 1]
    left_ok = np.full((height, width), np.nan, np.float32)
    left_ok[rows[keep], cols[keep]] = d[keep]
    right_ok = np.where(np.isfinite(nearest) & seen, nearest, np.nan).astype(np.float32)
    return (
        _to_view(ref, rect, rect.h_ref, left_ok),
        _to_view(src, rect, rect.h_src, right_ok.reshape(height, width)),
    )


def combine_pairs(candidates: list[np.ndarray]) -> np.ndarray:
    """One depth per pixel from several pairs: the mean of the depths that agree with the
    median, where at least two pairs agree (one, if there is only one pair)."""
    stack = np.stack(candidates)
    need = min(MIN_AGREEING_PAIRS, len(candidates))
    # median of the finite values per pixel (NaN sorts last)
    ordered = np.sort(stack, axis=0)
    count = np.isfinite(stack).sum(axis=0)
    lower = np.take_along_axis(ordered, np.maximum(count - 1, 0)[None] // 2, axis=0)[0]
    upper = np.take_along_axis(ordered, (count // 2)[None], axis=0)[0]
    med = np.where(count > 0, (lower + upper) / 2.0, np.nan)
    with np.errstate(invalid="ignore"):
        agree = np.abs(stack - med[None]) <= PAIR_AGREEMENT * med[None]
    n = agree.sum(axis=0)
    total = np.where(agree, stack, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(n >= need, total / np.maximum(n, 1), np.nan)
    return out.astype(np.float32)


def texture_mask(gray: np.ndarray, radius: int = 2) -> np.ndarray:
    g = gray.astype(np.float32)
    k = (2 * radius + 1, 2 * radius + 1)
    mean = cv2.blur(g, k)
    var = cv2.blur(g * g, k) - mean * mean
    mask: np.ndarray = var >= MIN_TEXTURE_STD**2
    return mask


def back_project(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Camera-frame points (H, W, 3) of a depth map (NaN where unknown)."""
    h, w = depth.shape
    uu, vv = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    x = (uu - K[0, 2]) / K[0, 0]
    y = (vv - K[1, 2]) / K[1, 1]
    d = depth.astype(np.float64)
    return np.stack([x * d, y * d, d], axis=-1)


def smallest_eigenvectors(cov: dict[tuple[int, int], np.ndarray]) -> np.ndarray:
    """Unit eigenvectors (n, 3) of the smallest eigenvalues of n symmetric 3x3 matrices,
    given as their upper triangles cov[i, j] (i <= j), each (n,). Closed form (the
    eigenvalue by the trigonometric solution of the characteristic cubic, the vector as
    the longest cross product of two rows of C - lambda I), with LAPACK for the few
    matrices where that is ill-conditioned (a repeated smallest eigenvalue)."""
    a, b, c = cov[0, 0], cov[1, 1], cov[2, 2]
    d, e, f = cov[0, 1], cov[0, 2], cov[1, 2]
    q = (a + b + c) / 3.0
    off = d * d + e * e + f * f
    p = np.sqrt(((a - q) ** 2 + (b - q) ** 2 + (c - q) ** 2 + 2.0 * off) / 6.0)
    safe = np.where(p > 0, p, 1.0)
    ba, bb, bc = (a - q) / safe, (b - q) / safe, (c - q) / safe
    bd, be, bf = d / safe, e / safe, f / safe
    det = ba * (bb * bc - bf * bf) - bd * (bd * bc - bf * be) + be * (bd * bf - bb * be)
    phi = np.arccos(np.clip(det / 2.0, -1.0, 1.0)) / 3.0
    lam = q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0)
    r0 = np.stack([a - lam, d, e], axis=-1)
    r1 = np.stack([d, b - lam, f], axis=-1)
    r2 = np.stack([e, f, c - lam], axis=-1)
    crosses = np.stack([np.cross(r0, r1), np.cross(r0, r2), np.cross(r1, r2)])  # (3, n, 3)
    lengths = np.einsum("knj,knj->kn", crosses, crosses)
    best = np.argmax(lengths, axis=0)
    vec = np.take_along_axis(crosses, best[None, :, None], axis=0)[0]
    length = np.sqrt(np.take_along_axis(lengths, best[None], axis=0)[0])
    # a repeated smallest eigenvalue leaves every cross product (nearly) zero
    scale = np.maximum(np.abs(lam), 2.0 * p) ** 2
    bad = ~(length > 1e-6 * np.maximum(scale, np.finfo(np.float64).tiny))
    out: np.ndarray = vec / np.where(bad, 1.0, length)[:, None]
    if bad.any():
        m = np.empty((int(bad.sum()), 3, 3))
        for (i, j), v in cov.items():
            m[:, i, j] = v[bad]
            m[:, j, i] = v[bad]
        out[bad] = np.linalg.eigh(m)[1][:, :, 0]
    return out


def normals_from_depth(depth: np.ndarray, K: np.ndarray, radius: int = 3) -> np.ndarray:
    """Unit normals (H, W, 3) in camera coordinates, facing the camera, from a plane fit
    over a (2r+1)^2 window of valid pixels; zero where there are too few."""
    h, w = depth.shape
    valid = np.isfinite(depth) & (depth > 0)
    normals = np.zeros((h, w, 3), np.float32)
    if not valid.any():
        return normals
    pts = back_project(np.where(valid, depth, 0.0), K)  # zero where invalid
    ksize = (2 * radius + 1, 2 * radius + 1)

    def box(a: np.ndarray) -> np.ndarray:
        out: np.ndarray = cv2.boxFilter(a, cv2.CV_64F, ksize, normalize=False)
        return out

    n = box(valid.astype(np.float64))
    enough = valid & (n >= max(4.0, 0.4 * ksize[0] * ksize[1]))
    idx = np.nonzero(enough)
    if len(idx[0]) == 0:
        return normals
    x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
    sums = box(pts)[idx]  # (m, 3)
    squares = box(pts * pts)[idx]  # xx, yy, zz
    products = box(np.stack([x * y, x * z, y * z], axis=-1))[idx]  # xy, xz, yz
    cnt = n[idx]
    mean = sums / cnt[:, None]
    cov = {(i, i): squares[:, i] / cnt - mean[:, i] ** 2 for i in range(3)}
    for k, (i, j) in enumerate(((0, 1), (0, 2), (1, 2))):
        cov[i, j] = products[:, k] / cnt - mean[:, i] * mean[:, j]
    nrm = smallest_eigenvectors(cov)
    p = pts[idx]
    flip = np.einsum("ij,ij->i", nrm, p) > 0
    nrm[flip] *= -1.0
    normals[idx] = nrm.astype(np.float32)
    return normals


def geometric_filter(
    view: View,
    depth: np.ndarray,
    others: list[View],
    load: Callable[[View], np.ndarray],
) -> np.ndarray:
    """Keep the depths that at least MIN_CONSISTENT_VIEWS of the other views agree with
    (all of them, if there are fewer). `load(other)` gives another view's depth map; the
    views are tried in order, each only for the depths not yet confirmed, and no more
    maps are loaded once every depth is."""
    valid = np.isfinite(depth)
    if not others or not valid.any():
        return depth
    need = min(MIN_CONSISTENT_VIEWS, len(others))
    rows, cols = np.nonzero(valid)
    d = depth[rows, cols].astype(np.float64)
    # homogeneous pixel times depth: (u d, v d, d), so one affine map per other view
    pix = np.stack([cols * d, rows * d, d])  # (3, n)
    k_inv = np.linalg.inv(view.K)
    count = np.zeros(len(d), np.int32)
    pending = np.arange(len(d))  # depths not yet confirmed by `need` views
    for other in others:
        if len(pending) == 0:
            break
        odepth = load(other)
        # other pixel (times its depth) = K_o R_o R^T (K^-1 p d - t) + K_o t_o
        rel = other.R @ view.R.T
        A = other.K @ rel @ k_inv
        b = other.K @ (other.t - rel @ view.t)
        xo = A @ pix[:, pending] + b[:, None]
        z = xo[2]
        with np.errstate(invalid="ignore", divide="ignore"):
            u = np.rint(xo[0] / z)
            v = np.rint(xo[1] / z)
        inside = (z > 0) & (u >= 0) & (u < other.width) & (v >= 0) & (v < other.height)
        ui = np.where(inside, u, 0).astype(np.intp)
        vi = np.where(inside, v, 0).astype(np.intp)
        od = odepth[vi, ui]
        with np.errstate(invalid="ignore"):
            count[pending] += inside & (np.abs(od - z) <= GEOMETRIC_AGREEMENT * z)
        pending = pending[count[pending] < need]
    out = np.full_like(depth, np.nan)
    keep = count >= need
    out[rows[keep], cols[keep]] = depth[rows[keep], cols[keep]]
    return out


# ---------------------------------------------------------------- CPU engine


def _load_image(path: Path, view: View) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise PermanentError(f"cannot read image {path}")
    if img.shape[1] != view.width or img.shape[0] != view.height:
        img = cv2.resize(img, (view.width, view.height), interpolation=cv2.INTER_AREA)
    return img


class _ImageCache:
    """Each view's image decoded and resized once, and its texture mask computed once;
    an image is dropped after the last pair that uses it, a mask once it is used."""

    def __init__(self, folder: Path, views: list[View], pairs: list[tuple[int, int]]) -> None:
        self.folder = folder
        self.views = views
        self._uses = {v.index: 0 for v in views}
        for i, j in pairs:
            self._uses[i] += 1
            self._uses[j] += 1
        self._lock = threading.Lock()
        self._view_locks = {v.index: threading.Lock() for v in views}
        self._images: dict[int, np.ndarray] = {}
        self._textures: dict[int, np.ndarray] = {}

    def image(self, i: int) -> np.ndarray:
        with self._view_locks[i]:
            img = self._images.get(i)
            if img is None:
                view = self.views[i]
                img = _load_image(self.folder / view.name, view)
                self._images[i] = img
                self._textures[i] = texture_mask(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
            return img

    def release(self, i: int) -> None:
        with self._lock:
            self._uses[i] -= 1
            if self._uses[i] <= 0:
                self._images.pop(i, None)

    def texture(self, i: int) -> np.ndarray:
        mask = self._textures.pop(i, None)  # used once, by the view's depth map
        if mask is None:
            view = self.views[i]
            gray = cv2.cvtColor(_load_image(self.folder / view.name, view), cv2.COLOR_BGR2GRAY)
            mask = texture_mask(gray)
        return mask


def _to_colmap(depth: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.where(np.isfinite(depth), depth, 0.0).astype(np.float32)
    return out


def _from_colmap(depth: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.where(depth > 0, depth, np.nan).astype(np.float32)
    return out


def _parallel(
    items: list[int],
    work: Callable[[int], Any],
    workers: int,
    ctx: StageContext,
    on_done: Callable[[int], None],
) -> None:
    """Run work(item) for every item on `workers` threads; check for a cancel between
    items (on this thread: ctx.cancelled may not be thread-safe)."""
    stop = threading.Event()

    def guarded(item: int) -> Any:
        if stop.is_set():
            return None
        return work(item)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: set[Future[Any]] = set()
        queue = list(items)
        done = 0
        try:
            while queue or pending:
                while queue and len(pending) < workers * 2:
                    pending.add(pool.submit(guarded, queue.pop(0)))
                finished_now, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in finished_now:
                    fut.result()
                    done += 1
                    on_done(done)
                if ctx.cancelled():
                    raise Cancelled()
        except BaseException:
            stop.set()
            for fut in pending:
                fut.cancel()
            raise


def run_cpu(ctx: StageContext, out: Path, max_size: int) -> dict[str, Any]:
    undistort = ctx.stage_dir("undistort")
    views = load_views(undistort / "sparse", max_size)
    if not views:
        raise PermanentError("the sparse model has no registered images")
    co = covisibility(undistort / "sparse", views)
    stereo_nb, check_nb = neighbours(views, co)
    # each pair is matched once and gives depths for both of its views
    pairs = sorted({(min(i, j), max(i, j)) for i, nb in enumerate(stereo_nb) for j in nb})
    depth_dir = out / "stereo" / DEPTH_DIR
    normal_dir = out / "stereo" / NORMAL_DIR
    scratch = out / ".pairs"
    scratch.mkdir()
    images_dir = undistort / "images"
    workers = num_threads(ctx)
    cv2.setNumThreads(1 if workers > 1 else 0)
    n, n_pairs = len(views), len(pairs)

    images = _ImageCache(images_dir, views, pairs)

    def match(k: int) -> None:
        i, j = pairs[k]
        try:
            depths = pair_depths(views[i], views[j], images.image(i), images.image(j))
        finally:
            images.release(i)
            images.release(j)
        if depths is not None:
            np.save(scratch / f"{i}-{j}.{i}.npy", depths[0])
            np.save(scratch / f"{i}-{j}.{j}.npy", depths[1])

    def photometric(i: int) -> None:
        view = views[i]
        cands = [np.load(p) for p in sorted(scratch.glob(f"*.{i}.npy"))]
        if cands:
            depth = combine_pairs(cands)
            depth[~images.texture(i)] = np.nan
        else:
            depth = np.full((view.height, view.width), np.nan, np.float32)
        # the geometric step reads it; its normals are never used (fusion reads the
        # geometric maps), so they are computed once, for the geometric map
        write_colmap_array(depth_dir / f"{view.name}.photometric.bin", _to_colmap(depth))

    stats: dict[int, float] = {}

    def load_photometric(view: View) -> np.ndarray:
        return _from_colmap(read_colmap_array(depth_dir / f"{view.name}.photometric.bin"))

    def geometric(i: int) -> None:
        view = views[i]
        others = [views[j] for j in check_nb[i]]
        depth = geometric_filter(view, load_photometric(view), others, load_photometric)
        stats[i] = float(np.isfinite(depth).mean())
        name = f"{view.name}.geometric.bin"
        write_colmap_array(depth_dir / name, _to_colmap(depth))
        write_colmap_array(normal_dir / name, normals_from_depth(depth, view.K))

    def on_pair(done: int) -> None:
        ctx.progress(0.75 * done / max(1, n_pairs), f"stereo pairs {done}/{n_pairs}")

    def on_photometric(done: int) -> None:
        ctx.progress(0.75 + 0.1 * done / n, f"depth maps {done}/{n}")

    def on_geometric(done: int) -> None:
        ctx.progress(0.85 + 0.15 * done / n, f"consistency check {done}/{n}")

    ctx.progress(0.0, f"stereo pairs 0/{n_pairs}")
    timer = Timer()
    _parallel(list(range(n_pairs)), match, workers, ctx, on_pair)
    t_match = timer.seconds
    _parallel(list(range(n)), photometric, workers, ctx, on_photometric)
    shutil.rmtree(scratch)
    t_photometric = timer.seconds
    _parallel(list(range(n)), geometric, workers, ctx, on_geometric)
    write_configs(out, [v.name for v in views], [[views[j].name for j in nb] for nb in stereo_nb])
    return {
        "engine": "opencv-sgbm",
        "depth_maps": n,
        "stereo_pairs": n_pairs,
        "depth_map_size": [views[0].width, views[0].height],
        "valid_fraction": round(float(np.mean(list(stats.values()))), 4) if stats else 0.0,
        "seconds_matching": t_match,
        "seconds_depth_maps": round(t_photometric - t_match, 3),
        "seconds_consistency": round(timer.seconds - t_photometric, 3),
        "threads": workers,
    }


# ---------------------------------------------------------------- GPU engine


def run_gpu(ctx: StageContext, out: Path, max_size: int) -> dict[str, Any]:
    rec = pycolmap.Reconstruction(str(ctx.stage_dir("undistort") / "sparse"))
    names = [rec.images[i].name for i in sorted(rec.reg_image_ids())]
    write_configs(out, names, None)
    options = pycolmap.PatchMatchOptions()
    options.max_image_size = max_size
    options.geom_consistency = True
    options.filter = True
    token = pycolmap.CancellationToken()
    failure: list[BaseException] = []

    def target() -> None:
        try:
            pycolmap.patch_match_stereo(
                str(out), workspace_format="COLMAP", options=options, cancellation_token=token
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            failure.append(exc)

    thread = threading.Thread(target=target, name="patch-match", daemon=True)
    thread.start()
    depth_dir = out / "stereo" / DEPTH_DIR
    n = max(1, len(names))
    while thread.is_alive():
        thread.join(1.0)
        if ctx.cancelled():
            token.cancel()
            thread.join()
            raise Cancelled()
        photometric = len(list(depth_dir.glob("*.photometric.bin")))
        geometric = len(list(depth_dir.glob("*.geometric.bin")))
        ctx.progress(
            min(1.0, (photometric + geometric) / (2 * n)),
            f"depth maps {photometric}/{n}, consistency {geometric}/{n}",
        )
    if failure:
        exc = failure[0]
        raise TransientError(f"PatchMatch stereo failed: {exc}") from exc
    made = len(list(depth_dir.glob("*.geometric.bin")))
    if made == 0:
        raise TransientError("PatchMatch stereo wrote no depth maps")
    return {"engine": "colmap-patch-match", "depth_maps": made, "max_image_size": max_size}


# ---------------------------------------------------------------- stage


def write_configs(out: Path, names: list[str], sources: list[list[str]] | None) -> None:
    stereo = out / "stereo"
    lines = []
    for k, name in enumerate(names):
        lines.append(name)
        if sources is None or not sources[k]:
            lines.append("__auto__, 20")
        else:
            lines.append(", ".join(sources[k]))
    (stereo / "patch-match.cfg").write_text("\n".join(lines) + "\n")
    (stereo / "fusion.cfg").write_text("\n".join(names) + "\n")


def _prepare(out: Path) -> None:
    """Make `out` a COLMAP dense workspace that shares undistort's images and model."""
    for name in ("images", "sparse"):
        os.symlink(os.path.join("..", "undistort", name), out / name)
    for sub in (DEPTH_DIR, NORMAL_DIR, "consistency_graphs"):
        (out / "stereo" / sub).mkdir(parents=True)


def run(ctx: StageContext) -> StageResult:
    done = finished(ctx, STAGE)
    if done is not None:
        return done
    require(ctx, STAGE, "undistort", "sparse")
    require(ctx, STAGE, "undistort", "images")
    timer = Timer()
    device = choose_device(ctx.device)
    max_size = stage_preset(ctx).stereo_max_size
    with building(ctx, STAGE) as out:
        _prepare(out)
        engine = run_gpu if device == "gpu" else run_cpu
        metrics = engine(ctx, out, max_size)
        metrics.update(device=device, stereo_max_size=max_size, seconds=timer.seconds)
        result = record(out, StageResult(metrics=metrics, device=device))
    ctx.progress(1.0, f"{metrics['depth_maps']} depth maps ({device})")
    return result
