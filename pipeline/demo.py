"""A synthetic scene with known geometry and cameras, rendered on the CPU.

`render_scene(out)` writes:

- `out/images/view_000.jpg ...`: JPEG photos with EXIF Make/Model, FocalLength and
  FocalLengthIn35mmFilm, as a camera would write them;
- `out/ground_truth/mesh.ply`: the whole scene (object and ground) with vertex colours;
- `out/ground_truth/object.ply`: the object alone (what a reconstruction should recover);
- `out/ground_truth/cameras.json`: intrinsics and, per image, the world-to-camera pose in
  COLMAP's convention (x_cam = R @ x_world + t, camera looks along +z, y down, pixel
  centres at half-integers), plus the camera centre.

The object is a bumpy, twisted blob with a torus and a box beside it on a square ground
plate; everything carries a solid (3D) procedural texture of coloured noise and spots at
several scales, so SIFT finds many distinct features. Rendering uses open3d's
RaycastingScene (no display needed): the colour of a pixel comes from the hit triangle and
its barycentric coordinates, shaded with a Lambert term.

That default ("easy") scene is a smoke test. The VARIANTS make it harder one property at a
time: radial distortion, no EXIF, exposure and white balance changing between photos,
specular highlights, motion blur, an uneven partly hand-held path, a short arc on one
side, a turntable before a backdrop that stands still, photographs (from Debian's
visp-images-data) instead of the procedural texture. "hard" has all of them but the arc
and the turntable at 1600x1200, where a view gives 10,000+ SIFT keypoints as real photos
do; it is the benchmark scene. cameras.json records the variant and, under "params", the
true SIMPLE_RADIAL intrinsics (f, cx, cy, k1), whether or not the photos carry them in
EXIF.

    python -m pipeline.demo OUT [--images N] [--variant easy] [--size WxH] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import open3d as o3d
from PIL import Image
from scipy.ndimage import map_coordinates

__all__ = ["IMAGE_SET", "VARIANTS", "Variant", "render_scene", "variant"]

MAKE = "dropmesh"
MODEL = "synthetic camera"
SENSOR_WIDTH_MM = 6.4  # sensor width of the virtual camera (longest image side)

RING_RADIUS = 4.2  # camera distance from the object's axis
OBJECT_CENTRE = np.array([0.0, 0.0, 0.55])
GROUND_HALF = 2.4  # the ground plate spans [-GROUND_HALF, GROUND_HALF]^2 at z = 0


# ---------------------------------------------------------------- geometry


def _icosphere(subdivisions: int) -> tuple[np.ndarray, np.ndarray]:
    mesh = o3d.geometry.TriangleMesh.create_icosahedron(radius=1.0)
    mesh = mesh.subdivide_loop(number_of_iterations=subdivisions)
    v = np.asarray(mesh.vertices, dtype=np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v, np.asarray(mesh.triangles, dtype=np.int32)


def _blob(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A closed, bumpy, twisted shape about 1.4 wide and 1.1 tall."""
    v, f = _icosphere(5)
    x, y, z = v.T
    theta = np.arctan2(y, x)
    phi = np.arccos(np.clip(z, -1.0, 1.0))
    bumps = np.zeros(len(v))
    for _ in range(6):
        a, b = rng.integers(2, 6, size=2)
        ph1, ph2 = rng.uniform(0, 2 * np.pi, size=2)
        bumps += rng.uniform(0.03, 0.07) * np.sin(a * theta + ph1) * np.sin(b * phi + ph2)
    r = 1.0 + bumps
    v = v * r[:, None] * np.array([0.7, 0.55, 0.55])
    # twist about the vertical axis
    ang = 1.2 * v[:, 2]
    c, s = np.cos(ang), np.sin(ang)
    v = np.stack([c * v[:, 0] - s * v[:, 1], s * v[:, 0] + c * v[:, 1], v[:, 2]], axis=1)
    v += OBJECT_CENTRE + np.array([0.0, 0.0, 0.02])
    return v, f


def _torus() -> tuple[np.ndarray, np.ndarray]:
    mesh = o3d.geometry.TriangleMesh.create_torus(
        torus_radius=0.38, tube_radius=0.13, radial_resolution=60, tubular_resolution=30
    )
    v = np.asarray(mesh.vertices, dtype=np.float64)
    # stand it up, tilted, to the side of the blob
    a = np.deg2rad(70.0)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    v = v @ rot.T + np.array([0.95, 0.75, 0.48])
    return v, np.asarray(mesh.triangles, dtype=np.int32)


