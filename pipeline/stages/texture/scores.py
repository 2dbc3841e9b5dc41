"""Measurement of a published texture (tests, bench): rendered from a camera the job never
saw, against that camera's photo."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open3d as o3d
from scipy import ndimage

from pipeline.stages.texture.render import STAGE, load_textured, render


def image_scores(
    photo: np.ndarray, rendered: np.ndarray, mask: np.ndarray, within: np.ndarray | None = None
) -> dict[str, float]:
    """PSNR (dB) after one least-squares gain per channel, SSIM (grey, Gaussian window,
    over the covered pixels) and coverage of `rendered` against `photo`, both (h, w, 3)
    in [0, 1]; `mask` marks the pixels the mesh covers. `within` (h, w) limits the scores
    to the subject's pixels, and coverage is then the share of those the mesh covers."""
    if within is not None:
        mask = mask & within
    if not mask.any():
        return {"psnr_db": 0.0, "ssim": 0.0, "coverage": 0.0}
    p, r = photo[mask].astype(np.float64), rendered[mask].astype(np.float64)
    gain = (p * r).sum(axis=0) / np.maximum((r * r).sum(axis=0), 1e-12)
    mse = float(((p - r * gain) ** 2).mean())
    psnr = 10.0 * math.log10(1.0 / max(mse, 1e-12))
    grey_p = photo.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    corrected = np.clip(rendered.astype(np.float64) * gain, 0.0, 1.0)
    grey_r = corrected @ np.array([0.299, 0.587, 0.114])
    grey_r = np.where(mask, grey_r, grey_p)  # uncovered pixels do not enter the windows' stats
    mu_p, mu_r = _blur(grey_p), _blur(grey_r)
    var_p = _blur(grey_p * grey_p) - mu_p**2
    var_r = _blur(grey_r * grey_r) - mu_r**2
    cov = _blur(grey_p * grey_r) - mu_p * mu_r
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu_p * mu_r + c1) * (2 * cov + c2)) / (
        (mu_p**2 + mu_r**2 + c1) * (var_p + var_r + c2)
    )
    inner = ndimage.binary_erosion(mask, iterations=3)
    return {
        "psnr_db": round(psnr, 3),
        "ssim": round(float(ssim[inner].mean()) if inner.any() else 0.0, 4),
        "coverage": round(float(mask.sum() / (mask.size if within is None else within.sum())), 4),
    }


def _blur(x: np.ndarray) -> np.ndarray:
    return np.asarray(ndimage.gaussian_filter(x, 1.5))


def held_out_scores(
    workspace: Path,
    photo: np.ndarray,
    K: np.ndarray,
    R: np.ndarray,
    t: np.ndarray,
    to_frame: Callable[[np.ndarray], np.ndarray] = lambda p: p,
    renders: dict[str, np.ndarray] | None = None,
    rays: np.ndarray | None = None,
    within: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Scores of the textured mesh, the vertex-coloured mesh and a flat mean colour,
    rendered from a camera the job never saw (K, R, t in the frame `to_frame` maps the
    model's coordinates to) against that camera's photo (h, w, 3) in [0, 1]. `renders`,
    if given, receives the two renderings ("textured", "vertex_colour"); `rays`
    (h, w, 6) replace the pinhole camera's, for a photo with lens distortion; `within`
    (h, w) limits the scores to the subject's pixels (see image_scores)."""
    h, w = photo.shape[:2]
    mesh, texture = load_textured(workspace / STAGE)
    tex_rgb, tex_mask = render(
        to_frame(mesh["vertices"]),
        mesh["faces"],
        K,
        R,
        t,
        w,
        h,
        uv=mesh["uv"],
        texture=texture,
        rays=rays,
    )
    coloured = o3d.io.read_triangle_mesh(workspace / "color" / "mesh.ply")
    vc_rgb, vc_mask = render(
        to_frame(np.asarray(coloured.vertices)),
        np.asarray(coloured.triangles),
        K,
        R,
        t,
        w,
        h,
        vertex_colours=np.asarray(coloured.vertex_colors),
        rays=rays,
    )
    subject = vc_mask if within is None else vc_mask & within
    flat = np.broadcast_to(photo[subject].mean(axis=0), photo.shape)
    if renders is not None:
        renders["textured"], renders["vertex_colour"] = tex_rgb, vc_rgb
    return {
        "textured": image_scores(photo, tex_rgb, tex_mask, within),
        "vertex_colour": image_scores(photo, vc_rgb, vc_mask, within),
        "flat": image_scores(photo, np.asarray(flat), vc_mask, within),
    }
