"""Step 3 of the texture stage: one colour gain per photo and channel where the photos'
patches meet, then a local correction at each seam vertex."""

from __future__ import annotations

import math

import numpy as np
from scipy import sparse

from pipeline.stages.texture.views import View, bilinear

# a seam vertex's colour in a photo: the mean at its projection and a pixel to each side
_AROUND = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]], np.float64)
GAIN_REGULARISER = 0.05


def seam_gains(samples: list[tuple[int, int, np.ndarray, np.ndarray]], n_views: int) -> np.ndarray:
    """Per view and channel gain (n_views, 3): least squares over seam samples
    (view a, view b, colour in a, colour in b) of log(g_a c_a) = log(g_b c_b), with a pull
    of every log gain towards 0."""
    gains = np.ones((n_views, 3))
    if not samples:
        return gains
    a = np.array([s[0] for s in samples])
    b = np.array([s[1] for s in samples])
    ca = np.log(np.maximum(np.array([s[2] for s in samples]), 1 / 255))
    cb = np.log(np.maximum(np.array([s[3] for s in samples]), 1 / 255))
    m = len(samples)
    rows = np.concatenate([np.arange(m), np.arange(m), m + np.arange(n_views)])
    cols = np.concatenate([a, b, np.arange(n_views)])
    vals = np.concatenate(
        [np.ones(m), -np.ones(m), np.full(n_views, math.sqrt(GAIN_REGULARISER * m / n_views))]
    )
    A = sparse.csr_matrix((vals, (rows, cols)), shape=(m + n_views, n_views))
    for ch in range(3):
        rhs = np.concatenate([cb[:, ch] - ca[:, ch], np.zeros(n_views)])
        sol = sparse.linalg.lsqr(A, rhs)[0]
        gains[:, ch] = np.exp(np.clip(sol, -1.0, 1.0))
    return gains


def level_seams(
    vertices: np.ndarray,
    faces: np.ndarray,
    labels: np.ndarray,
    views: list[View],
    images: dict[int, np.ndarray],
    pairs: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(per-view gains (n, 3), per face corner colour offsets (m, 3, 3), seam vertices).

    Global step: gains from the colours both photos give each vertex of an edge where two
    labels meet. Local step: at every seam vertex, each photo's (gained) colour is moved to
    the mean of the photos meeting there; the offset fades to 0 across the faces around it."""
    n_views = len(views)
    offsets = np.zeros((len(faces), 3, 3))
    la, lb = labels[pairs[:, 0]], labels[pairs[:, 1]]
    seam = (la != lb) & (la >= 0) & (lb >= 0)
    if not seam.any():
        return np.ones((n_views, 3)), offsets, 0
    # seam vertices and, per vertex, the labels of the faces around it
    corner_vertex = faces.ravel()
    corner_label = np.repeat(labels, 3)
    keep = corner_label >= 0
    vl = np.unique(np.stack([corner_vertex[keep], corner_label[keep]], axis=1), axis=0)
    counts = np.bincount(vl[:, 0], minlength=len(vertices))
    seam_vertex = counts > 1
    vl = vl[seam_vertex[vl[:, 0]]]
    # the colour each photo gives each seam vertex (a small mean around the projection)
    sample = np.zeros((len(vl), 3))
    for k in np.unique(vl[:, 1]):
        sel = np.flatnonzero(vl[:, 1] == k)
        xy, _ = views[k].project(vertices[vl[sel, 0]])
        around = (xy[None] + _AROUND[:, None]).reshape(-1, 2)
        sample[sel] = bilinear(images[int(k)], around).reshape(len(_AROUND), -1, 3).mean(axis=0)
    # global: pairs of photos at the same vertex
    start = np.searchsorted(vl[:, 0], np.unique(vl[:, 0]))
    end = np.append(start[1:], len(vl))
    pa, pb = [], []
    for s, e in zip(start, end, strict=True):
        for i in range(s, e - 1):
            pa.append(i)
            pb.append(i + 1)
    ia, ib = np.array(pa, np.int64), np.array(pb, np.int64)
    samples = [
        (int(vl[i, 1]), int(vl[j, 1]), sample[i], sample[j]) for i, j in zip(ia, ib, strict=True)
    ]
    gains = seam_gains(samples, n_views)
    # local: offset to the mean of the gained colours at the vertex
    gained = sample * gains[vl[:, 1]]
    group = np.repeat(np.arange(len(start)), end - start)
    mean = np.zeros((len(start), 3))
    np.add.at(mean, group, gained)
    mean /= (end - start)[:, None]
    delta = mean[group] - gained  # per (seam vertex, label)
    key = vl[:, 0].astype(np.int64) * (n_views + 1) + vl[:, 1]
    order = np.argsort(key)
    fk = faces.astype(np.int64) * (n_views + 1) + labels[:, None]
    pos = np.searchsorted(key[order], fk)
    pos = np.clip(pos, 0, len(key) - 1)
    found = (key[order][pos] == fk) & (labels[:, None] >= 0)
    offsets[found] = delta[order][pos[found]]
    return gains, offsets, int(len(start))
