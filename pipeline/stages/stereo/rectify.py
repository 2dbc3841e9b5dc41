"""Rectification of a pair of views, so that matching pixels share a row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.stages.stereo.views import View

MIN_SHARED_POINTS = 20  # sparse points a pair must share to take its depth range from them


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
