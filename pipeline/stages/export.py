"""export: publish the coloured mesh, a preview and a report into results/<project>/.

From `<ws>/color/mesh.ply` it writes, into `ctx.results_dir`:

- `<job>_textured_mesh_<method>.<fmt>` for each format in the request (glb, ply, obj),
  all with per-vertex colours;
- `<job>_preview.png`, rendered on the CPU without a display (open3d RaycastingScene,
  vertex colours with a head-light shading) from a viewpoint of the photos;
- `<job>_report.json`: timings, images registered, reprojection error, point, vertex
  and face counts, bounding box, device used.

Every file is written to a temporary name in the same folder, flushed to disk and
renamed into place, so a poller never sees half a file. This stage never skips: running
it again with other formats redoes only the export, from the coloured mesh.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import open3d as o3d
import trimesh
from PIL import Image

from pipeline.context import FORMATS, Export, StageContext, StageResult
from pipeline.errors import PermanentError
from pipeline.stages import STAGES
from pipeline.stages._common import COLOURED_MESH, Timer, require
from pipeline.stages._workspace import building, publish_bytes, read_metrics, record

STAGE = "export"
PREVIEW_SIZE = (800, 600)
PREVIEW_FOV = 45.0  # degrees, vertical


def mesh_name(ctx: StageContext, fmt: str) -> Path:
    return ctx.results_dir / f"{ctx.spec.job_id}_textured_mesh_{ctx.spec.method}.{fmt}"


def load_coloured_mesh(path: Path) -> trimesh.Trimesh:
    mesh = trimesh.load(str(path), process=False, force="mesh")
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise PermanentError(f"{path} holds no triangle mesh")
    return mesh


def vertex_colours(mesh: trimesh.Trimesh) -> np.ndarray:
    """(n, 4) uint8 RGBA vertex colours (grey if the mesh has none)."""
    colours = getattr(mesh.visual, "vertex_colors", None)
    if colours is None or len(colours) != len(mesh.vertices):
        return np.full((len(mesh.vertices), 4), 200, np.uint8)
    return np.asarray(colours, np.uint8)


def encode(mesh: trimesh.Trimesh, fmt: str) -> bytes:
    if fmt == "glb":
        data = trimesh.exchange.gltf.export_glb(mesh, include_normals=True)
    elif fmt == "ply":
        data = trimesh.exchange.ply.export_ply(mesh, encoding="binary", vertex_normal=True)
    elif fmt == "obj":
        text = trimesh.exchange.obj.export_obj(
            mesh, include_color=True, include_normals=True, include_texture=False
        )
        data = text.encode() if isinstance(text, str) else text
    else:
        raise PermanentError(f"unknown export format {fmt!r}", hint=", ".join(FORMATS))
    return bytes(data)


# ---------------------------------------------------------------- preview


def _viewpoint(
    ctx: StageContext, centre: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Eye and up vector: looking from where the first photo was taken, upright as the
    photos were; an oblique view from above if the sparse model cannot be read."""
    direction = np.array([1.0, -1.0, 1.0])
    up = np.array([0.0, 0.0, 1.0])
    try:
        import pycolmap

        rec = pycolmap.Reconstruction(str(ctx.stage_dir("undistort") / "sparse"))
        images = sorted((rec.images[i] for i in rec.reg_image_ids()), key=lambda im: im.name)
        if images:
            direction = np.asarray(images[0].projection_center()) - centre
            up = np.mean([im.cam_from_world().rotation.matrix()[1] for im in images], axis=0)
    except Exception:  # noqa: BLE001 - a preview must never fail the export
        pass
    direction = direction / max(float(np.linalg.norm(direction)), 1e-12)
    up = up - direction * (up @ direction)
    if np.linalg.norm(up) < 1e-6:
        up = np.array([0.0, 0.0, 1.0]) if abs(direction[2]) < 0.9 else np.array([0.0, 1.0, 0.0])
    up = up / np.linalg.norm(up)
    distance = radius / np.tan(np.radians(PREVIEW_FOV) / 2.0) * 1.05
    return centre + direction * distance, up


def render_preview(ctx: StageContext, mesh: trimesh.Trimesh) -> bytes:
    """PNG of the mesh with its vertex colours and head-light shading."""
    v = np.asarray(mesh.vertices, np.float64)
    f = np.asarray(mesh.faces, np.int64)
    colours = vertex_colours(mesh)[:, :3] / 255.0
    lo, hi = v.min(axis=0), v.max(axis=0)
    centre = (lo + hi) / 2.0
    radius = float(np.linalg.norm(hi - lo) / 2.0)
    eye, up = _viewpoint(ctx, centre, radius)
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(
        o3d.core.Tensor.from_numpy(v.astype(np.float32)),
        o3d.core.Tensor.from_numpy(f.astype(np.uint32)),
    )
    w, h = PREVIEW_SIZE
    rays = o3d.t.geometry.RaycastingScene.create_rays_pinhole(
        fov_deg=PREVIEW_FOV,
        center=centre.tolist(),
        eye=eye.tolist(),
        up=up.tolist(),
        width_px=w,
        height_px=h,
    )
    hit = scene.cast_rays(rays)
    t = hit["t_hit"].numpy()
    ok = np.isfinite(t)
    prim = hit["primitive_ids"].numpy()[ok].astype(np.int64)
    uv = hit["primitive_uvs"].numpy()[ok].astype(np.float64)
    normal = hit["primitive_normals"].numpy()[ok].astype(np.float64)
    direction = rays.numpy()[..., 3:][ok].astype(np.float64)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    tri = f[prim]
    b0 = 1.0 - uv[:, 0] - uv[:, 1]
    rgb = (
        b0[:, None] * colours[tri[:, 0]]
        + uv[:, :1] * colours[tri[:, 1]]
        + uv[:, 1:] * colours[tri[:, 2]]
    )
    shade = 0.35 + 0.65 * np.abs(np.einsum("ij,ij->i", normal, direction))
    # light grey backdrop, slightly darker at the bottom
    backdrop = np.linspace(0.93, 0.8, h)[:, None, None] * np.ones((1, w, 3))
    img = backdrop.copy()
    img[ok] = rgb * shade[:, None]
    buf = io.BytesIO()
    Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- report