def _box() -> tuple[np.ndarray, np.ndarray]:
    mesh = o3d.geometry.TriangleMesh.create_box(width=0.5, height=0.4, depth=0.6)
    v = np.asarray(mesh.vertices, dtype=np.float64) - np.array([0.25, 0.2, 0.0])
    a = np.deg2rad(25.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    v = v @ rot.T + np.array([-0.9, -0.7, 0.0])
    return v, np.asarray(mesh.triangles, dtype=np.int32)


def _ground() -> tuple[np.ndarray, np.ndarray]:
    h = GROUND_HALF
    v = np.array([[-h, -h, 0.0], [h, -h, 0.0], [h, h, 0.0], [-h, h, 0.0]])
    f = np.array([[0, 1, 2], [0, 2, 3]], dtype=np.int32)
    return v, f


def _merge(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    verts, faces, offset = [], [], 0
    for v, f in parts:
        verts.append(v)
        faces.append(f + offset)
        offset += len(v)
    return np.concatenate(verts), np.concatenate(faces).astype(np.int32)


def _vertex_normals(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    n = np.zeros_like(v)
    for k in range(3):
        np.add.at(n, f[:, k], fn)
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------- texture


def _hash(ix: np.ndarray, iy: np.ndarray, iz: np.ndarray, salt: int) -> np.ndarray:
    """A 32-bit integer hash of lattice coordinates (vectorised)."""
    h = (
        ix.astype(np.uint32) * np.uint32(0x8DA6B343)
        ^ iy.astype(np.uint32) * np.uint32(0xD8163841)
        ^ iz.astype(np.uint32) * np.uint32(0xCB1AB31F)
        ^ np.uint32(salt * 0x9E3779B1 & 0xFFFFFFFF)
    )
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x7FEB352D)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x846CA68B)
    h ^= h >> np.uint32(16)
    return h


# The solid texture is defined on integer lattices over this box (it holds the whole scene).
_TEX_LO = np.array([-GROUND_HALF - 0.1, -GROUND_HALF - 0.1, -0.1])
_TEX_HI = np.array([GROUND_HALF + 0.1, GROUND_HALF + 0.1, 1.6])
_lattices: dict[tuple[float, int], np.ndarray] = {}


def _lattice(freq: float, salt: int) -> np.ndarray:
    """Random RGB values on the integer points of the scaled texture box, (3, nx, ny, nz)."""
    key = (freq, salt)
    if key not in _lattices:
        n = np.ceil((_TEX_HI - _TEX_LO) * freq).astype(int) + 2
        ix, iy, iz = np.meshgrid(*(np.arange(k) for k in n), indexing="ij")
        h = _hash(ix, iy, iz, salt)
        rgb = np.stack([(h >> np.uint32(s)) & np.uint32(0xFF) for s in (0, 8, 16)])
        _lattices[key] = rgb.astype(np.float32) / 255.0
    return _lattices[key]


def _value_noise3(p: np.ndarray, freq: float, salt: int, channels: int = 3) -> np.ndarray:
    """Value noise in [0, 1] (trilinear between lattice values), shape (n, channels)."""
    lattice = _lattice(freq, salt)
    q = ((np.clip(p, _TEX_LO, _TEX_HI) - _TEX_LO) * freq).T.astype(np.float32)
    return np.stack(
        [map_coordinates(lattice[c], q, order=1, mode="nearest") for c in range(channels)],
        axis=1,
    )


_COLOUR_OCTAVES = ((1.5, 1.0), (4.0, 0.8), (10.0, 0.7), (22.0, 0.5))  # (frequency, weight)
_SPOTS = ((7.0, 0.68), (16.0, 0.7))  # (frequency, threshold)
_colour_lattices: dict[int, np.ndarray] = {}


def _colour_lattice(seed: int) -> np.ndarray:
    """The base colour (all octaves summed, contrast stretched) baked onto the lattice of
    the finest octave, so that rendering needs one interpolation instead of four."""
    if seed not in _colour_lattices:
        fine = _COLOUR_OCTAVES[-1][0]
        shape = _lattice(fine, seed * 31 + len(_COLOUR_OCTAVES) - 1).shape[1:]
        grid = np.stack(np.meshgrid(*(np.arange(k) for k in shape), indexing="ij"), axis=-1)
        points = grid.reshape(-1, 3) / fine + _TEX_LO
        colour = np.zeros((len(points), 3), dtype=np.float32)
        for k, (freq, weight) in enumerate(_COLOUR_OCTAVES):
            colour += weight * _value_noise3(points, freq, seed * 31 + k)
        colour /= sum(w for _, w in _COLOUR_OCTAVES)
        # stretch contrast: noise sums concentrate around 0.5
        colour = np.clip(0.5 + 2.4 * (colour - 0.5), 0.0, 1.0)
        _colour_lattices[seed] = np.ascontiguousarray(colour.T.reshape(3, *shape))
    return _colour_lattices[seed]


def _albedo(p: np.ndarray, material: np.ndarray, seed: int) -> np.ndarray:
    """Solid texture: colourful multi-scale noise plus dark and bright spots.

    material 0 is the ground, 1 the object; they get different palettes."""
    lattice = _colour_lattice(seed)
    fine = _COLOUR_OCTAVES[-1][0]
    q = ((np.clip(p, _TEX_LO, _TEX_HI) - _TEX_LO) * fine).T.astype(np.float32)
    colour = np.stack(
        [map_coordinates(lattice[c], q, order=1, mode="nearest") for c in range(3)], axis=1
    )
    # spots at two scales with sharp edges: good blobs for SIFT
    for k, (freq, lo) in enumerate(_SPOTS):
        n = _value_noise3(p, freq, seed * 31 + 10 + k, channels=2)
        dark = np.clip((n[:, 0] - lo) * 25.0, 0.0, 1.0)
        bright = np.clip((n[:, 1] - lo) * 25.0, 0.0, 1.0)
        colour *= 1.0 - 0.85 * dark[:, None]
        colour += (1.0 - colour) * (0.8 * bright[:, None])
    ground = material == 0
    # the ground is earthier, the object more saturated
    colour[ground] = 0.25 + 0.6 * colour[ground] * np.array([1.0, 0.85, 0.7], dtype=np.float32)
    return np.clip(colour, 0.0, 1.0).astype(np.float64)


# ---------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """How a demo scene departs from the easy one (an ideal camera on an even ring)."""

    name: str
    size: tuple[int, int] = (640, 480)
    distortion: float = 0.0  # k1 of COLMAP's SIMPLE_RADIAL model (negative: barrel)
    exif: bool = True  # write Make, Model and the focal length into each photo
    exposure: bool = False  # exposure and white balance change from photo to photo
    specular: bool = False  # a glossy object: view-dependent highlights
    motion_blur: bool = False  # a short linear blur in a random direction per photo
    # "ring": an even ring round the object; "handheld": an uneven walk round it (gaps,
    # height changes, roll, a hand-held stretch); "arc": a short hand-held arc on one side
    path: str = "ring"
    # a backdrop that stands still where the scene leaves the view: the object turns on a
    # turntable (the ground plate) before a fixed camera and a textured wall
    backdrop: bool = False
    photo_texture: bool = False  # photographs (IMAGE_SET) mapped onto the scene

    def describe(self) -> str:
        parts = [f"{self.size[0]}x{self.size[1]}"]
        if self.distortion:
            parts.append(f"radial distortion k1 = {self.distortion}")
        if not self.exif:
            parts.append("no EXIF")
        for flag, text in (
            (self.exposure, "exposure and white balance vary"),
            (self.specular, "specular highlights"),
            (self.motion_blur, "motion blur"),
            (self.path == "handheld", "uneven hand-held path"),
            (self.path == "arc", "a short arc on one side (a fifth of the distance)"),
            (self.backdrop, "a turntable before a still backdrop"),
            (self.photo_texture, "photographic textures"),
        ):
            if flag:
                parts.append(text)
        return ", ".join(parts)


_HARD = Variant(
    "hard",
    size=(1600, 1200),
    distortion=-0.08,
    exif=False,
    exposure=True,
    specular=True,
    motion_blur=True,
    path="handheld",
    photo_texture=True,
)
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("easy"),
        Variant("distortion", distortion=-0.08),
        Variant("no-exif", exif=False),
        Variant("exposure", exposure=True),
        Variant("specular", specular=True),
        Variant("blur", motion_blur=True),
        Variant("handheld", path="handheld"),
        Variant("arc", path="arc"),
        Variant("turntable", backdrop=True),
        Variant("photo", size=(1600, 1200), photo_texture=True),
        _HARD,
    )
}


