"""color: a colour for every mesh vertex, from the fused points around it.

Each fused point carries the median colour of the pixels it was fused from, so the
colour of a vertex is the inverse-distance weighted mean of its nearest fused points
(KD-tree). Vertices with no fused point nearby (filled-in holes) take the colour of
the nearest one. Writes `<ws>/color/mesh.ply` with vertex colours.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import open3d as o3d
from scipy.spatial import cKDTree

from pipeline.context import StageContext, StageResult
from pipeline.errors import PermanentError
from pipeline.stages._common import (
    COLOURED_MESH,
    FUSED_CLOUD,
    MESH,
    Timer,
    require,
    thread_count,
)
from pipeline.stages._workspace import building, finished, read_metrics, record

NAME = "color"
NEIGHBOURS = 8
CHUNK = 200_000  # vertices per query, between cancel checks


def vertex_colours(
    vertices: np.ndarray,
    points: np.ndarray,
    colours: np.ndarray,
    ctx: StageContext | None = None,
    workers: int = 1,
) -> tuple[np.ndarray, float]:
    """(n, 3) colours in [0, 1] for vertices, and the median distance to the nearest
    point (a quality hint)."""
    tree = cKDTree(points)
    k = min(NEIGHBOURS, len(points))
    out = np.empty((len(vertices), 3))
    nearest = np.empty(len(vertices))
    # points closer than a few point spacings count; farther ones barely
    spacing_d, _ = tree.query(points[:: max(1, len(points) // 5000)], k=2, workers=workers)
    spacing = float(np.median(spacing_d[:, 1])) if len(points) > 1 else 1.0
    for start in range(0, len(vertices), CHUNK):
        if ctx is not None:
            ctx.check_cancelled()
            ctx.progress(start / max(1, len(vertices)), f"colouring vertices {start}")
        d, idx = tree.query(vertices[start : start + CHUNK], k=k, workers=workers)
        if k == 1:
            d, idx = d[:, None], idx[:, None]
        w = 1.0 / np.maximum(d, 0.25 * spacing) ** 2
        w[d > d[:, :1] + 3.0 * spacing] = 0.0  # keep to the nearest surface sheet
        w /= w.sum(axis=1, keepdims=True)
        out[start : start + CHUNK] = np.einsum("nk,nkc->nc", w, colours[idx])
        nearest[start : start + CHUNK] = d[:, 0]
    return np.clip(out, 0.0, 1.0), float(np.median(nearest)) if len(nearest) else 0.0


def run(ctx: StageContext) -> StageResult:
    done = finished(ctx, NAME)
    if done is not None:
        return done
    mesh_path = require(ctx, MESH)
    fused = require(ctx, FUSED_CLOUD)
    timer = Timer()
    device = str(read_metrics(ctx.workspace, MESH[0]).get("device") or "cpu")
    mesh = o3d.io.read_triangle_mesh(mesh_path)
    cloud = o3d.io.read_point_cloud(fused)
    if len(mesh.vertices) == 0:
        raise PermanentError("the mesh is empty")
    if len(cloud.points) == 0 or not cloud.has_colors():
        raise PermanentError("the fused point cloud has no colours")
    colours, nearest = vertex_colours(
        np.asarray(mesh.vertices),
        np.asarray(cloud.points),
        np.asarray(cloud.colors),
        ctx,
        thread_count(ctx),
    )
    mesh.vertex_colors = o3d.utility.Vector3dVector(colours)
    if not mesh.has_vertex_normals():
        mesh.compute_vertex_normals()
    with building(ctx, NAME) as out:
        path = out / COLOURED_MESH[-1]
        if not o3d.io.write_triangle_mesh(path, mesh, write_ascii=False):
            raise OSError(f"could not write {path}")
        metrics: dict[str, Any] = {
            "vertices": len(mesh.vertices),
            "faces": len(mesh.triangles),
            "source": "fused points",
            "median_distance_to_points": round(nearest, 6),
            "seconds": timer.seconds,
        }
        result = record(out, StageResult(metrics=metrics, device=device))
    ctx.progress(1.0, f"coloured {len(mesh.vertices)} vertices")
    return result
