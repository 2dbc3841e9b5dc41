"""Semi-global matching of one rectified pair (OpenCV), giving depth maps to both of its
views, and the texture mask that blanks pixels with nothing to match."""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.stages.stereo.rectify import Rectified, rectify
from pipeline.stages.stereo.views import View

MIN_TEXTURE_STD = 2.0  # grey-level standard deviation (0..255) below which a pixel is blank
LR_MAX_DIFF = 1.0  # px: a match hidden behind one nearer by more than this is dropped


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


def texture_mask(gray: np.ndarray, radius: int = 2) -> np.ndarray:
    g = gray.astype(np.float32)
    k = (2 * radius + 1, 2 * radius + 1)
    mean = cv2.blur(g, k)
    var = cv2.blur(g * g, k) - mean * mean
    mask: np.ndarray = var >= MIN_TEXTURE_STD**2
    return mask