def variant(name: str) -> Variant:
    """The named variant; a clear error lists the known ones."""
    return _named_variant(name)


def _named_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown demo variant {name!r}; choose one of {', '.join(VARIANTS)}"
        ) from None


# Debian's visp-images-data (GPL-2, data only): real photographs and a painting, used as
# textures by the photo variants. They are read at render time and never copied into the
# repository.
IMAGE_SET = Path("/usr/share/visp-images-data/ViSP-images")
# Every surface shows its own photograph, stretched once over it and never tiled: a tiled
# or mirrored photo repeats its features, and a photo mirrored on both axes is its own
# 180-degree rotation, which folds a ring of cameras onto itself. The ground gets the
# Solvay group photograph above a strip of frames of the "castel" sequence; each object
# part gets one photo per projection axis (grey frames tinted, so parts differ in colour).
_GROUND_PHOTO = "Solvay/Solvay_conference_1927_Version2_2126x1463.png"
_GROUND_SIZE = 2800  # px of the ground's collage (about 580 px per unit of the plate)
_GROUND_FRAMES = tuple(f"mbt-depth/castel/castel/image_{i:04d}.pgm" for i in range(0, 30, 3)) + (
    "mbt-depth/castel/chateau.ppm",
)
# per object part (blob, torus, box): (photo, tint) for the x, y and z projections
_PART_PHOTOS = (
    (
        ("mbt/cube/image0001.pgm", (1.0, 0.8, 0.55)),
        ("Klimt/Klimt.ppm", (1.0, 1.0, 1.0)),
        ("mbt/cube/image0060.pgm", (0.9, 0.75, 1.0)),
    ),
    (
        ("mbt/cube/image0120.pgm", (0.6, 0.8, 1.0)),
        ("cube/image.0020.pgm", (0.7, 1.0, 0.7)),
        ("mbt/cube/image0180.pgm", (1.0, 0.7, 0.8)),
    ),
    (
        ("cube/image.0000.pgm", (1.0, 0.9, 0.6)),
        ("mbt/cube/image0210.pgm", (0.8, 0.8, 1.0)),
        ("cube/image.0060.pgm", (0.7, 1.0, 0.9)),
    ),
)


