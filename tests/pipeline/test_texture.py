"""The texture stage on the rendered demo scene: held-out views score better textured than
vertex-coloured, exports carry the texture the right way up, and bad input fails clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import open3d as o3d
import pytest
import trimesh
from PIL import Image

from pipeline import JobSpec, PermanentError, StageContext, StageResult, run_stage
from pipeline.evaluate import align_to_truth
from pipeline.stages import STAGES
from pipeline.stages import texture as texturing
from pipeline.stages._workspace import record

HELD_OUT = ("view_004.jpg", "view_011.jpg")
MIN_GAIN_DB = 2.0  # textured over vertex-coloured, mean over the held-out views (measured 2.5-3.0)


def _context(workspace: Path, images: Path, **options: Any) -> StageContext:
    spec = JobSpec(
        project="demo",
        images=images,
        quality="low",
        formats=("glb", "obj", "ply"),
        options=options,
        job_id="tx",
    )
    return StageContext(spec=spec, workspace=workspace, results_dir=workspace / "results")


@pytest.fixture(scope="module")
def held_out_job(
    demo_scene: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, StageResult]]:
    """Every stage on the demo scene without the HELD_OUT photos (quality low)."""
    root = tmp_path_factory.mktemp("texture_job")
    images = root / "images"
    images.mkdir()
    for photo in sorted((demo_scene / "images").glob("*.jpg")):
        if photo.name not in HELD_OUT:
            shutil.copy(photo, images / photo.name)
    workspace = root / "ws"
    results = {name: run_stage(name, _context(workspace, images)) for name in STAGES}
    return workspace, results


def test_held_out_views_are_explained_better_by_the_texture(
    held_out_job: tuple[Path, dict[str, StageResult]], demo_scene: Path
) -> None:
    workspace, results = held_out_job
    truth_json = demo_scene / "ground_truth" / "cameras.json"
    truth = json.loads(truth_json.read_text())
    alignment = align_to_truth(workspace / "undistort" / "sparse", truth_json)
    gains = []
    for name in HELD_OUT:
        cam = truth["images"][name]
        with Image.open(demo_scene / "images" / name) as im:
            photo = np.asarray(im.convert("RGB"), np.float64) / 255.0
        scores = texturing.held_out_scores(
            workspace,
            photo,
            np.asarray(truth["K"]),
            np.asarray(cam["R"]),
            np.asarray(cam["t"]),
            alignment.apply,
        )
        print(f"\n{name}: {scores}")
        tex, vc, flat = scores["textured"], scores["vertex_colour"], scores["flat"]
        assert tex["coverage"] >= vc["coverage"] - 0.005 > 0.3
        assert tex["ssim"] > vc["ssim"]
        assert vc["psnr_db"] > flat["psnr_db"]
        gains.append(tex["psnr_db"] - vc["psnr_db"])
    print(f"texture stage: {results['texture'].metrics}")
    assert float(np.mean(gains)) >= MIN_GAIN_DB, gains
    assert results["texture"].metrics["faces_textured"] > 0.95 * results["texture"].metrics["faces"]


def test_exports_load_back_with_their_texture(
    held_out_job: tuple[Path, dict[str, StageResult]],
) -> None:
    workspace, results = held_out_job
    out = workspace / "results"
    glb = trimesh.load(out / "tx_textured_mesh_poisson.glb", force="mesh")
    assert isinstance(glb.visual, trimesh.visual.TextureVisuals)
    assert glb.visual.material.baseColorTexture is not None
    assert isinstance(glb.visual.material.metallicFactor, float)
    assert glb.visual.material.metallicFactor == 0.0
    assert len(glb.faces) == results["meshing"].metrics["faces"]
    doc = _glb_json((out / "tx_textured_mesh_poisson.glb").read_bytes())
    assert doc["images"][0]["mimeType"] == "image/jpeg"
    assert "KHR_materials_unlit" in doc["materials"][0]["extensions"]
    obj = trimesh.load(out / "tx_textured_mesh_poisson.obj", force="mesh")
    assert isinstance(obj.visual, trimesh.visual.TextureVisuals)
    assert obj.visual.material.image is not None
    assert (out / "tx_textured_mesh_poisson.mtl").is_file()
    assert (out / "tx_textured_mesh_poisson.jpg").is_file()
    ply = trimesh.load(out / "tx_textured_mesh_poisson.ply", force="mesh")
    assert isinstance(ply.visual, trimesh.visual.ColorVisuals)
    assert (out / "tx_preview_pair.jpg").is_file()
    assert not list(out.glob(".*"))


def test_exports_stand_upright_for_viewers(
    held_out_job: tuple[Path, dict[str, StageResult]],
) -> None:
    """glTF viewers take +Y as up. The demo's ground plate is most of the mesh's area,
    so its area-weighted mean normal is the scene's up: in every export it must point
    along +Y (within 10 degrees), however COLMAP happened to orient the reconstruction."""
    workspace, _ = held_out_job
    out = workspace / "results"
    for name in ("glb", "obj", "ply"):
        mesh = trimesh.load(out / f"tx_textured_mesh_poisson.{name}", force="mesh")
        normal = (mesh.face_normals * mesh.area_faces[:, None]).sum(axis=0)
        normal /= np.linalg.norm(normal)
        assert normal[1] > np.cos(np.radians(10)), (name, normal)
    report = json.loads((out / "tx_report.json").read_text())
    rotation = np.asarray(report["upright_rotation"])
    assert np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-6)
    # the reconstruction's own frame (COLMAP's) is not upright: the rotation did the work
    source = trimesh.load(workspace / "color" / "mesh.ply", force="mesh")
    raw = (source.face_normals * source.area_faces[:, None]).sum(axis=0)
    assert raw[1] / np.linalg.norm(raw) < np.cos(np.radians(10))


def _glb_json(data: bytes) -> dict[str, Any]:
    import struct

    length = struct.unpack_from("<I", data, 12)[0]
    doc: dict[str, Any] = json.loads(data[20 : 20 + length])
    return doc


def _scratch(src: Path, dst: Path) -> Path:
    for name in ("color", "undistort"):
        shutil.copytree(src / name, dst / name)
    return dst


def _no_texture_published(workspace: Path) -> None:
    assert not (workspace / "texture").exists()
    assert not list(workspace.glob(".texture*"))


def test_a_photo_missing_from_the_workspace_is_a_clear_error(
    held_out_job: tuple[Path, dict[str, StageResult]], tmp_path: Path
) -> None:
    workspace = _scratch(held_out_job[0], tmp_path / "ws")
    (workspace / "undistort" / "images" / "view_002.jpg").unlink()
    with pytest.raises(PermanentError, match="view_002.jpg is missing") as info:
        run_stage("texture", _context(workspace, tmp_path))
    assert "undistort" in (info.value.hint or "")  # says what to do
    _no_texture_published(workspace)


def test_a_mesh_no_photo_sees_is_a_clear_error(
    held_out_job: tuple[Path, dict[str, StageResult]], tmp_path: Path
) -> None:
    workspace = _scratch(held_out_job[0], tmp_path / "ws")
    mesh = o3d.io.read_triangle_mesh(workspace / "color" / "mesh.ply")
    mesh.translate((1000.0, 0.0, 0.0))
    o3d.io.write_triangle_mesh(workspace / "color" / "mesh.ply", mesh)
    with pytest.raises(PermanentError, match="no photo sees the mesh"):
        run_stage("texture", _context(workspace, tmp_path))
    _no_texture_published(workspace)


def test_a_mesh_too_large_for_the_atlas_is_a_clear_error(
    held_out_job: tuple[Path, dict[str, StageResult]], tmp_path: Path
) -> None:
    workspace = _scratch(held_out_job[0], tmp_path / "ws")
    with pytest.raises(PermanentError, match="too many for a 128x128 texture") as info:
        run_stage("texture", _context(workspace, tmp_path, texture_size=128))
    assert "face_budget" in (info.value.hint or "")
    _no_texture_published(workspace)


def test_cancel_leaves_nothing_and_the_stage_runs_again(
    held_out_job: tuple[Path, dict[str, StageResult]], tmp_path: Path
) -> None:
    from pipeline import Cancelled

    workspace = _scratch(held_out_job[0], tmp_path / "ws")
    for after in (3, 40):  # while finding what the photos see; while choosing labels
        calls = {"n": 0}

        def cancelled(calls: dict[str, int] = calls, after: int = after) -> bool:
            calls["n"] += 1
            return calls["n"] > after

        ctx = _context(workspace, tmp_path)
        ctx.cancelled = cancelled
        with pytest.raises(Cancelled):
            run_stage("texture", ctx)
        _no_texture_published(workspace)
    progress: list[float] = []
    ctx = _context(workspace, tmp_path)
    ctx.progress = lambda f, m: progress.append(f)
    result = run_stage("texture", ctx)
    assert result.metrics["faces_textured"] > 0
    assert progress == sorted(progress) and progress[-1] == 1.0 and len(progress) > 10
    assert run_stage("texture", _context(workspace, tmp_path)).metrics == result.metrics


def _two_colour_plane(workspace: Path) -> None:
    """A vertical square (y up) textured red on its upper half, blue on its lower half."""
    vertices = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], np.float64)
    faces = np.array([[0, 1, 2], [0, 2, 3]], np.int32)
    uv = vertices[:, :2].astype(np.float32)  # OBJ convention: v = 0 at the image's bottom
    texture = np.zeros((64, 64, 3), np.uint8)
    texture[:32] = (255, 0, 0)  # top rows of the image: red
    texture[32:] = (0, 0, 255)
    folder = workspace / "texture"
    folder.mkdir(parents=True)
    np.savez(
        folder / texturing.MESH,
        vertices=vertices,
        faces=faces,
        uv=uv,
        vertex_colours=np.full((4, 3), 128, np.uint8),
        source_vertex=np.arange(4, dtype=np.int32),
    )
    Image.fromarray(texture).save(folder / texturing.TEXTURE)
    record(folder, StageResult(metrics={}))
    colour = workspace / "color"
    colour.mkdir()
    mesh = o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector(vertices), o3d.utility.Vector3iVector(faces)
    )
    mesh.vertex_colors = o3d.utility.Vector3dVector(np.full((4, 3), 0.5))
    o3d.io.write_triangle_mesh(colour / "mesh.ply", mesh)


def _colour_at(mesh: trimesh.Trimesh, point: np.ndarray) -> np.ndarray:
    """Texture colour at the mesh vertex nearest `point`, sampled as a viewer does."""
    i = int(np.argmin(np.linalg.norm(mesh.vertices - point, axis=1)))
    u, v = mesh.visual.uv[i]
    image = (
        np.asarray(mesh.visual.material.image.convert("RGB"))
        if hasattr(mesh.visual.material, "image") and mesh.visual.material.image is not None
        else np.asarray(mesh.visual.material.baseColorTexture.convert("RGB"))
    )
    h, w = image.shape[:2]
    # a little inside the square, away from the red/blue border
    x = int(np.clip(u * w, 0, w - 1))
    y = int(np.clip((1.0 - v) * h, 0, h - 1))
    return np.asarray(image[y, x], np.int64)


@pytest.mark.parametrize("fmt", ["glb", "obj"])
def test_a_two_colour_plane_comes_out_the_right_way_up(tmp_path: Path, fmt: str) -> None:
    workspace = tmp_path / "ws"
    _two_colour_plane(workspace)
    ctx = _context(workspace, tmp_path)
    ctx.spec = JobSpec(project="plane", images=tmp_path, formats=(fmt,), job_id="p")
    result = run_stage("export", ctx)
    path = next(e.path for e in result.exports if e.format == fmt)
    mesh = trimesh.load(path, force="mesh")
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals)
    top = _colour_at(mesh, np.array([0.0, 0.9, 0.0]) + [0.1, 0.0, 0.0])
    bottom = _colour_at(mesh, np.array([0.1, 0.1, 0.0]))
    assert top[0] > 200 and top[2] < 60, top  # the upper half is red
    assert bottom[2] > 200 and bottom[0] < 60, bottom  # the lower half is blue


VALIDATOR = Path(__file__).resolve().parents[2] / ".tools" / "node_modules" / "gltf-validator"
VALIDATE_JS = """
const validator = require(process.argv[1]);
const bytes = new Uint8Array(require('fs').readFileSync(process.argv[2]));
validator.validateBytes(bytes, {maxIssues: 100})
  .then((report) => console.log(JSON.stringify(report.issues)))
  .catch((err) => { console.error(String(err)); process.exit(2); });
