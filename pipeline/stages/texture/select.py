"""Steps 1 and 2 of the texture stage: what each photo sees (visibility, data term and
the face's colour there), the photos that disagree with the others about a face
(photometric outliers), and one photo per face (a Potts MRF solved by loopy belief
propagation)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import open3d as o3d
from scipy import sparse

from pipeline.stages.texture.views import View, bilinear

MIN_COS = 0.08  # faces seen more obliquely than ~85 degrees do not take that photo
GRAD_FLOOR = 0.2  # keeps flat, textureless faces choosing by projected area (measured: 0.02-1.0)
BP_ITERATIONS = 20
# photometric outliers (a passer-by, a highlight): a photo whose colour of a face lies
# further than OUTLIER_SPREAD robust deviations, and at least OUTLIER_DISTANCE (RGB in
# [0, 1]), from what most photos of the face show, after each photo's exposure is levelled
OUTLIER_MIN_VIEWS = 3  # a face seen by fewer keeps every photo: no majority to go by
OUTLIER_SPREAD = 3.0
OUTLIER_DISTANCE = 0.15

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


class Seen(NamedTuple):
    """What one photo sees of the mesh."""

    faces: np.ndarray  # (k,) indices of the faces it sees
    score: np.ndarray  # (k,) their data term
    colour: np.ndarray  # (k, 3) their mean colour in the photo, RGB in [0, 1]

    def without(self, drop: np.ndarray) -> Seen:
        keep = ~drop
        return Seen(self.faces[keep], self.score[keep], self.colour[keep])


class Surface(NamedTuple):
    """The mesh as every photo's visibility test needs it, built once for all photos."""

    vertices: np.ndarray  # (n, 3)
    faces: np.ndarray  # (m, 3)
    centres: np.ndarray  # (m, 3)
    normals: np.ndarray  # (m, 3) unit face normals
    # (m, 4, 3) float32: the points a face must be seen at, its centre and its corners
    # pulled _RAY_SHRINK of the way in
    samples: np.ndarray
    scene: o3d.t.geometry.RaycastingScene
    tolerance: float  # a ray that stops this short of its point still reaches it

    @classmethod
    def of(cls, vertices: np.ndarray, faces: np.ndarray) -> Surface:
        corners = vertices[faces]
        centres = corners.mean(axis=1)
        normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
        normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-18)
        pulled = centres[:, None] + _RAY_SHRINK * (corners - centres[:, None])
        samples = np.concatenate([centres[:, None], pulled], axis=1).astype(np.float32)
        scene = o3d.t.geometry.RaycastingScene()
        scene.add_triangles(
            o3d.core.Tensor.from_numpy(np.ascontiguousarray(vertices.astype(np.float32))),
            o3d.core.Tensor.from_numpy(np.ascontiguousarray(faces.astype(np.uint32))),
        )
        diag = float(np.linalg.norm(vertices.max(axis=0) - vertices.min(axis=0)))
        return cls(vertices, faces, centres, normals, samples, scene, 1e-3 * diag)


def face_visibility(
    view: View, surface: Surface, image: np.ndarray, gradient: np.ndarray, threads: int = 1
) -> Seen:
    """What `view` (its photo `image`, whose gradient magnitude is `gradient`) sees; the
    rays are cast on `threads` threads."""
    xy, z = view.project(surface.vertices)
    in_view = (
        (z > 1e-6)
        & (xy[:, 0] >= 0.5)
        & (xy[:, 0] <= view.width - 0.5)
        & (xy[:, 1] >= 0.5)
        & (xy[:, 1] <= view.height - 0.5)
    )
    to_cam = view.centre - surface.centres
    dist = np.linalg.norm(to_cam, axis=1)
    cos = np.einsum("ij,ij->i", surface.normals, to_cam) / np.maximum(dist, 1e-12)
    cand = np.flatnonzero(in_view[surface.faces].all(axis=1) & (cos > MIN_COS))
    if len(cand) == 0:
        return Seen(cand, np.zeros(0), np.zeros((0, 3)))
    # a ray from the camera to each sample, stopping `tolerance` short of it (t = 1 there)
    centre = view.centre.astype(np.float32)
    d = surface.samples[cand].reshape(-1, 3) - centre
    length = np.sqrt(np.einsum("ij,ij->i", d, d))
    rays = np.empty((len(d), 6), np.float32)
    rays[:, :3] = centre
    np.multiply(d, (1.0 - surface.tolerance / np.maximum(length, 1e-12))[:, None], out=rays[:, 3:])
    occluded = surface.scene.test_occlusions(
        o3d.core.Tensor.from_numpy(rays), tfar=1.0, nthreads=threads
    )
    seen = cand[~occluded.numpy().reshape(-1, 4).any(axis=1)]
    txy = xy[surface.faces[seen]]  # (k, 3, 2)
    area = 0.5 * np.abs(
        (txy[:, 1, 0] - txy[:, 0, 0]) * (txy[:, 2, 1] - txy[:, 0, 1])
        - (txy[:, 2, 0] - txy[:, 0, 0]) * (txy[:, 1, 1] - txy[:, 0, 1])
    )
    # (optimize: numpy's plain einsum loop takes 20 times as long here)
    sample_xy = np.einsum("sk,mkd->msd", _SAMPLES, txy, optimize=True).reshape(-1, 2)
    grad = bilinear(gradient, sample_xy).reshape(len(seen), len(_SAMPLES)).mean(axis=1)
    colour = bilinear(image, sample_xy).reshape(len(seen), len(_SAMPLES), 3).mean(axis=1)
    return Seen(seen, area * (grad + GRAD_FLOOR), colour)


