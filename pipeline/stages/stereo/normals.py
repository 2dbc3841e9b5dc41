"""Normal maps from depth maps: a plane fit over a window of each pixel."""

from __future__ import annotations

import cv2
import numpy as np


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