"""


def test_the_glb_passes_the_khronos_gltf_validator(
    held_out_job: tuple[Path, dict[str, StageResult]],
) -> None:
    import os
    import subprocess

    node = shutil.which("node") or shutil.which("nodejs")
    if node is None or not VALIDATOR.is_dir():
        reason = f"the glTF validator is missing ({VALIDATOR}; `make test` installs it)"
        if os.environ.get("DROPMESH_REQUIRE_GLTF_VALIDATOR"):
            pytest.fail(reason)
        pytest.skip(reason)
    glb = held_out_job[0] / "results" / "tx_textured_mesh_poisson.glb"
    proc = subprocess.run(
        [node, "-e", VALIDATE_JS, str(VALIDATOR), str(glb)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    issues = json.loads(proc.stdout)
    problems = [m for m in issues["messages"] if m["severity"] <= 1]
    assert issues["numErrors"] == 0 and issues["numWarnings"] == 0, problems


# ---------------------------------------------------------------- real photos

CASTEL = Path("/usr/share/visp-images-data/ViSP-images/mbt-depth/castel")
CASTEL_HELD_OUT = (9, 15, 21)  # frames left out of the job (it takes the even ones)
MIN_CASTEL_GAIN_DB = 1.5


@pytest.fixture(scope="module")
def castel_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(photos of all 30 frames, workspace of a job on the even frames, workspace of the
    sparse stages on all frames, which places the left-out ones)."""
    import os

    if not os.environ.get("DROPMESH_CASTEL_TEXTURE"):
        pytest.skip(
            "the castel texture measurement takes about 8 minutes and its bar is not met yet "
            "(see the xfail reason): run it with DROPMESH_CASTEL_TEXTURE=1"
        )
    if not (CASTEL / "castel").is_dir():
        reason = f"{CASTEL} is missing: install Debian's visp-images-data (make test does)"
        if os.environ.get("DROPMESH_REQUIRE_REAL_PHOTOS"):
            pytest.fail(f"DROPMESH_REQUIRE_REAL_PHOTOS is set, but {reason}")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("castel_texture")
    every, job = root / "all", root / "job"
    every.mkdir()
    job.mkdir()
    for pgm in sorted((CASTEL / "castel").glob("image_*.pgm")):
        with Image.open(pgm) as im:
            im.convert("RGB").save(every / f"{pgm.stem}.jpg", quality=95)
        if int(pgm.stem.split("_")[1]) % 2 == 0:
            shutil.copy(every / f"{pgm.stem}.jpg", job / f"{pgm.stem}.jpg")
    ws = root / "ws"
    for name in STAGES:
        run_stage(name, _context(ws, job))
    ws_all = root / "ws_all"
    for name in ("ingest", "features", "matching", "mapping"):
        run_stage(name, _context(ws_all, every))
    return every, ws, ws_all


