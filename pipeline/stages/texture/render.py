"""Reading a published texture back and ray-casting a mesh from a camera (the export's
preview, the held-out scores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open3d as o3d
from PIL import Image

from pipeline.stages._common import TEXTURED_MESH
from pipeline.stages.texture.views import bilinear

STAGE = "texture"
MESH = TEXTURED_MESH[-1]
TEXTURE = "texture.png"


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
        out[ok] = bilinear(tex, xy)
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
