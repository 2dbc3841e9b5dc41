"""Steps 1 and 2 of the texture stage: what each photo sees (visibility and data term),
and one photo per face (a Potts MRF solved by loopy belief propagation)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import open3d as o3d
from scipy import sparse

from pipeline.stages.texture.views import View, bilinear

MIN_COS = 0.08  # faces seen more obliquely than ~85 degrees do not take that photo
GRAD_FLOOR = 0.2  # keeps flat, textureless faces choosing by projected area (measured: 0.02-1.0)
BP_ITERATIONS = 20

# (weights of the three corners) of the points sampled on a face for the data term
_SAMPLES = np.array(
    [
        [1 / 3, 1 / 3, 1 / 3],
        [2 / 3, 1 / 6, 1 / 6],
        [1 / 6, 2 / 3, 1 / 6],
        [1 / 6, 1 / 6, 2 / 3],
        [1 / 2, 1 / 2, 0.0],
        [0.0, 1 / 2, 1 / 2],
        [1 / 2, 0.0, 1 / 2],
    ]
)
_RAY_SHRINK = 0.8  # visibility samples: the centre and corners pulled this far in


# ---------------------------------------------------------------- step 1: what each view sees


def face_visibility(
    view: View,
    vertices: np.ndarray,
    faces: np.ndarray,
    normals: np.ndarray,
    scene: o3d.t.geometry.RaycastingScene,
    gradient: np.ndarray,
    tolerance: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(faces this view sees, their data term)."""
    xy, z = view.project(vertices)
    tri_xy = xy[faces]  # (m, 3, 2)
    tri_z = z[faces]
    inside = (
        (tri_z > 1e-6).all(axis=1)
        & (tri_xy[..., 0] >= 0.5).all(axis=1)
        & (tri_xy[..., 0] <= view.width - 0.5).all(axis=1)
        & (tri_xy[..., 1] >= 0.5).all(axis=1)
        & (tri_xy[..., 1] <= view.height - 0.5).all(axis=1)
    )
    corners = vertices[faces]  # (m, 3, 3)
    centres = corners.mean(axis=1)
    to_cam = view.centre - centres
    dist = np.linalg.norm(to_cam, axis=1)
    cos = np.einsum("ij,ij->i", normals, to_cam) / np.maximum(dist, 1e-12)
    cand = np.flatnonzero(inside & (cos > MIN_COS))
    if len(cand) == 0:
        return cand, np.zeros(0)
    c = centres[cand]
    samples = np.concatenate(
        [c[:, None, :], c[:, None, :] + _RAY_SHRINK * (corners[cand] - c[:, None, :])], axis=1
    )  # (k, 4, 3)
    pts = samples.reshape(-1, 3)
    d = pts - view.centre
    length = np.linalg.norm(d, axis=1)
    rays = np.concatenate([np.broadcast_to(view.centre, d.shape), d / length[:, None]], axis=1)
    hit = scene.cast_rays(
        o3d.core.Tensor.from_numpy(np.ascontiguousarray(rays.astype(np.float32))), nthreads=1
    )
    t_hit = hit["t_hit"].numpy().reshape(-1, 4)
    unoccluded = (t_hit >= length.reshape(-1, 4) - tolerance).all(axis=1)
    seen = cand[unoccluded]
    txy = tri_xy[seen]
    area = 0.5 * np.abs(
        (txy[:, 1, 0] - txy[:, 0, 0]) * (txy[:, 2, 1] - txy[:, 0, 1])
        - (txy[:, 2, 0] - txy[:, 0, 0]) * (txy[:, 1, 1] - txy[:, 0, 1])
    )
    sample_xy = np.einsum("sk,mkd->msd", _SAMPLES, txy).reshape(-1, 2)
    grad = bilinear(gradient, sample_xy).reshape(len(seen), len(_SAMPLES)).mean(axis=1)
    return seen, area * (grad + GRAD_FLOOR)


# ---------------------------------------------------------------- step 2: one photo per face


def face_adjacency(faces: np.ndarray) -> np.ndarray:
    """(e, 2) pairs of faces sharing an edge."""
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    owner = np.repeat(np.arange(len(faces)), 3)
    order = np.lexsort((edges[:, 1], edges[:, 0]))
    e, o = edges[order], owner[order]
    same = (e[1:] == e[:-1]).all(axis=1)
    pairs = np.stack([o[:-1][same], o[1:][same]], axis=1)
    return pairs[pairs[:, 0] != pairs[:, 1]]


def potts_labels(
    cost: np.ndarray,
    pairs: np.ndarray,
    smoothness: float,
    iterations: int = BP_ITERATIONS,
    check: Callable[[], None] | None = None,
) -> np.ndarray:
    """argmin over labels of sum_f cost[f, l_f] + smoothness * #{(f, g) in pairs: l_f != l_g},
    by min-sum loopy belief propagation (damped, messages normalised to min 0).
    `cost` is (faces, labels) with np.inf where a label is not allowed."""
    n, k = cost.shape
    big = 1e3
    data = np.where(np.isfinite(cost), cost, big).astype(np.float32)  # memory: 2 x edges x photos
    if len(pairs) == 0 or k == 1:
        return np.asarray(np.argmin(data, axis=1))
    src = np.concatenate([pairs[:, 0], pairs[:, 1]])
    dst = np.concatenate([pairs[:, 1], pairs[:, 0]])
    e = len(pairs)
    reverse = np.concatenate([np.arange(e, 2 * e), np.arange(e)])
    incoming = sparse.csr_matrix(
        (np.ones(2 * e, np.float32), (dst, np.arange(2 * e))), shape=(n, 2 * e)
    )
    messages = np.zeros((2 * e, k), np.float32)
    for _ in range(iterations):
        if check is not None:
            check()
        belief = data + incoming @ messages
        h = belief[src] - messages[reverse]
        new = np.minimum(h, h.min(axis=1, keepdims=True) + smoothness)
        new -= new.min(axis=1, keepdims=True)
        messages = 0.5 * messages + 0.5 * new
    belief = data + incoming @ messages
    return np.asarray(np.argmin(belief, axis=1))