@pytest.mark.xfail(
    strict=True,
    reason="not met yet: on castel the left-out frames score 14-16 dB for both, texture "
    "0.4-0.8 dB below vertex colours; the mesh has holes and wrong depths at the castle's "
    "edges, where sharp photos land misplaced (ghosts) and blur scores better, and the "
    "all-frames model that places the left-out frames self-calibrates another lens "
    "(radial k +0.34 against the job's -0.47)",
)
def test_left_out_real_photos_are_explained_better_by_the_texture(
    castel_job: tuple[Path, Path, Path],
) -> None:
    import pycolmap

    from pipeline.evaluate import umeyama

    photos, ws, ws_all = castel_job
    job = pycolmap.Reconstruction(str(ws / "undistort" / "sparse"))
    everything = pycolmap.Reconstruction(str(ws_all / "mapping" / "sparse" / "0"))
    by_name = {everything.images[i].name: everything.images[i] for i in everything.reg_image_ids()}
    src, dst = [], []
    for i in job.reg_image_ids():
        image = job.images[i]
        if image.name in by_name:
            src.append(image.projection_center())
            dst.append(by_name[image.name].projection_center())
    s, rot, trans = umeyama(np.array(src), np.array(dst))

    def to_all(p: np.ndarray) -> np.ndarray:
        out: np.ndarray = s * p @ rot.T + trans
        return out

    gains = []
    for frame in CASTEL_HELD_OUT:
        name = f"image_{frame:04d}.jpg"
        if name not in by_name:
            continue
        pose = np.asarray(by_name[name].cam_from_world().matrix())
        # the model's own camera, lens distortion included, consistent with its poses: one
        # ray per pixel centre
        camera = everything.cameras[by_name[name].camera_id]
        K = np.asarray(camera.calibration_matrix())
        gx, gy = np.meshgrid(np.arange(camera.width) + 0.5, np.arange(camera.height) + 0.5)
        xy = camera.cam_from_img(np.stack([gx.ravel(), gy.ravel()], axis=1))
        d = np.concatenate([xy, np.ones((len(xy), 1))], axis=1) @ pose[:, :3]  # R^T d
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        centre = -pose[:, :3].T @ pose[:, 3]
        rays = np.concatenate([np.broadcast_to(centre, d.shape), d], axis=1)
        rays = rays.reshape(camera.height, camera.width, 6)
        with Image.open(photos / name) as im:
            photo = np.asarray(im.convert("RGB"), np.float64) / 255.0
        assert (camera.width, camera.height) == photo.shape[1::-1]
        scores = texturing.held_out_scores(ws, photo, K, pose[:, :3], pose[:, 3], to_all, rays=rays)
        print(f"\n{name}: {scores}")
        tex, vc = scores["textured"], scores["vertex_colour"]
        assert tex["coverage"] >= vc["coverage"] - 0.005 > 0.2
        gains.append(tex["psnr_db"] - vc["psnr_db"])
    assert len(gains) >= 2, "the left-out frames were not placed"
    assert float(np.mean(gains)) >= MIN_CASTEL_GAIN_DB, gains


def test_potts_labels_smooth_a_noisy_choice_and_respect_what_is_not_seen() -> None:
    rng = np.random.default_rng(0)
    n = 400  # a strip of faces, each the neighbour of the next
    pairs = np.stack([np.arange(n - 1), np.arange(1, n)], axis=1)
    truth = (np.arange(n) >= n // 2).astype(np.int64)  # photo 0, then photo 1
    cost = rng.uniform(0.0, 1.0, (n, 3))
    cost[np.arange(n), truth] -= 0.3  # the right photo is better on average only
    cost[:, 2] = np.inf  # photo 2 sees nothing
    cost[10, 0] = np.inf  # face 10 is hidden from photo 0
    greedy = np.argmin(cost, axis=1)
    labels = texturing.potts_labels(cost, pairs, smoothness=1.0)
    assert (greedy != truth).sum() > 50
    assert (labels != truth).sum() < 10
    assert np.count_nonzero(np.diff(labels)) < 6  # a few patches, not hundreds
    assert labels[10] != 0 and not (labels == 2).any()
