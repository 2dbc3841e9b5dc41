"""texture: a UV atlas for the mesh, baked from the undistorted photos.

Reads `<ws>/color/mesh.ply` (the meshing stage's surface with its vertex colours) and the
photos and PINHOLE cameras in `<ws>/undistort/`. Where undistort shrank the photos to the
depth maps' size, the stage undistorts ingest's photos again at their own size (same
model, same poses) into its temporary folder and textures from those. Steps, as in
mvs-texturing (Waechter et al. 2014, "Let There Be Color!"):

1. views: for every photo, the faces it sees. A face counts as seen when it faces the
   camera, projects inside the photo, and rays from the camera to its centre and to three
   points near its corners reach it first (open3d RaycastingScene), so a face hidden
   behind another surface never takes that photo. Its data term is the gradient magnitude
   summed over the projected face (mvs-texturing's GMI): close, frontal, sharp views win.
2. labels: one photo per face, from a Potts MRF (data term + a fixed cost wherever two
   neighbouring faces take different photos), solved by min-sum loopy belief propagation
   (numpy/scipy: GCO's graph cuts are research-only and PyMaxflow is GPL; neither fits MIT).
3. seams: one colour gain per photo and channel, fitted by least squares so that the photos
   agree where their patches meet (exposure differs between photos), then a local
   correction at each seam vertex, spread over the faces around it.
4. atlas: the charts are the patches of neighbouring faces that took the same photo, laid
   out as that photo shows them (as mvs-texturing and OpenMVS do: no distortion, one
   scale for all), shelf-packed into one texture of at most the preset's `texture_size`,
   with `PADDING` texels around each; every texel outside the charts takes the colour of
   the nearest texel inside one (dilation), so mipmaps never bleed across charts. (xatlas
   took 40 s to chart 50,000 faces on 2 cores, longer than the rest of the job.)
5. bake: each texel takes the colour of its face's photo; faces no photo sees take the
   vertex colours of `color`.

Steps check for cancel between photos, belief-propagation rounds and atlas rows; every
file is built in a temporary folder published by one rename. Publishes `<ws>/texture/`
with `mesh.npz` (vertices, faces, uv in OBJ convention: v = 0 at the bottom of the image,
per-vertex colours), `texture.png` and `metrics.json`.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import open3d as o3d
from PIL import Image
from scipy import ndimage, sparse

from pipeline.context import StageContext, StageResult
from pipeline.errors import PermanentError
from pipeline.stages._common import (
    COLOURED_MESH,
    INGEST_IMAGES,
    TEXTURED_MESH,
    UNDISTORT_MODEL,
    Timer,
    require,
    stage_preset,
    thread_count,
)
from pipeline.stages._workspace import building, finished, record

STAGE = "texture"
MESH = TEXTURED_MESH[-1]
TEXTURE = "texture.png"
PADDING = 4  # texels between charts
MIN_TEXELS_PER_FACE = 4.0  # below this the atlas cannot hold the mesh
MIN_COS = 0.08  # faces seen more obliquely than ~85 degrees do not take that photo
GRAD_FLOOR = 0.2  # keeps flat, textureless faces choosing by projected area (measured: 0.02-1.0)
SMOOTHNESS = 1.0  # Potts cost of a label change between neighbouring faces (data costs in [0, 1])
BP_ITERATIONS = 20
GAIN_REGULARISER = 0.05
ROWS_PER_CHUNK = 256  # atlas rows rasterised between cancel checks

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


@dataclass
class View:
    name: str
    path: Path
    K: np.ndarray  # 3x3
    R: np.ndarray  # 3x3 world -> camera
    t: np.ndarray  # 3
    width: int
    height: int

    @property
    def centre(self) -> np.ndarray:
        return np.asarray(-self.R.T @ self.t)

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates (COLMAP: the first pixel's centre is at 0.5) and depths."""
        cam = points @ self.R.T + self.t
        z = cam[:, 2]
        safe = np.where(np.abs(z) < 1e-12, 1e-12, z)
        x = self.K[0, 0] * cam[:, 0] / safe + self.K[0, 2]
        y = self.K[1, 1] * cam[:, 1] / safe + self.K[1, 2]
        return np.stack([x, y], axis=1), z

    def load(self) -> np.ndarray:
        """The photo as (h, w, 3) float32 in [0, 1]."""
        with Image.open(self.path) as im:
            rgb = np.asarray(im.convert("RGB"), np.float32) / 255.0
        if rgb.shape[:2] != (self.height, self.width):
            raise PermanentError(
                f"photo {self.name} is {rgb.shape[1]}x{rgb.shape[0]} px, its camera says "
                f"{self.width}x{self.height}",
                hint="run the undistort stage again",
            )
        return rgb


