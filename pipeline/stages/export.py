"""export: publish the textured mesh, a preview and a report into results/<project>/.

From `<ws>/texture/` (UV-mapped mesh and its baked texture) and `<ws>/color/mesh.ply`
(vertex colours) it writes, into `ctx.results_dir`:

- `<job>_textured_mesh_<method>.<fmt>` for each format in the request:
  glb: the texture as a JPEG inside the file, metallic 0, roughness 1 and
  KHR_materials_unlit, so viewers show the photos' colours without relighting them;
  obj: with `<same name>.mtl` and the texture `<same name>.jpg` beside it;
  ply: vertex colours (PLY has no common way to carry a texture);
- `<job>_preview.png`, rendered on the CPU without a display (open3d RaycastingScene) from
  the viewpoint of a registered photo, with the colours as baked, and that photo beside it;
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
import struct
from pathlib import Path
from typing import Any

import numpy as np
import open3d as o3d
import trimesh
from PIL import Image

from pipeline.context import FORMATS, Export, StageContext, StageResult
from pipeline.errors import PermanentError
from pipeline.stages import STAGES
from pipeline.stages import texture as texturing
from pipeline.stages._common import (
    COLOURED_MESH,
    TEXTURED_MESH,
    UNDISTORT_MODEL,
    Timer,
    require,
)
from pipeline.stages._workspace import building, publish_bytes, read_metrics, record

STAGE = "export"
PREVIEW_SIZE = (800, 600)
PREVIEW_FOV = 45.0  # degrees, vertical
JPEG_QUALITY = 90


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


class Textured:
    """The texture stage's mesh: vertices, faces, uv (OBJ convention) and the texture."""

    def __init__(self, folder: Path) -> None:
        arrays, self.texture = texturing.load_textured(folder)
        self.vertices = np.asarray(arrays["vertices"], np.float64)
        self.faces = np.asarray(arrays["faces"], np.int64)
        self.uv = np.asarray(arrays["uv"], np.float64)
        buf = io.BytesIO()
        Image.fromarray(self.texture).save(buf, format="JPEG", quality=JPEG_QUALITY)
        self.jpeg = buf.getvalue()

    def rotated(self, rotation: np.ndarray) -> Textured:
        """The same textured mesh with its vertices turned by `rotation` (3x3)."""
        out = object.__new__(Textured)
        out.__dict__.update(self.__dict__)
        out.vertices = self.vertices @ rotation.T
        return out

    def trimesh(self) -> trimesh.Trimesh:
        image = Image.open(io.BytesIO(self.jpeg))  # .format "JPEG": embedded as JPEG
        material = trimesh.visual.material.PBRMaterial(
            name="texture",
            baseColorTexture=image,
            baseColorFactor=[255, 255, 255, 255],
            metallicFactor=0.0,
            roughnessFactor=1.0,
            doubleSided=False,
        )
        visual = trimesh.visual.TextureVisuals(uv=self.uv, material=material)
        return trimesh.Trimesh(self.vertices, self.faces, visual=visual, process=False)


def upright_rotation(workspace: Path) -> np.ndarray:
    """The rotation (3x3) that turns the reconstruction upright for a viewer: glTF and most
    viewers take +Y as up and look from +Z. Up is the mean of the cameras' up directions
    (people hold cameras upright; COLMAP's camera y axis points down the image), and the
    first photo's view direction, made level, becomes -Z, so a viewer opens on the object
    from about where that photo was taken. The identity when no camera is known."""
    try:
        import pycolmap

        rec = pycolmap.Reconstruction(str(workspace.joinpath(*UNDISTORT_MODEL)))
        ids = sorted(rec.reg_image_ids(), key=lambda i: rec.images[i].name)
        rots = [np.asarray(rec.images[i].cam_from_world().rotation.matrix()) for i in ids]
    except Exception:  # no camera model: leave the frame as it is
        return np.eye(3)
    if not rots:
        return np.eye(3)
    up = -np.mean([r[1] for r in rots], axis=0)
    if np.linalg.norm(up) < 1e-6:
        return np.eye(3)
    up /= np.linalg.norm(up)
    y = np.array([0.0, 1.0, 0.0])
    c = float(up @ y)
    if c < -1 + 1e-9:  # upside down: half a turn about x
        level = np.diag([1.0, -1.0, -1.0])
    else:
        v = np.cross(up, y)
        vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
        level = np.eye(3) + vx + vx @ vx / (1 + c)
    forward = level @ rots[0][2]  # the first camera's optical axis, in the levelled frame
    heading = np.arctan2(forward[0], -forward[2]) if np.hypot(forward[0], forward[2]) > 1e-6 else 0
    cos, sin = np.cos(heading), np.sin(heading)
    yaw = np.array([[cos, 0.0, sin], [0.0, 1.0, 0.0], [-sin, 0.0, cos]])
    rotation: np.ndarray = yaw @ level
    return rotation


