"""Filtering depth maps by agreement: between the pairs of one view, and between a view
and its neighbours (multi-view geometric consistency)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.stages.stereo.views import View

PAIR_AGREEMENT = 0.015  # relative depth difference for two pairs to agree
MIN_AGREEING_PAIRS = 1  # pairs of a view that must agree on a depth (where pairs overlap,
# a disagreeing pair vetoes)
GEOMETRIC_AGREEMENT = 0.01  # relative depth difference for two views to agree
MIN_CONSISTENT_VIEWS = 1  # other views whose depth maps must agree (fusion then asks for 3)


def combine_pairs(candidates: list[np.ndarray]) -> np.ndarray:
    """One depth per pixel from several pairs: the mean of the depths that agree with the
    median, where at least MIN_AGREEING_PAIRS pairs agree (all of them, if there are
    fewer)."""
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