def load_views(folder: Path) -> list[View]:
    """The registered photos of a COLMAP dense workspace (`<ws>/undistort/`: `sparse/`,
    `images/`) with their pinhole cameras."""
    import pycolmap

    rec = pycolmap.Reconstruction(str(folder / "sparse"))
    views = []
    for image_id in sorted(rec.reg_image_ids(), key=lambda i: rec.images[i].name):
        image = rec.images[image_id]
        camera = rec.cameras[image.camera_id]
        path = folder / "images" / image.name
        if not path.is_file():
            raise PermanentError(
                f"photo {image.name} is missing from the workspace ({path})",
                hint="run the undistort stage again (remove its folder) so it rewrites the photos",
            )
        pose = np.asarray(image.cam_from_world().matrix(), np.float64)
        views.append(
            View(
                name=image.name,
                path=path,
                K=np.asarray(camera.calibration_matrix(), np.float64),
                R=pose[:, :3],
                t=pose[:, 3],
                width=int(camera.width),
                height=int(camera.height),
            )
        )
    return views


def _bilinear(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Sample image (h, w[, c]) at pixel coordinates xy (n, 2), pixel centres at +0.5."""
    h, w = image.shape[:2]
    x = np.clip(xy[:, 0] - 0.5, 0.0, w - 1.0)
    y = np.clip(xy[:, 1] - 0.5, 0.0, h - 1.0)
    x0 = np.minimum(x.astype(np.int64), w - 2 if w > 1 else 0)
    y0 = np.minimum(y.astype(np.int64), h - 2 if h > 1 else 0)
    fx, fy = x - x0, y - y0
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    if image.ndim == 3:
        fx, fy = fx[:, None], fy[:, None]
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return np.asarray(top * (1 - fy) + bottom * fy)


def _gradient_magnitude(rgb: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
    return np.asarray(cv2.GaussianBlur(np.sqrt(gx * gx + gy * gy), (5, 5), 1.0))


def full_resolution_views(ctx: StageContext, views: list[View], folder: Path) -> list[View]:
    """The same photos undistorted at the size ingest left them (undistort shrinks them
    to the depth maps' size), into `folder`; `views` if they are that size already."""
    import pycolmap

    model = ctx.workspace / "mapping" / "sparse" / "0"
    images = ctx.workspace.joinpath(*INGEST_IMAGES)
    if not model.is_dir() or not images.is_dir():
        return views
    rec = pycolmap.Reconstruction(str(model))
    biggest = max((max(c.width, c.height) for c in rec.cameras.values()), default=0)
    if biggest <= max(max(v.width, v.height) for v in views):
        return views
    options = pycolmap.UndistortCameraOptions()
    options.max_image_size = -1
    ctx.check_cancelled()
    pycolmap.undistort_images(
        folder,
        model,
        images,
        output_type="COLMAP",
        undistort_options=options,
        jpeg_quality=95,
        num_threads=thread_count(ctx),
    )
    ctx.check_cancelled()
    full = load_views(folder)
    if [v.name for v in full] != [v.name for v in views]:
        return views  # another model than undistort's: keep to undistort's photos
    return full


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
    grad = _bilinear(gradient, sample_xy).reshape(len(seen), len(_SAMPLES)).mean(axis=1)
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


# ---------------------------------------------------------------- step 3: seams


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


# ---------------------------------------------------------------- step 4: atlas


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


# ---------------------------------------------------------------- rendering (preview, tests)


def render(
    vertices: np.ndarray,
    faces: np.ndarray,
    K: np.ndarray,
    R: np.ndarray,
    t: np.ndarray,
    width: int,
    height: int,
    *,
    uv: np.ndarray | None = None,
    texture: np.ndarray | None = None,
    vertex_colours: np.ndarray | None = None,
    rays: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast the mesh from a pinhole camera: (h, w, 3) float colours in [0, 1] and the
    mask of pixels the mesh covers. Colours come from `texture` sampled through `uv`
    (OBJ convention, v = 0 at the bottom) or else from `vertex_colours` ([0, 1]).
    `rays` (h, w, 6: origin, direction), if given, replace the pinhole's (a camera with
    lens distortion)."""
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(
        o3d.core.Tensor.from_numpy(np.ascontiguousarray(np.asarray(vertices, np.float32))),
        o3d.core.Tensor.from_numpy(np.ascontiguousarray(np.asarray(faces, np.uint32))),
    )
    extrinsic = np.eye(4)
    extrinsic[:3, :3], extrinsic[:3, 3] = R, t
    if rays is None:
        cast = o3d.t.geometry.RaycastingScene.create_rays_pinhole(
            intrinsic_matrix=o3d.core.Tensor.from_numpy(
                np.ascontiguousarray(np.asarray(K, np.float64))
            ),
            extrinsic_matrix=o3d.core.Tensor.from_numpy(np.ascontiguousarray(extrinsic)),
            width_px=int(width),
            height_px=int(height),
        )
    else:
        cast = o3d.core.Tensor.from_numpy(np.ascontiguousarray(rays, np.float32))
    hit = scene.cast_rays(cast)
    ok = np.isfinite(hit["t_hit"].numpy())
    prim = hit["primitive_ids"].numpy()[ok].astype(np.int64)
    buv = hit["primitive_uvs"].numpy()[ok].astype(np.float64)
    b = np.stack([1.0 - buv[:, 0] - buv[:, 1], buv[:, 0], buv[:, 1]], axis=1)
    tri = np.asarray(faces, np.int64)[prim]
    out = np.zeros((height, width, 3))
    if uv is not None and texture is not None:
        th, tw = texture.shape[:2]
        p = np.einsum("nk,nkd->nd", b, np.asarray(uv, np.float64)[tri])
        xy = np.stack([p[:, 0] * tw, (1.0 - p[:, 1]) * th], axis=1)
        tex = texture.astype(np.float32) / 255.0 if texture.dtype == np.uint8 else texture
        out[ok] = _bilinear(tex, xy)
    elif vertex_colours is not None:
        out[ok] = np.einsum("nk,nkd->nd", b, np.asarray(vertex_colours, np.float64)[tri])
    else:
        out[ok] = 0.8
    return out, ok


def load_textured(folder: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(mesh arrays, texture (h, w, 3) uint8) of a published texture folder."""
    with np.load(folder / MESH) as data:
        mesh = {k: data[k] for k in data.files}
    with Image.open(folder / TEXTURE) as im:
        texture = np.asarray(im.convert("RGB"))
    return mesh, texture


# ---------------------------------------------------------------- the stage


def run(ctx: StageContext) -> StageResult:
    done = finished(ctx, STAGE)
    if done is not None:
        return done
    mesh_path = require(ctx, COLOURED_MESH)
    require(ctx, UNDISTORT_MODEL)
    timer = Timer()
    texture_size = int(stage_preset(ctx).texture_size)
    mesh = o3d.io.read_triangle_mesh(mesh_path)
    vertices = np.asarray(mesh.vertices, np.float64)
    faces = np.asarray(mesh.triangles, np.int64)
    if len(faces) == 0:
        raise PermanentError("the mesh has no faces", hint="check the meshing stage")
    colours = (
        np.asarray(mesh.vertex_colors, np.float64)
        if mesh.has_vertex_colors()
        else np.full((len(vertices), 3), 0.8)
    )
    atlas_size_for(len(faces), texture_size)
    views = load_views(ctx.workspace / "undistort")
    if not views:
        raise PermanentError("no registered photo to texture from")
    with building(ctx, STAGE) as out:
        step = Timer()
        photos = out / "photos"
        views = full_resolution_views(ctx, views, photos)
        result = _texture(ctx, out, vertices, faces, colours, views, texture_size)
        result.metrics["photos_s"] = step.seconds - result.metrics["seconds"]
        result.metrics["photo_size"] = max(max(v.width, v.height) for v in views)
        result.metrics["seconds"] = timer.seconds
        shutil.rmtree(photos, ignore_errors=True)
        record(out, result)
    ctx.progress(1.0, result.metrics["summary"])
    return result


def _texture(
    ctx: StageContext,
    out: Path,
    vertices: np.ndarray,
    faces: np.ndarray,
    colours: np.ndarray,
    views: list[View],
    texture_size: int,
) -> StageResult:
    timer = Timer()
    threads = thread_count(ctx)
    timings: dict[str, float] = {}

    # --- 1. visibility and data term, one view at a time (threads over views)
    step = Timer()
    ctx.progress(0.0, f"finding what {len(views)} photos see")
    corners = vertices[faces]
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-18)
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(
        o3d.core.Tensor.from_numpy(np.ascontiguousarray(vertices.astype(np.float32))),
        o3d.core.Tensor.from_numpy(np.ascontiguousarray(faces.astype(np.uint32))),
    )
    diag = float(np.linalg.norm(vertices.max(axis=0) - vertices.min(axis=0)))
    tolerance = 1e-3 * diag

    def see(view: View) -> tuple[np.ndarray, np.ndarray]:
        ctx.check_cancelled()
        gradient = _gradient_magnitude(view.load())
        return face_visibility(view, vertices, faces, normals, scene, gradient, tolerance)

    seen: list[tuple[np.ndarray, np.ndarray]] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for k, found in enumerate(pool.map(see, views)):
            seen.append(found)
            ctx.progress(0.35 * (k + 1) / len(views), f"photo {k + 1}/{len(views)} seen")
    ctx.check_cancelled()
    timings["visibility_s"] = step.seconds
    n_seen = np.zeros(len(faces), np.int64)
    for f, _ in seen:
        n_seen[f] += 1
    if not n_seen.any():
        raise PermanentError(
            "no photo sees the mesh",
            hint="the mesh and the cameras disagree: run meshing and undistort again",
        )

    # --- 2. labels
    step = Timer()
    ctx.progress(0.4, "choosing a photo per face")
    cost = np.full((len(faces), len(views)), np.inf, np.float32)
    best = np.zeros(len(faces))
    for k, (f, s) in enumerate(seen):
        cost[f, k] = s
        best[f] = np.maximum(best[f], s)
    visible = n_seen > 0
    cost[visible] = 1.0 - cost[visible] / best[visible, None]  # inf stays inf
    pairs = face_adjacency(faces)
    labels = np.full(len(faces), -1, np.int64)
    sub = np.flatnonzero(visible)
    remap = np.full(len(faces), -1, np.int64)
    remap[sub] = np.arange(len(sub))
    sub_pairs = remap[pairs]
    sub_pairs = sub_pairs[(sub_pairs >= 0).all(axis=1)]
    labels[sub] = potts_labels(cost[sub], sub_pairs, SMOOTHNESS, check=ctx.check_cancelled)
    timings["labels_s"] = step.seconds

    # --- 3. seams: per-view gains from colours where labels meet
    step = Timer()
    ctx.progress(0.5, "levelling seams")
    images: dict[int, np.ndarray] = {}
    used = sorted(set(labels[labels >= 0].tolist()))

    def load(k: int) -> tuple[int, np.ndarray]:
        ctx.check_cancelled()
        return k, views[k].load()

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for k, img in pool.map(load, used):
            images[k] = img
    gains, seam_offsets, seam_vertices = level_seams(vertices, faces, labels, views, images, pairs)
    timings["seams_s"] = step.seconds

    # --- 4. atlas
    step = Timer()
    ctx.progress(0.55, f"packing the charts of {len(faces)} faces")
    vmap, new_faces, uv_px, width, height, charts = build_atlas(
        vertices, faces, labels, views, pairs, texture_size
    )
    ctx.check_cancelled()
    timings["atlas_s"] = step.seconds

    # --- 5. bake
    step = Timer()
    ctx.progress(0.7, f"baking a {width}x{height} texture")
    face_of, bary = rasterise(uv_px, new_faces, width, height, ctx.check_cancelled)
    texture = np.zeros((height, width, 3), np.float32)
    filled = face_of >= 0
    ty, tx = np.nonzero(filled)
    tf = face_of[ty, tx]  # face index (same order as the original faces)
    tb = bary[ty, tx].astype(np.float64)
    points = np.einsum("nk,nkd->nd", tb, vertices[faces[tf]])
    tl = labels[tf]
    colour = np.einsum("nk,nkd->nd", tb, colours[faces[tf]])  # vertex colours by default
    for k in used:
        ctx.check_cancelled()
        sel = np.flatnonzero(tl == k)
        xy, _ = views[k].project(points[sel])
        c = _bilinear(images[k], xy) * gains[k]
        # the local seam correction of each corner, spread over the face
        corr = np.einsum("nk,nkd->nd", tb[sel], seam_offsets[tf[sel]])
        colour[sel] = c + corr
    texture[ty, tx] = np.clip(colour, 0.0, 1.0)
    texture = dilate(texture, filled)
    timings["bake_s"] = step.seconds

    # uv in OBJ convention: v = 0 at the bottom row of the image
    uv = np.stack([uv_px[:, 0] / width, 1.0 - uv_px[:, 1] / height], axis=1)
    vcol = (np.clip(colours[vmap], 0, 1) * 255 + 0.5).astype(np.uint8)
    ctx.progress(0.95, "writing the texture")
    np.savez(
        out / MESH,
        vertices=vertices[vmap],
        faces=new_faces.astype(np.int32),
        uv=uv.astype(np.float32),
        vertex_colours=vcol,
        source_vertex=vmap.astype(np.int32),
    )
    img8 = (texture * 255 + 0.5).astype(np.uint8)
    Image.fromarray(img8).save(out / TEXTURE, format="PNG", compress_level=1)
    textured = int((labels >= 0).sum())
    metrics: dict[str, Any] = {
        "faces": len(faces),
        "vertices": len(vmap),
        "texture_size": [width, height],
        "texture_size_preset": texture_size,
        "charts": charts,
        "views": len(views),
        "views_used": len(used),
        "faces_textured": textured,
        "faces_vertex_colour": len(faces) - textured,
        "seam_vertices": seam_vertices,
        "gain_range": [round(float(gains.min()), 4), round(float(gains.max()), 4)],
        "atlas_fill": round(float(filled.mean()), 4),
        "threads": threads,
        **{k: round(v, 3) for k, v in timings.items()},
        "seconds": timer.seconds,
        "summary": f"textured {textured}/{len(faces)} faces from {len(used)} photos",
    }
    return StageResult(metrics=metrics)


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
        acc = np.zeros((len(sel), 3))
        for dx, dy in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)):
            acc += _bilinear(images[int(k)], xy + np.array([dx, dy]))
        sample[sel] = acc / 5.0
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