def photometric_outliers(seen: list[Seen], n_faces: int) -> list[np.ndarray]:
    """Per photo, a mask over the faces it sees: True where its colour of the face is an
    outlier among the photos of that face (a passer-by, a car, a specular highlight), as
    mvs-texturing's and OpenMVS's photometric consistency checks drop such views.

    Each photo's exposure is levelled first (per channel, its median ratio to the faces'
    median colours), so that a darker photo is not taken for an outlier. Then, per face
    seen by at least OUTLIER_MIN_VIEWS photos, the median colour over its photos and the
    median distance to it: a photo further than OUTLIER_SPREAD times that spread (as a
    standard deviation) and than OUTLIER_DISTANCE is an outlier. A face keeps every photo
    if all of them would be outliers."""
    counts = [len(s.faces) for s in seen]
    if not sum(counts):
        return [np.zeros(0, bool) for _ in seen]
    face = np.concatenate([s.faces for s in seen])
    view = np.repeat(np.arange(len(seen)), counts)
    colour = np.concatenate([s.colour for s in seen]).astype(np.float64)
    per_face = np.bincount(face, minlength=n_faces)
    judged = per_face[face] >= OUTLIER_MIN_VIEWS
    centre = np.stack([_group_median(face, colour[:, c], n_faces) for c in range(3)], axis=1)
    # each photo's exposure against the faces' medians, where a face gives a stable ratio
    ratio = colour / np.maximum(centre[face], 1e-6)
    stable = judged & (centre[face] > 0.05).all(axis=1)
    gain = np.ones((len(seen), 3))
    if stable.any():
        for c in range(3):
            g = _group_median(view[stable], ratio[stable, c], len(seen))
            gain[:, c] = np.where(np.isfinite(g) & (g > 0), g, 1.0)
    levelled = colour / gain[view]
    centre = np.stack([_group_median(face, levelled[:, c], n_faces) for c in range(3)], axis=1)
    distance = np.linalg.norm(levelled - centre[face], axis=1)
    spread = 1.4826 * _group_median(face, distance, n_faces)  # the MAD as a deviation
    limit = np.maximum(OUTLIER_SPREAD * spread, OUTLIER_DISTANCE)
    outlier = judged & (distance > limit[face])
    kept = np.bincount(face[~outlier], minlength=n_faces)
    outlier &= kept[face] > 0
    return np.split(outlier, np.cumsum(counts)[:-1])


def _group_median(groups: np.ndarray, values: np.ndarray, n_groups: int) -> np.ndarray:
    """The (lower) median of `values` (>= 0) per group id in [0, n_groups); NaN for an
    empty group. One sort of group + value scaled into [0, 0.5): some 20 times faster
    than np.lexsort over the hundreds of thousands of (face, photo) entries of a mesh."""
    count = np.bincount(groups, minlength=n_groups)
    out = np.full(n_groups, np.nan)
    if not len(values):
        return out
    scale = 2.0 * max(float(values.max()), 1e-12)
    key = np.sort(groups + values / scale)
    start = np.cumsum(count) - count
    has = count > 0
    out[has] = (key[start[has] + (count[has] - 1) // 2] - np.flatnonzero(has)) * scale
    return out


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
    # message m goes from face src[m] to face dst[m]; m and m +- e run along one edge
    src = np.concatenate([pairs[:, 0], pairs[:, 1]])
    dst = np.concatenate([pairs[:, 1], pairs[:, 0]])
    e = len(pairs)
    incoming = sparse.csr_matrix(
        (np.ones(2 * e, np.float32), (dst, np.arange(2 * e))), shape=(n, 2 * e)
    )
    messages = np.zeros((2 * e, k), np.float32)
    h = np.empty_like(messages)
    # in place, one reduction per round (the min of min(h, min h + s) is min h): 1.8 times
    # as fast as fresh arrays on 480,000 faces, the same labels
    for _ in range(iterations):
        if check is not None:
            check()
        belief = data + incoming @ messages
        np.take(belief, src, axis=0, out=h)
        h[:e] -= messages[e:]  # less what the face sent along the same edge
        h[e:] -= messages[:e]
        h -= h.min(axis=1, keepdims=True)
        np.minimum(h, smoothness, out=h)
        messages += h  # damped: the mean of the old and the new message
        messages *= 0.5
    belief = data + incoming @ messages
    return np.asarray(np.argmin(belief, axis=1))
