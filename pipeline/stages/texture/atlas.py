"""Steps 4 and 5 of the texture stage: the charts shelf-packed into one atlas, the texels
rasterised to their faces, and the dilation that keeps mipmaps from bleeding across charts."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import open3d as o3d
from scipy import ndimage, sparse

from pipeline.errors import PermanentError
from pipeline.stages.texture.views import View

PADDING = 4  # texels between charts
MIN_TEXELS_PER_FACE = 4.0  # below this the atlas cannot hold the mesh
ROWS_PER_CHUNK = 256  # atlas rows rasterised between cancel checks


def atlas_size_for(faces: int, texture_size: int) -> None:
    if faces * MIN_TEXELS_PER_FACE > texture_size * texture_size:
        raise PermanentError(
            f"the mesh has {faces} faces, too many for a {texture_size}x{texture_size} texture "
            f"(at least {MIN_TEXELS_PER_FACE:g} texels per face)",
            hint="lower the face_budget option or raise texture_size",
        )


def _shelf_pack(sizes: np.ndarray, width: int) -> tuple[np.ndarray, int]:
    """Place rectangles (n, 2) of (w, h) texels in rows of `width`, tallest first:
    (n, 2) offsets and the height used."""
    order = np.argsort(-sizes[:, 1], kind="stable")
    offsets = np.zeros_like(sizes)
    x = y = row = 0
    for i in order:
        w, h = int(sizes[i, 0]), int(sizes[i, 1])
        if x + w > width:
            x, y, row = 0, y + row, 0
        offsets[i] = (x, y)
        x += w
        row = max(row, h)
    return offsets, y + row


def _pow2_at_least(n: int, cap: int) -> int:
    return min(cap, 1 << max(0, int(n) - 1).bit_length())


CELL = 8  # texels of the square cell of a face no photo sees


def build_atlas(
    vertices: np.ndarray,
    faces: np.ndarray,
    labels: np.ndarray,
    views: list[View],
    pairs: np.ndarray,
    texture_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int, int]:
    """Charts are the patches of neighbouring faces that take the same photo, laid out as
    that photo shows them (as mvs-texturing and OpenMVS do: no distortion, one scale for
    all), each with PADDING texels around it; faces no photo sees get a small cell each.
    Returns (vertex mapping, new faces in the same order, uv in texels (x right, y down),
    width, height, charts)."""
    m = len(faces)
    same = pairs[(labels[pairs[:, 0]] == labels[pairs[:, 1]]) & (labels[pairs[:, 0]] >= 0)]
    graph = sparse.coo_matrix((np.ones(len(same)), (same[:, 0], same[:, 1])), shape=(m, m))
    _, component = sparse.csgraph.connected_components(graph, directed=False)
    labelled = labels >= 0
    corner_xy = np.zeros((m, 3, 2))
    for k in np.unique(labels[labelled]):
        sel = np.flatnonzero(labels == k)
        xy, _ = views[int(k)].project(vertices[faces[sel]].reshape(-1, 3))
        corner_xy[sel] = xy.reshape(-1, 3, 2)
    # patches: compact ids over the labelled faces' components
    patch_ids, patch_of = np.unique(component[labelled], return_inverse=True)
    n_patches = len(patch_ids)
    patch = np.full(m, -1, np.int64)
    patch[labelled] = patch_of
    lo = np.full((n_patches, 2), np.inf)
    hi = np.full((n_patches, 2), -np.inf)
    lf = np.flatnonzero(labelled)
    np.minimum.at(lo, patch[lf], corner_xy[lf].min(axis=1))
    np.maximum.at(hi, patch[lf], corner_xy[lf].max(axis=1))
    extent = np.maximum(hi - lo, 1.0) if n_patches else np.zeros((0, 2))
    lone = np.flatnonzero(~labelled)
    area = float((extent + 2 * PADDING).prod(axis=1).sum()) + len(lone) * CELL * CELL
    scale = min(1.0, math.sqrt(0.8 * texture_size * texture_size / max(area, 1.0)))
    for _ in range(30):
        sizes = np.ceil(extent * scale).astype(np.int64) + 2 * PADDING
        sizes = np.concatenate([sizes, np.full((len(lone), 2), CELL, np.int64)])
        if (sizes[:, 0] <= texture_size).all():
            offsets, used = _shelf_pack(sizes, texture_size)
            if used <= texture_size:
                break
        scale *= 0.92
    else:
        raise PermanentError(
            f"the mesh's {n_patches + len(lone)} patches do not fit one "
            f"{texture_size}x{texture_size} texture",
            hint="lower the face_budget option or raise texture_size",
        )
    # power-of-two sides where the preset's size is one, for mipmapping in every viewer
    width = max(4, _pow2_at_least(int((offsets[:, 0] + sizes[:, 0]).max()), texture_size))
    height = max(4, _pow2_at_least(used, texture_size))
    corner_uv = np.zeros((m, 3, 2))
    if len(lf):
        p = patch[lf]
        corner_uv[lf] = (
            offsets[p][:, None, :] + PADDING + (corner_xy[lf] - lo[p][:, None, :]) * scale
        )
    if len(lone):
        cell = offsets[n_patches:][:, None, :].astype(np.float64)
        corner_uv[lone] = cell + np.array([[1.0, 1.0], [CELL - 1.0, 1.0], [1.0, CELL - 1.0]])
    # one new vertex per (vertex, patch); every lone face has its own three
    key_patch = np.where(labelled, patch, n_patches + np.arange(m))
    keys = faces.astype(np.int64) * (n_patches + m + 1) + key_patch[:, None]
    uniq, first, inverse = np.unique(keys.ravel(), return_index=True, return_inverse=True)
    vmap = faces.ravel()[first]
    uv_px = corner_uv.reshape(-1, 2)[first]
    new_faces = inverse.reshape(m, 3)
    return vmap.astype(np.int64), new_faces, uv_px, width, height, n_patches + len(lone)


def rasterise(
    uv_px: np.ndarray, faces: np.ndarray, width: int, height: int, check: Callable[[], None]
) -> tuple[np.ndarray, np.ndarray]:
    """For every texel centre: the face it lies in (-1 outside every chart) and its
    barycentric weights (h, w, 3)."""
    v3 = np.concatenate([uv_px, np.zeros((len(uv_px), 1))], axis=1).astype(np.float32)
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(
        o3d.core.Tensor.from_numpy(np.ascontiguousarray(v3)),
        o3d.core.Tensor.from_numpy(np.ascontiguousarray(faces.astype(np.uint32))),
    )
    face_of = np.full((height, width), -1, np.int64)
    bary = np.zeros((height, width, 3), np.float32)
    xs = np.arange(width, dtype=np.float32) + 0.5
    for y0 in range(0, height, ROWS_PER_CHUNK):
        check()
        ys = np.arange(y0, min(height, y0 + ROWS_PER_CHUNK), dtype=np.float32) + 0.5
        gx, gy = np.meshgrid(xs, ys)
        n = gx.size
        rays = np.zeros((n, 6), np.float32)
        rays[:, 0], rays[:, 1], rays[:, 2], rays[:, 5] = gx.ravel(), gy.ravel(), 1.0, -1.0
        hit = scene.cast_rays(o3d.core.Tensor.from_numpy(np.ascontiguousarray(rays)))
        ok = np.isfinite(hit["t_hit"].numpy())
        prim = hit["primitive_ids"].numpy().astype(np.int64)
        buv = hit["primitive_uvs"].numpy()
        rows = slice(y0, y0 + len(ys))
        face_of[rows] = np.where(ok, prim, -1).reshape(len(ys), width)
        b = np.stack([1.0 - buv[:, 0] - buv[:, 1], buv[:, 0], buv[:, 1]], axis=1)
        bary[rows] = np.where(ok[:, None], b, 0.0).reshape(len(ys), width, 3)
    return face_of, bary


def dilate(texture: np.ndarray, filled: np.ndarray) -> np.ndarray:
    """Every texel outside the charts takes the colour of the nearest one inside."""
    if filled.all() or not filled.any():
        return texture
    _, (iy, ix) = ndimage.distance_transform_edt(~filled, return_indices=True)
    return np.asarray(texture[iy, ix])