# ---------------------------------------------------------------- measurement (tests, bench)


def image_scores(photo: np.ndarray, rendered: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """PSNR (dB) after one least-squares gain per channel, SSIM (grey, Gaussian window,
    over the covered pixels) and coverage of `rendered` against `photo`, both (h, w, 3)
    in [0, 1]; `mask` marks the pixels the mesh covers."""
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

    def blur(x: np.ndarray) -> np.ndarray:
        return np.asarray(ndimage.gaussian_filter(x, 1.5))

    mu_p, mu_r = blur(grey_p), blur(grey_r)
    var_p = blur(grey_p * grey_p) - mu_p**2
    var_r = blur(grey_r * grey_r) - mu_r**2
    cov = blur(grey_p * grey_r) - mu_p * mu_r
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu_p * mu_r + c1) * (2 * cov + c2)) / (
        (mu_p**2 + mu_r**2 + c1) * (var_p + var_r + c2)
    )
    inner = ndimage.binary_erosion(mask, iterations=3)
    return {
        "psnr_db": round(psnr, 3),
        "ssim": round(float(ssim[inner].mean()) if inner.any() else 0.0, 4),
        "coverage": round(float(mask.mean()), 4),
    }


def held_out_scores(
    workspace: Path,
    photo: np.ndarray,
    K: np.ndarray,
    R: np.ndarray,
    t: np.ndarray,
    to_frame: Callable[[np.ndarray], np.ndarray] = lambda p: p,
    renders: dict[str, np.ndarray] | None = None,
    rays: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Scores of the textured mesh, the vertex-coloured mesh and a flat mean colour,
    rendered from a camera the job never saw (K, R, t in the frame `to_frame` maps the
    model's coordinates to) against that camera's photo (h, w, 3) in [0, 1]. `renders`,
    if given, receives the two renderings ("textured", "vertex_colour"); `rays`
    (h, w, 6) replace the pinhole camera's, for a photo with lens distortion."""
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
    flat = np.broadcast_to(photo[vc_mask].mean(axis=0), photo.shape)
    if renders is not None:
        renders["textured"], renders["vertex_colour"] = tex_rgb, vc_rgb
    return {
        "textured": image_scores(photo, tex_rgb, tex_mask),
        "vertex_colour": image_scores(photo, vc_rgb, vc_mask),
        "flat": image_scores(photo, np.asarray(flat), vc_mask),
    }