def _read_photo(rel: str) -> Image.Image:
    path = IMAGE_SET / rel
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the photo-textured demo variants need Debian's "
            "visp-images-data (apt-get install visp-images-data; make test installs it)"
        )
    with Image.open(path) as im:
        return im.convert("RGB")


@lru_cache(maxsize=16)
def _photo(rel: str, tint: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """A photo as (3, h, w) floats in [0, 1], tinted; rel "ground" is the ground's collage."""
    if rel == "ground":
        # the group photograph in one corner; frames of the castel sequence fill the
        # right-hand column and two rows below it, each frame used once
        size = _GROUND_SIZE
        top = _read_photo(_GROUND_PHOTO)
        canvas = Image.new("RGB", (size, size))
        canvas.paste(top, (0, 0))
        frames = iter(_read_photo(f) for f in _GROUND_FRAMES)
        col_w = size - top.width
        y = 0
        while y < top.height:
            im = next(frames)
            im = im.resize((col_w, round(im.height * col_w / im.width)), Image.Resampling.BICUBIC)
            canvas.paste(im, (top.width, y))
            y += im.height
        row_h = (size - top.height + 1) // 2
        for row in range(2):
            x = 0
            while x < size:
                im = next(frames)
                im = im.resize(
                    (round(im.width * row_h / im.height), row_h), Image.Resampling.BICUBIC
                )
                canvas.paste(im, (x, top.height + row * row_h))
                x += im.width
        img = canvas
    else:
        img = _read_photo(rel)
    rgb = np.asarray(img, dtype=np.float32) / 255.0 * np.asarray(tint, np.float32)
    return np.ascontiguousarray(np.clip(rgb, 0, 1).transpose(2, 0, 1))


def _sample_photo(
    photo: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    lo: tuple[float, float],
    hi: tuple[float, float],
) -> np.ndarray:
    """Bilinear colour of a photo stretched once over the rectangle lo..hi of a plane
    (a along the photo's width, b along its height), at plane coordinates a, b."""
    h, w = photo.shape[1:]
    col = (a - lo[0]) / max(hi[0] - lo[0], 1e-9) * (w - 1)
    row = (hi[1] - b) / max(hi[1] - lo[1], 1e-9) * (h - 1)
    q = np.stack([row, col]).astype(np.float32)
    return np.stack(
        [map_coordinates(photo[c], q, order=1, mode="nearest") for c in range(3)], axis=1
    )


def _photo_albedo(
    p: np.ndarray, n: np.ndarray, part: np.ndarray, boxes: list[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """Photographs projected onto each part: planar from above for the ground, triplanar
    (blended by the normal) for the objects, one photo per part and axis. `boxes` holds
    each part's bounding box (lo, hi)."""
    colour = np.zeros((len(p), 3), dtype=np.float64)
    ground = part == 0
    if ground.any():
        lo, hi = boxes[0]
        colour[ground] = _sample_photo(
            _photo("ground"), p[ground, 0], p[ground, 1], (lo[0], lo[1]), (hi[0], hi[1])
        )
    for k, photos in enumerate(_PART_PHOTOS, start=1):
        sel = part == k
        if not sel.any():
            continue
        lo, hi = boxes[k]
        q = p[sel]
        w = np.abs(n[sel]) ** 4
        w /= np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
        acc = np.zeros((len(q), 3))
        for axis, (rel, tint) in enumerate(photos):
            u, v = [i for i in range(3) if i != axis]
            # the vertical axis runs up the photo; otherwise the first remaining axis
            a, b = (u, v) if v == 2 or axis == 2 else (v, u)
            sample = _sample_photo(
                _photo(rel, tint), q[:, a], q[:, b], (lo[a], lo[b]), (hi[a], hi[b])
            )
            acc += w[:, axis : axis + 1] * sample
        colour[sel] = acc
    return np.clip(colour, 0.0, 1.0)


# ---------------------------------------------------------------- cameras


def _look_at(centre: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera R, t (COLMAP convention: +z forward, +y down)."""
    fwd = target - centre
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, np.array([0.0, 0.0, 1.0]))
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    rot = np.stack([right, down, fwd])
    return rot, -rot @ centre


def _camera_ring(n: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    poses = []
    for i in range(n):
        az = 2 * np.pi * i / n + rng.uniform(-0.05, 0.05)
        elev = np.deg2rad(28.0 + 10.0 * (i % 2) + rng.uniform(-2, 2))
        r = RING_RADIUS * rng.uniform(0.95, 1.05)
        centre = np.array(
            [r * np.cos(elev) * np.cos(az), r * np.cos(elev) * np.sin(az), r * np.sin(elev)]
        ) + np.array([0.0, 0.0, 0.3])
        target = OBJECT_CENTRE + rng.uniform(-0.08, 0.08, size=3)
        poses.append(_look_at(centre, target))
    return poses


def _camera_path(n: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """An uneven, partly hand-held walk around the object: unequal steps (some gaps twice
    the mean), height drifting between low and high views, distance changing, the camera
    rolled a little and not always aimed at the centre; the last third shakes more."""
    steps = rng.uniform(0.45, 1.6, size=n)
    az0 = rng.uniform(0, 2 * np.pi)
    azimuths = az0 + np.cumsum(steps) / steps.sum() * 2 * np.pi * 0.96
    elev = np.deg2rad(30.0)
    poses = []
    for i, az in enumerate(azimuths):
        shaky = i >= 2 * n // 3
        elev = float(np.clip(elev + np.deg2rad(rng.normal(0, 6.0)), np.deg2rad(16), np.deg2rad(52)))
        r = RING_RADIUS * rng.uniform(0.85, 1.15)
        centre = np.array(
            [r * np.cos(elev) * np.cos(az), r * np.cos(elev) * np.sin(az), r * np.sin(elev)]
        ) + np.array([0.0, 0.0, 0.3])
        if shaky:
            centre += rng.normal(0, 0.08, size=3)
        target = OBJECT_CENTRE + rng.uniform(-0.2, 0.2, size=3) * (1.5 if shaky else 1.0)
        rot, _ = _look_at(centre, target)
        roll = np.deg2rad(rng.normal(0, 6.0 if shaky else 3.0))
        c, s = np.cos(roll), np.sin(roll)
        rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ rot
        poses.append((rot, -rot @ centre))
    return poses


ARC_SPAN = 0.2  # radians: how far the "arc" path moves, as a share of its distance


def _camera_arc(n: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """A short hand-held arc on one side of the object, as a video taken standing in one
    place gives: the camera moves right and up by ARC_SPAN of its distance in all, at an
    uneven pace, shaking a little and kept roughly on the object."""
    steps = rng.uniform(0.3, 1.7, size=n)
    along = np.concatenate([[0.0], np.cumsum(steps[1:])]) / steps[1:].sum()
    poses = []
    for t in along:
        az = ARC_SPAN * 0.8 * t
        elev = np.deg2rad(26.0) + ARC_SPAN * 0.6 * t
        r = RING_RADIUS * (1.0 + rng.normal(0, 0.01))
        centre = np.array(
            [r * np.cos(elev) * np.cos(az), r * np.cos(elev) * np.sin(az), r * np.sin(elev)]
        ) + np.array([0.0, 0.0, 0.3])
        rot, _ = _look_at(centre, OBJECT_CENTRE + rng.uniform(-0.1, 0.1, size=3))
        roll = np.deg2rad(rng.normal(0, 1.5))
        c, s = np.cos(roll), np.sin(roll)
        rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ rot
        poses.append((rot, -rot @ centre))
    return poses


PATHS = {"ring": _camera_ring, "handheld": _camera_path, "arc": _camera_arc}


# ---------------------------------------------------------------- output


def _write_ply(path: Path, v: np.ndarray, f: np.ndarray, colours: np.ndarray) -> None:
    mesh = o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector(v), o3d.utility.Vector3iVector(f.astype(np.int32))
    )
    mesh.vertex_colors = o3d.utility.Vector3dVector(colours)
    mesh.compute_vertex_normals()
    tmp = path.with_name(path.stem + ".tmp.ply")
    if not o3d.io.write_triangle_mesh(tmp, mesh, write_ascii=False):
        raise OSError(f"could not write {path}")
    tmp.replace(path)


def _exif(focal_px: float, longest_side: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = MAKE  # Make
    exif[0x0110] = MODEL  # Model
    sub = exif.get_ifd(0x8769)  # Exif sub-IFD
    sub[0x920A] = round(focal_px * SENSOR_WIDTH_MM / longest_side, 3)  # FocalLength, mm
    sub[0xA405] = round(focal_px * 36.0 / longest_side)  # FocalLengthIn35mmFilm
    # FocalPlaneXResolution / YResolution in pixels per cm (unit 3): the exact focal in px
    sub[0xA20E] = round(longest_side / (SENSOR_WIDTH_MM / 10.0), 3)
    sub[0xA20F] = round(longest_side / (SENSOR_WIDTH_MM / 10.0), 3)
    sub[0xA210] = 3
    return exif


def _undistort_normalised(
    xd: np.ndarray, yd: np.ndarray, k1: float
) -> tuple[np.ndarray, np.ndarray]:
    """Invert x_d = x_u (1 + k1 r_u^2) by fixed-point iteration (converges for small k1)."""
    xu, yu = xd.copy(), yd.copy()
    for _ in range(20):
        factor = 1.0 + k1 * (xu * xu + yu * yu)
        xu, yu = xd / factor, yd / factor
    return xu, yu


def _motion_blur(img: np.ndarray, length: float, angle: float) -> np.ndarray:
    import cv2

    size = int(np.ceil(length)) | 1
    kernel = np.zeros((size, size), np.float32)
    c = size // 2
    for s in np.linspace(-length / 2, length / 2, 4 * size):
        x, y = c + s * np.cos(angle), c + s * np.sin(angle)
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        fx, fy = x - x0, y - y0
        for dx, dy, w in (
            (0, 0, (1 - fx) * (1 - fy)),
            (1, 0, fx * (1 - fy)),
            (0, 1, (1 - fx) * fy),
            (1, 1, fx * fy),
        ):
            if 0 <= x0 + dx < size and 0 <= y0 + dy < size:
                kernel[y0 + dy, x0 + dx] += w
    kernel /= kernel.sum()
    out: np.ndarray = cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT)
    return out


def render_scene(
    out: Path,
    n_images: int = 24,
    size: tuple[int, int] | None = None,
    seed: int = 0,
    variant: str | Variant = "easy",
) -> dict[str, Any]:
    """Render the demo scene into `out` and return what cameras.json holds.

    `variant` names one of VARIANTS (or is a Variant); `size` overrides its image size."""
    if n_images < 1:
        raise ValueError("n_images must be at least 1")
    var = _named_variant(variant) if isinstance(variant, str) else variant
    if size is not None:
        var = replace(var, size=(int(size[0]), int(size[1])))
    out = Path(out)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    # the variants' own randomness: the easy scene stays what it always was
    vrng = np.random.default_rng([seed, 7])
    width, height = var.size

    parts = [_ground(), _blob(rng), _torus(), _box()]
    material = np.concatenate(
        [np.full(len(f), 0 if k == 0 else 1, dtype=np.int8) for k, (_, f) in enumerate(parts)]
    )
    part_of_face = np.concatenate(
        [np.full(len(f), k, dtype=np.int8) for k, (_, f) in enumerate(parts)]
    )
    verts, faces = _merge(parts)
    obj_verts, obj_faces = _merge(parts[1:])
    boxes = [(v.min(axis=0), v.max(axis=0)) for v, _ in parts]
    normals = _vertex_normals(verts, faces)
    # flat shading for the ground and the box (their vertices are shared by sharp edges)
    face_normals = np.cross(
        verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]]
    )
    face_normals /= np.maximum(np.linalg.norm(face_normals, axis=1, keepdims=True), 1e-12)
    n_box_faces = len(parts[3][1])
    flat = np.zeros(len(faces), dtype=bool)
    flat[: len(parts[0][1])] = True
    flat[len(faces) - n_box_faces :] = True

    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(
        o3d.core.Tensor.from_numpy(verts.astype(np.float32)),
        o3d.core.Tensor.from_numpy(faces.astype(np.uint32)),
    )

    focal = 1.1 * max(width, height)
    cx, cy = width / 2.0, height / 2.0
    K = np.array([[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]])
    light = np.array([0.45, -0.35, 0.82])
    light /= np.linalg.norm(light)

    # pixel rays in camera coordinates (pixel centres at half-integers); with radial
    # distortion a pixel sees along its undistorted direction
    us, vs = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    xn, yn = (us - cx) / focal, (vs - cy) / focal
    if var.distortion:
        xn, yn = _undistort_normalised(xn, yn, var.distortion)
    dirs_cam = np.stack([xn, yn, np.ones_like(us)], axis=-1)
    dirs_cam = dirs_cam.reshape(-1, 3)
    dirs_cam /= np.linalg.norm(dirs_cam, axis=1, keepdims=True)
    sky_top, sky_bottom = np.array([0.55, 0.68, 0.85]), np.array([0.85, 0.88, 0.9])
    sky = sky_bottom + (sky_top - sky_bottom) * np.linspace(1.0, 0.0, height)[:, None]
    sky = np.repeat(sky[:, None, :], width, axis=1).reshape(-1, 3)
    if var.backdrop:
        # the object's kind of texture, painted on a wall that moves with the camera
        wall = np.stack(
            [(us / width - 0.5) * 4.8, (vs / height - 0.5) * 3.6, np.full_like(us, 0.8)]
        )
        sky = _albedo(wall.reshape(3, -1).T, np.ones(us.size, dtype=np.int8), seed + 1)

    images_dir = out / "images"
    gt_dir = out / "ground_truth"
    images_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    exif = _exif(focal, max(width, height)) if var.exif else None
    poses = PATHS[var.path](n_images, vrng if var.path != "ring" else rng)

    cameras: dict[str, Any] = {}
    for i, (rot, t) in enumerate(poses):
        centre = -rot.T @ t
        dirs = dirs_cam @ rot  # rows: R^T d
        rays = np.concatenate([np.broadcast_to(centre, dirs.shape), dirs], axis=1)
        hit = scene.cast_rays(o3d.core.Tensor.from_numpy(rays.astype(np.float32)))
        prim = hit["primitive_ids"].numpy().astype(np.int64)
        ok = np.isfinite(hit["t_hit"].numpy())
        uv = hit["primitive_uvs"].numpy()[ok].astype(np.float64)
        tri = faces[prim[ok]]
        b0 = 1.0 - uv[:, 0] - uv[:, 1]
        p = (
            b0[:, None] * verts[tri[:, 0]]
            + uv[:, :1] * verts[tri[:, 1]]
            + uv[:, 1:] * verts[tri[:, 2]]
        )
        n = (
            b0[:, None] * normals[tri[:, 0]]
            + uv[:, :1] * normals[tri[:, 1]]
            + uv[:, 1:] * normals[tri[:, 2]]
        )
        is_flat = flat[prim[ok]]
        n[is_flat] = face_normals[prim[ok][is_flat]]
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
        # face the viewer (the ground plate is seen from above only, but be safe)
        facing = np.einsum("ij,ij->i", n, dirs[ok]) > 0
        n[facing] *= -1.0
        if var.photo_texture:
            albedo = _photo_albedo(p, n, part_of_face[prim[ok]], boxes)
        else:
            albedo = _albedo(p, material[prim[ok]], seed)
        lambert = np.clip(n @ light, 0.0, 1.0)
        shade = 0.35 + 0.65 * lambert
        rgb = sky.copy()
        lit = albedo * shade[:, None]
        if var.specular:
            # Blinn-Phong highlights on the objects (the ground stays matte)
            half = light[None, :] - dirs[ok]
            half /= np.linalg.norm(half, axis=1, keepdims=True)
            spec = np.clip(np.einsum("ij,ij->i", n, half), 0.0, 1.0) ** 60
            lit += (0.7 * spec * (material[prim[ok]] == 1))[:, None]
        rgb[ok] = lit
        if var.exposure:
            gain = float(np.exp(vrng.normal(0.0, 0.2)))
            balance = np.exp(vrng.normal(0.0, 0.07, size=3))
            rgb = rgb * gain * balance
        img_f = np.clip(rgb, 0.0, 1.0).reshape(height, width, 3)
        if var.motion_blur:
            length = vrng.uniform(1.5, 3.5)  # pixels, at any image size
            img_f = _motion_blur(img_f.astype(np.float32), length, vrng.uniform(0, np.pi))
        img_f = img_f + rng.normal(0.0, 0.006, size=img_f.shape)  # a little sensor noise
        img = (np.clip(img_f, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        name = f"view_{i:03d}.jpg"
        tmp = images_dir / f".{name}.tmp"
        if exif is None:
            Image.fromarray(img).save(tmp, format="JPEG", quality=93)
        else:
            Image.fromarray(img).save(tmp, format="JPEG", quality=93, exif=exif)
        tmp.replace(images_dir / name)
        cameras[name] = {
            "R": rot.tolist(),
            "t": t.tolist(),
            "centre": centre.tolist(),
        }

    n_ground = len(parts[0][0])
    vert_material = np.ones(len(verts), dtype=np.int8)
    vert_material[:n_ground] = 0
    if var.photo_texture:
        vert_part = np.concatenate([np.full(len(v), k, np.int8) for k, (v, _) in enumerate(parts)])
        all_colours = _photo_albedo(verts, normals, vert_part, boxes)
        obj_colours = all_colours[n_ground:]
    else:
        obj_colours = _albedo(obj_verts, np.ones(len(obj_verts), dtype=np.int8), seed)
        all_colours = _albedo(verts, vert_material, seed)
    _write_ply(gt_dir / "mesh.ply", verts, faces, all_colours)
    _write_ply(gt_dir / "object.ply", obj_verts, obj_faces, obj_colours)

    centres = np.array([c["centre"] for c in cameras.values()])
    lo = np.minimum(obj_verts.min(axis=0), centres.min(axis=0))
    hi = np.maximum(obj_verts.max(axis=0), centres.max(axis=0))
    info: dict[str, Any] = {
        "model": "SIMPLE_RADIAL" if var.distortion else "PINHOLE",
        "width": width,
        "height": height,
        "K": K.tolist(),
        "focal_px": focal,
        # COLMAP SIMPLE_RADIAL parameters f, cx, cy, k1 (k1 = 0 for a pinhole)
        "params": [focal, cx, cy, var.distortion],
        "exif": var.exif,
        "make": MAKE,
        "camera_model": MODEL,
        "variant": {**asdict(var), "size": list(var.size), "description": var.describe()},
        "object_bbox": [obj_verts.min(axis=0).tolist(), obj_verts.max(axis=0).tolist()],
        "ground_bbox": [[-GROUND_HALF, -GROUND_HALF, 0.0], [GROUND_HALF, GROUND_HALF, 0.0]],
        # diagonal of the box around the object and all camera centres
        "scene_size": float(np.linalg.norm(hi - lo)),
        "convention": "x_cam = R @ x_world + t; +z forward, +y down; centre = -R^T t",
        "seed": seed,
        "images": cameras,
        "render_seconds": round(time.perf_counter() - t0, 3),
    }
    tmp_json = gt_dir / ".cameras.json.tmp"
    tmp_json.write_text(json.dumps(info, indent=1))
    tmp_json.replace(gt_dir / "cameras.json")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.demo",
        description="Render the synthetic demo scene (photos with EXIF plus ground truth).",
    )
    parser.add_argument("out", type=Path, help="output folder (images/ and ground_truth/)")
    parser.add_argument("--images", type=int, default=24, help="number of photos (default 24)")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the variant's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--variant", default="easy", choices=list(VARIANTS), help="scene variant (default easy)"
    )
    args = parser.parse_args(argv)
    size = None
    if args.size:
        try:
            w, h = (int(x) for x in args.size.lower().split("x"))
        except ValueError:
            parser.error(f"--size must be WIDTHxHEIGHT, not {args.size!r}")
        size = (w, h)
    info = render_scene(
        args.out, n_images=args.images, size=size, seed=args.seed, variant=args.variant
    )
    w, h = info["width"], info["height"]
    print(
        f"rendered {len(info['images'])} {args.variant} images of {w}x{h} into "
        f"{args.out / 'images'} "
        f"in {info['render_seconds']:.1f} s; ground truth in {args.out / 'ground_truth'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