def glb_with_unlit(data: bytes) -> bytes:
    """Add KHR_materials_unlit to every material of a GLB (JSON chunk rewritten)."""
    magic, version, _ = struct.unpack_from("<4sII", data, 0)
    if magic != b"glTF":
        raise ValueError("not a GLB")
    json_len, json_type = struct.unpack_from("<II", data, 12)
    doc = json.loads(data[20 : 20 + json_len])
    rest = data[20 + json_len :]
    for material in doc.get("materials", []):
        material.setdefault("extensions", {})["KHR_materials_unlit"] = {}
        pbr = material.setdefault("pbrMetallicRoughness", {})
        pbr["metallicFactor"] = 0.0
        pbr["roughnessFactor"] = 1.0
    used = doc.setdefault("extensionsUsed", [])
    if "KHR_materials_unlit" not in used:
        used.append("KHR_materials_unlit")
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)
    chunk = struct.pack("<II", len(text), json_type) + text
    total = 12 + len(chunk) + len(rest)
    return struct.pack("<4sII", magic, version, total) + chunk + rest


def encode_obj(tex: Textured, base: str) -> tuple[bytes, bytes]:
    """(OBJ text, MTL text) for `base`.obj with `base`.mtl and `base`.jpg beside it."""
    v = tex.vertices
    out = io.StringIO()
    out.write(f"# dropmesh\nmtllib {base}.mtl\n")
    np.savetxt(out, v, fmt="v %.6f %.6f %.6f")
    np.savetxt(out, tex.uv, fmt="vt %.6f %.6f")
    out.write("usemtl texture\n")
    f = tex.faces + 1
    np.savetxt(out, np.repeat(f, 2, axis=1), fmt="f %d/%d %d/%d %d/%d")
    mtl = (
        "newmtl texture\nKa 1.000 1.000 1.000\nKd 1.000 1.000 1.000\nKs 0.000 0.000 0.000\n"
        f"illum 1\nmap_Kd {base}.jpg\n"
    )
    return out.getvalue().encode(), mtl.encode()


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
    except Exception:  # a preview must never fail the export
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