def build_report(ctx: StageContext, mesh: trimesh.Trimesh, exports: list[Export]) -> dict[str, Any]:
    stages = {name: read_metrics(ctx.workspace, name) for name in STAGES if name != STAGE}
    stages = {k: v for k, v in stages.items() if v}
    timings = {
        name: m.get("seconds")
        for name, m in stages.items()
        if isinstance(m.get("seconds"), int | float)
    }
    sparse: dict[str, Any] = {}
    try:
        import pycolmap

        rec = pycolmap.Reconstruction(str(ctx.stage_dir("undistort") / "sparse"))
        sparse = {
            "images_registered": int(rec.num_reg_images()),
            "points": int(rec.num_points3D()),
            "mean_reprojection_error_px": round(float(rec.compute_mean_reprojection_error()), 4),
            "mean_track_length": round(float(rec.compute_mean_track_length()), 3),
        }
    except Exception as exc:  # noqa: BLE001 - a report lists what it can
        sparse = {"error": str(exc)}
    images_total = None
    ingest = stages.get("ingest", {})
    for key in ("images", "images_total", "num_images"):
        if isinstance(ingest.get(key), int):
            images_total = ingest[key]
            break
    v = np.asarray(mesh.vertices)
    stereo = stages.get("stereo", {})
    return {
        "job_id": ctx.spec.job_id,
        "project": ctx.spec.project,
        "quality": ctx.spec.quality,
        "method": ctx.spec.method,
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "device": stereo.get("device", "cpu"),
        "images_total": images_total,
        "images_registered": sparse.get("images_registered"),
        "mean_reprojection_error_px": sparse.get("mean_reprojection_error_px"),
        "sparse": sparse,
        "dense_points": stages.get("fusion", {}).get("points"),
        "mesh": {
            "vertices": len(mesh.vertices),
            "faces": len(mesh.faces),
            "bbox_min": v.min(axis=0).round(6).tolist(),
            "bbox_max": v.max(axis=0).round(6).tolist(),
            "watertight": bool(mesh.is_watertight),
        },
        "timings_s": timings,
        "stages": stages,
        "exports": [
            {
                "file": e.path.name,
                "format": e.format,
                "bytes": e.size if e.size is not None else e.path.stat().st_size,
                "sha256": e.sha256 or hashlib.sha256(e.path.read_bytes()).hexdigest(),
            }
            for e in exports
        ],
    }


def run(ctx: StageContext) -> StageResult:
    coloured = require(ctx, COLOURED_MESH)
    timer = Timer()
    formats = [f for f in dict.fromkeys(ctx.spec.formats)]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise PermanentError(
            f"unknown export format(s) {', '.join(unknown)}", hint=", ".join(FORMATS)
        )
    mesh = load_coloured_mesh(coloured)
    ctx.results_dir.mkdir(parents=True, exist_ok=True)
    exports: list[Export] = []
    steps = len(formats) + 2
    for k, fmt in enumerate(formats):
        ctx.check_cancelled()
        ctx.progress(k / steps, f"writing {fmt}")
        path = mesh_name(ctx, fmt)
        data = encode(mesh, fmt)
        publish_bytes(path, data)
        exports.append(Export.of_bytes(path, fmt, data))
    ctx.check_cancelled()
    ctx.progress(len(formats) / steps, "rendering preview")
    preview = ctx.results_dir / f"{ctx.spec.job_id}_preview.png"
    png = render_preview(ctx, mesh)
    publish_bytes(preview, png)
    exports.append(Export.of_bytes(preview, "png", png))
    report_path = ctx.results_dir / f"{ctx.spec.job_id}_report.json"
    report = build_report(ctx, mesh, exports)
    report["timings_s"][STAGE] = timer.seconds
    report_json = (json.dumps(report, indent=1) + "\n").encode()
    publish_bytes(report_path, report_json)
    exports.append(Export.of_bytes(report_path, "json", report_json))
    metrics: dict[str, Any] = {
        "formats": formats,
        "files": [e.path.name for e in exports],
        "vertices": len(mesh.vertices),
        "faces": len(mesh.faces),
        "seconds": timer.seconds,
    }
    device = str(report.get("device") or "cpu")
    with building(ctx, STAGE) as out:
        result = record(out, StageResult(metrics=metrics, device=device))
    result.exports = exports
    ctx.progress(1.0, f"exported {', '.join(formats)}")
    return result
