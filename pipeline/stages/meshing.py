"""meshing: a watertight Poisson surface, cut back to where the photos saw something.

Screened Poisson reconstruction (open3d, which keeps the per-vertex sample density)
of `<ws>/fusion/fused.ply` at the preset's octree depth, one level less for each halving of
the depth maps below the preset's stereo_max_size (`octree_depth`), then:

1. density trim: vertices the points barely support (Poisson's extrapolated "balloon"
   surfaces over holes and behind the scene) are removed;
2. crop to the bounds of the fused points, padded by a few percent;
3. small disconnected pieces are dropped;
4. quadric decimation to the preset's face budget.

Writes `<ws>/meshing/mesh.ply`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import open3d as o3d
from scipy.spatial import cKDTree

from pipeline.context import StageContext, StageResult
from pipeline.errors import PermanentError
from pipeline.stages._common import (
    FUSED_CLOUD,
    MESH,
    Timer,
    require,
    stage_preset,
    thread_count,
)
from pipeline.stages._workspace import building, finished, read_metrics, record

NAME = "meshing"
UNDISTORT = "undistort"  # whose metrics say at what size the depth maps were made
DENSITY_QUANTILE = 0.02  # vertices below this density quantile are trimmed
MAX_GAP_SPACINGS = 6.0  # vertices farther from any fused point than this many point
MAX_GAP_CELLS = 1.0  # spacings and Poisson cells are trimmed (bridged holes, skirts)
POISSON_SCALE = 1.1  # open3d's default: the octree spans 1.1 x the points' bounds
BOUNDS_PERCENTILE = 0.2  # robust bounds of the fused points (per axis, each side)
BOUNDS_PADDING = 0.03  # share of the bounds' extent added on every side
MIN_COMPONENT_SHARE = 0.01  # pieces with fewer faces than this share of the largest go


def point_bounds(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo = np.percentile(points, BOUNDS_PERCENTILE, axis=0)
    hi = np.percentile(points, 100 - BOUNDS_PERCENTILE, axis=0)
    pad = BOUNDS_PADDING * (hi - lo).max()
    return lo - pad, hi + pad


def octree_depth(preset_depth: int, stereo_max_size: int, stereo_size: int | None) -> int:
    """Poisson's octree depth: the preset's for depth maps at its stereo_max_size (the
    presets give one level per doubling: low 8 at 400 px, medium 9 at 800, high 10 at
    1600), one level less per halving below it (undistort's stereo_size). A finer octree
    than the points resolve only costs time: high on 16 photos of 1600 px, depth maps at
    800 px, depth 10 meshed in 26 s to an object F-score of 0.879, depth 9 in 7 s to 0.889."""
    if not stereo_size or stereo_max_size <= 0 or stereo_size >= stereo_max_size:
        return preset_depth
    return preset_depth - round(math.log2(stereo_max_size / stereo_size))


def poisson(cloud: o3d.geometry.PointCloud, depth: int, threads: int) -> tuple[Any, np.ndarray]:
    with o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Error):
        mesh, densities = o3d.geometry.TriangleMesh.create_from_point_cloud_poisson(
            cloud, depth=depth, n_threads=threads
        )
    return mesh, np.asarray(densities)


def max_gap(points: np.ndarray, tree: cKDTree, depth: int, workers: int) -> float:
    """How far from the fused points a vertex may lie before it counts as invented."""
    sample = points[:: max(1, len(points) // 20_000)]
    d, _ = tree.query(sample, k=2, workers=workers)
    spacing = float(np.median(d[:, 1]))
    cell = POISSON_SCALE * float((points.max(axis=0) - points.min(axis=0)).max()) / 2**depth
    return max(MAX_GAP_SPACINGS * spacing, MAX_GAP_CELLS * cell)


def trim(
    mesh: o3d.geometry.TriangleMesh,
    densities: np.ndarray,
    points: np.ndarray,
    depth: int,
    workers: int = 1,
) -> o3d.geometry.TriangleMesh:
    """Drop vertices with little support (low density or far from every fused point)
    or outside the points' padded bounds, then small disconnected pieces."""
    v = np.asarray(mesh.vertices)
    lo, hi = point_bounds(points)
    tree = cKDTree(points)
    gap, _ = tree.query(v, k=1, workers=workers)
    weak = densities < float(np.quantile(densities, DENSITY_QUANTILE))
    far = gap > max_gap(points, tree, depth, workers)
    outside = np.any(v < lo, axis=1) | np.any(v > hi, axis=1)
    mesh.remove_vertices_by_mask(weak | far | outside)
    mesh.remove_unreferenced_vertices()
    if len(mesh.triangles) == 0:
        return mesh
    cluster_ids, cluster_sizes, _ = mesh.cluster_connected_triangles()
    clusters = np.asarray(cluster_ids)
    sizes = np.asarray(cluster_sizes)
    small = sizes < MIN_COMPONENT_SHARE * sizes.max()
    if small.any():
        mesh.remove_triangles_by_mask(small[clusters])
        mesh.remove_unreferenced_vertices()
    return mesh


def run(ctx: StageContext) -> StageResult:
    done = finished(ctx, NAME)
    if done is not None:
        return done
    fused = require(ctx, FUSED_CLOUD)
    timer = Timer()
    p = stage_preset(ctx)
    device = str(read_metrics(ctx.workspace, FUSED_CLOUD[0]).get("device") or "cpu")
    cloud = o3d.io.read_point_cloud(fused)
    if len(cloud.points) == 0 or not cloud.has_normals():
        # Poisson crashes on an empty cloud: never call it then
        raise PermanentError("the fused point cloud is empty or has no normals")
    ctx.check_cancelled()
    depth = octree_depth(
        p.poisson_depth,
        p.stereo_max_size,
        read_metrics(ctx.workspace, UNDISTORT).get("stereo_size"),
    )
    ctx.progress(0.05, f"Poisson reconstruction (depth {depth})")
    mesh, densities = poisson(cloud, depth, thread_count(ctx))
    raw_faces = len(mesh.triangles)
    ctx.check_cancelled()
    ctx.progress(0.6, "trimming")
    mesh = trim(mesh, densities, np.asarray(cloud.points), depth, thread_count(ctx))
    trimmed_faces = len(mesh.triangles)
    if trimmed_faces == 0:
        raise PermanentError("nothing was left of the mesh after trimming")
    ctx.check_cancelled()
    if trimmed_faces > p.face_budget:
        ctx.progress(0.75, f"decimating {trimmed_faces} faces to {p.face_budget}")
        mesh = mesh.simplify_quadric_decimation(target_number_of_triangles=p.face_budget)
        mesh.remove_unreferenced_vertices()
    mesh.remove_degenerate_triangles()
    mesh.compute_vertex_normals()
    with building(ctx, NAME) as out:
        path = out / MESH[-1]
        if not o3d.io.write_triangle_mesh(path, mesh, write_ascii=False):
            raise OSError(f"could not write {path}")
        v = np.asarray(mesh.vertices)
        metrics: dict[str, Any] = {
            "poisson_depth": depth,
            "face_budget": p.face_budget,
            "faces_poisson": raw_faces,
            "faces_trimmed": trimmed_faces,
            "faces": len(mesh.triangles),
            "vertices": len(v),
            "bbox": [v.min(axis=0).round(4).tolist(), v.max(axis=0).round(4).tolist()],
            "seconds": timer.seconds,
        }
        result = record(out, StageResult(metrics=metrics, device=device))
    ctx.progress(1.0, f"{metrics['faces']} faces")
    return result
