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
   A photo whose colour of a face disagrees with what most photos of it show (a
   passer-by, a highlight: select.photometric_outliers) does not take that face.
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

import shutil
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import open3d as o3d
from PIL import Image

from pipeline.context import StageContext, StageResult
from pipeline.errors import PermanentError
from pipeline.stages._common import (
    COLOURED_MESH,
    UNDISTORT_MODEL,
    Timer,
    require,
    stage_preset,
    thread_count,
)
from pipeline.stages._workspace import building, finished, record
from pipeline.stages.texture.atlas import (
    MIN_TEXELS_PER_FACE,
    PADDING,
    ROWS_PER_CHUNK,
    atlas_size_for,
    build_atlas,
    dilate,
    rasterise,
)
from pipeline.stages.texture.render import MESH, STAGE, TEXTURE, load_textured, render
from pipeline.stages.texture.scores import held_out_scores, image_scores
from pipeline.stages.texture.seams import GAIN_REGULARISER, level_seams, seam_gains
from pipeline.stages.texture.select import (
    BP_ITERATIONS,
    GRAD_FLOOR,
    MIN_COS,
    Seen,
    Surface,
    face_adjacency,
    face_visibility,
    photometric_outliers,
    potts_labels,
)
from pipeline.stages.texture.views import (
    View,
    bilinear,
    full_resolution_views,
    gradient_magnitude,
    load_views,
)

SMOOTHNESS = 1.0  # Potts cost of a label change between neighbouring faces (data costs in [0, 1])