def _preview_view(workspace: Path, vertices: np.ndarray) -> texturing.View | None:
    """The registered photo that shows most of the mesh (most vertices inside it)."""
    try:
        views = texturing.load_views(workspace / "undistort")
    except Exception:  # a preview must never fail the export
        return None
    best, best_n = None, -1
    sample = vertices[:: max(1, len(vertices) // 20000)]
    for view in views:
        xy, z = view.project(sample)
        n = int(
            (
                (z > 0)
                & (xy[:, 0] >= 0)
                & (xy[:, 0] < view.width)
                & (xy[:, 1] >= 0)
                & (xy[:, 1] < view.height)
            ).sum()
        )
        if n > best_n:
            best, best_n = view, n
    return best


def render_textured_preview(ctx: StageContext, tex: Textured) -> tuple[bytes, bytes | None] | None:
    """(preview PNG, photo | render JPEG) from the viewpoint of a registered photo, with
    the colours as baked (no shading); None if no photo can be used."""
    view = _preview_view(ctx.workspace, tex.vertices)
    if view is None:
        return None
    w, h = PREVIEW_SIZE
    s = min(w / view.width, h / view.height)
    K = view.K.copy()
    K[:2] *= s
    K[0, 2] += (w - view.width * s) / 2.0
    K[1, 2] += (h - view.height * s) / 2.0
    rgb, ok = texturing.render(
        tex.vertices, tex.faces, K, view.R, view.t, w, h, uv=tex.uv, texture=tex.texture
    )
    backdrop = np.linspace(0.93, 0.8, h)[:, None, None] * np.ones((1, w, 3))
    img = np.where(ok[..., None], rgb, backdrop)
    render = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    buf = io.BytesIO()
    render.save(buf, format="PNG")
    pair: bytes | None = None
    try:
        with Image.open(view.path) as photo:
            half = (w // 2, h // 2)
            canvas = Image.new("RGB", (half[0] * 2, half[1]), (235, 235, 235))
            canvas.paste(photo.convert("RGB").resize(half), (0, 0))
            canvas.paste(render.resize(half), (half[0], 0))
            out = io.BytesIO()
            canvas.save(out, format="JPEG", quality=88)
            pair = out.getvalue()
    except OSError:
        pair = None
    return buf.getvalue(), pair


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
    except Exception as exc:  # a report lists what it can
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
    textured_dir = require(ctx, TEXTURED_MESH).parent
    timer = Timer()
    formats = [f for f in dict.fromkeys(ctx.spec.formats)]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise PermanentError(
            f"unknown export format(s) {', '.join(unknown)}", hint=", ".join(FORMATS)
        )
    mesh = load_coloured_mesh(coloured)
    tex = Textured(textured_dir)
    # the files are written upright; the preview below renders from the photos' own frame
    rotation = upright_rotation(ctx.workspace)
    to_upright = np.eye(4)
    to_upright[:3, :3] = rotation
    upright_tex = tex.rotated(rotation)
    upright_mesh = mesh.copy()
    upright_mesh.apply_transform(to_upright)
    ctx.results_dir.mkdir(parents=True, exist_ok=True)
    exports: list[Export] = []
    extra: list[Path] = []
    steps = len(formats) + 2
    for k, fmt in enumerate(formats):
        ctx.check_cancelled()
        ctx.progress(k / steps, f"writing {fmt}")
        path = mesh_name(ctx, fmt)
        if fmt == "glb":
            data = glb_with_unlit(
                bytes(
                    trimesh.exchange.gltf.export_glb(upright_tex.trimesh(), include_normals=False)
                )
            )
        elif fmt == "obj":
            # the image and the material first, so the OBJ never names a missing file
            obj, mtl = encode_obj(upright_tex, path.stem)
            for companion, content in ((".jpg", tex.jpeg), (".mtl", mtl)):
                publish_bytes(path.with_suffix(companion), content)
                extra.append(path.with_suffix(companion))
            data = obj
        else:
            data = encode(upright_mesh, fmt)
        publish_bytes(path, data)
        exports.append(Export.of_bytes(path, fmt, data))
    ctx.check_cancelled()
    ctx.progress(len(formats) / steps, "rendering preview")
    preview = ctx.results_dir / f"{ctx.spec.job_id}_preview.png"
    rendered = render_textured_preview(ctx, tex)
    png = render_preview(ctx, mesh) if rendered is None else rendered[0]
    publish_bytes(preview, png)
    if rendered is not None and rendered[1] is not None:
        pair = ctx.results_dir / f"{ctx.spec.job_id}_preview_pair.jpg"
        publish_bytes(pair, rendered[1])
        extra.append(pair)
    exports.append(Export.of_bytes(preview, "png", png))
    report_path = ctx.results_dir / f"{ctx.spec.job_id}_report.json"
    report = build_report(ctx, mesh, exports)
    report["texture"] = {
        "size": list(tex.texture.shape[1::-1]),
        "vertices": len(tex.vertices),
        "faces": len(tex.faces),
    }
    report["companion_files"] = [p.name for p in extra]
    # exported point = rotation @ reconstruction point (the photos' cameras are in the latter)
    report["upright_rotation"] = np.round(rotation, 9).tolist()
    report["timings_s"][STAGE] = timer.seconds
    report_json = (json.dumps(report, indent=1) + "\n").encode()
    publish_bytes(report_path, report_json)
    exports.append(Export.of_bytes(report_path, "json", report_json))
    metrics: dict[str, Any] = {
        "formats": formats,
        "files": [e.path.name for e in exports] + [p.name for p in extra],
        "vertices": len(mesh.vertices),
        "faces": len(mesh.faces),
        "texture_size": list(tex.texture.shape[1::-1]),
        "seconds": timer.seconds,
    }
    device = str(report.get("device") or "cpu")
    with building(ctx, STAGE) as out:
        result = record(out, StageResult(metrics=metrics, device=device))
    result.exports = exports
    ctx.progress(1.0, f"exported {', '.join(formats)}")
    return result