__all__ = [
    "BP_ITERATIONS",
    "GAIN_REGULARISER",
    "GRAD_FLOOR",
    "MESH",
    "MIN_COS",
    "MIN_TEXELS_PER_FACE",
    "PADDING",
    "ROWS_PER_CHUNK",
    "SMOOTHNESS",
    "STAGE",
    "Seen",
    "Surface",
    "TEXTURE",
    "View",
    "atlas_size_for",
    "build_atlas",
    "dilate",
    "face_adjacency",
    "face_visibility",
    "full_resolution_views",
    "held_out_scores",
    "image_scores",
    "level_seams",
    "load_textured",
    "load_views",
    "photometric_outliers",
    "potts_labels",
    "rasterise",
    "render",
    "run",
    "seam_gains",
]


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

    step = Timer()
    seen = _what_each_photo_sees(ctx, vertices, faces, views, threads)
    _require_seen(seen)
    outliers = photometric_outliers(seen, len(faces))
    seen = [s.without(drop) for s, drop in zip(seen, outliers, strict=True)]
    timings["visibility_s"] = step.seconds

    step = Timer()
    labels, pairs = _choose_labels(ctx, faces, views, seen)
    timings["labels_s"] = step.seconds

    step = Timer()
    ctx.progress(0.5, "levelling seams")
    used = sorted(set(labels[labels >= 0].tolist()))
    images = _load_photos(ctx, views, used, threads)
    gains, seam_offsets, seam_vertices = level_seams(vertices, faces, labels, views, images, pairs)
    timings["seams_s"] = step.seconds

    step = Timer()
    ctx.progress(0.55, f"packing the charts of {len(faces)} faces")
    vmap, new_faces, uv_px, width, height, charts = build_atlas(
        vertices, faces, labels, views, pairs, texture_size
    )
    ctx.check_cancelled()
    timings["atlas_s"] = step.seconds

    step = Timer()
    ctx.progress(0.7, f"baking a {width}x{height} texture")
    face_of, bary = rasterise(uv_px, new_faces, width, height, ctx.check_cancelled)
    filled = face_of >= 0
    colour = _texel_colours(
        ctx, vertices, faces, colours, labels, views, images, gains, seam_offsets, face_of, bary
    )
    texture = np.zeros((height, width, 3), np.float32)
    texture[filled] = np.clip(colour, 0.0, 1.0)
    texture = dilate(texture, filled)
    timings["bake_s"] = step.seconds

    ctx.progress(0.95, "writing the texture")
    _write(out, vertices[vmap], colours[vmap], vmap, new_faces, uv_px, texture)
    textured = int((labels >= 0).sum())
    metrics: dict[str, Any] = {
        "faces": len(faces),
        "vertices": len(vmap),
        "texture_size": [width, height],
        "texture_size_preset": texture_size,
        "charts": charts,
        "views": len(views),
        "views_used": len(used),
        "outlier_views": int(sum(int(o.sum()) for o in outliers)),
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


# ---------------------------------------------------------------- step 1: what each photo sees


def _what_each_photo_sees(
    ctx: StageContext, vertices: np.ndarray, faces: np.ndarray, views: list[View], threads: int
) -> list[Seen]:
    """Per photo (in order): what it sees. One photo at a time, its rays cast on all
    threads: photos on threads of their own took 1.2 times as long (they wait on each
    other for Python's lock)."""
    ctx.progress(0.0, f"finding what {len(views)} photos see")
    surface = Surface.of(vertices, faces)
    seen: list[Seen] = []
    for k, view in enumerate(views):
        ctx.check_cancelled()
        image = view.load()
        seen.append(face_visibility(view, surface, image, gradient_magnitude(image), threads))
        ctx.progress(0.35 * (k + 1) / len(views), f"photo {k + 1}/{len(views)} seen")
    return seen


def _require_seen(seen: list[Seen]) -> None:
    if not any(len(s.faces) for s in seen):
        raise PermanentError(
            "no photo sees the mesh",
            hint="the mesh and the cameras disagree: run meshing and undistort again",
        )


# ---------------------------------------------------------------- step 2: one photo per face


def _choose_labels(
    ctx: StageContext,
    faces: np.ndarray,
    views: list[View],
    seen: list[Seen],
) -> tuple[np.ndarray, np.ndarray]:
    """(the photo of each face, -1 where none sees it; the pairs of neighbouring faces)."""
    ctx.progress(0.4, "choosing a photo per face")
    n_seen = np.zeros(len(faces), np.int64)
    for s in seen:
        n_seen[s.faces] += 1
    cost = np.full((len(faces), len(views)), np.inf, np.float32)
    best = np.zeros(len(faces))
    for k, s in enumerate(seen):
        cost[s.faces, k] = s.score
        best[s.faces] = np.maximum(best[s.faces], s.score)
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
    return labels, pairs


# ---------------------------------------------------------------- step 3: the photos in use


def _load_photos(
    ctx: StageContext, views: list[View], used: list[int], threads: int
) -> dict[int, np.ndarray]:
    images: dict[int, np.ndarray] = {}
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for k, img in pool.map(partial(_load_photo, ctx, views), used):
            images[k] = img
    return images


def _load_photo(ctx: StageContext, views: list[View], k: int) -> tuple[int, np.ndarray]:
    ctx.check_cancelled()
    return k, views[k].pixels()


# ---------------------------------------------------------------- step 5: bake


def _texel_colours(
    ctx: StageContext,
    vertices: np.ndarray,
    faces: np.ndarray,
    colours: np.ndarray,
    labels: np.ndarray,
    views: list[View],
    images: dict[int, np.ndarray],
    gains: np.ndarray,
    seam_offsets: np.ndarray,
    face_of: np.ndarray,
    bary: np.ndarray,
) -> np.ndarray:
    """(n, 3) colours of the filled texels in row-major order: each from its face's photo
    (gained, with the seam correction spread over the face), vertex colours where no photo
    sees the face."""
    ty, tx = np.nonzero(face_of >= 0)
    tf = face_of[ty, tx]  # face index (same order as the original faces)
    tb = bary[ty, tx].astype(np.float64)
    points = np.einsum("nk,nkd->nd", tb, vertices[faces[tf]])
    tl = labels[tf]
    colour = np.einsum("nk,nkd->nd", tb, colours[faces[tf]])  # vertex colours by default
    for k in sorted(images):
        ctx.check_cancelled()
        sel = np.flatnonzero(tl == k)
        xy, _ = views[k].project(points[sel])
        c = bilinear(images[k], xy) * gains[k]
        # the local seam correction of each corner, spread over the face
        corr = np.einsum("nk,nkd->nd", tb[sel], seam_offsets[tf[sel]])
        colour[sel] = c + corr
    return np.asarray(colour)


def _write(
    out: Path,
    vertices: np.ndarray,
    colours: np.ndarray,
    vmap: np.ndarray,
    faces: np.ndarray,
    uv_px: np.ndarray,
    texture: np.ndarray,
) -> None:
    """`mesh.npz` (uv in OBJ convention: v = 0 at the bottom row of the image) and
    `texture.png` into `out`."""
    height, width = texture.shape[:2]
    uv = np.stack([uv_px[:, 0] / width, 1.0 - uv_px[:, 1] / height], axis=1)
    vcol = (np.clip(colours, 0, 1) * 255 + 0.5).astype(np.uint8)
    np.savez(
        out / MESH,
        vertices=vertices,
        faces=faces.astype(np.int32),
        uv=uv.astype(np.float32),
        vertex_colours=vcol,
        source_vertex=vmap.astype(np.int32),
    )
    img8 = (texture * 255 + 0.5).astype(np.uint8)
    Image.fromarray(img8).save(out / TEXTURE, format="PNG", compress_level=1)
