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
from scipy import ndimage

from pipeline import JobSpec, PermanentError, StageContext, StageResult, run_stage
from pipeline.evaluate import align_to_truth
from pipeline.stages import STAGES
from pipeline.stages import texture as texturing
from pipeline.stages._workspace import record

HELD_OUT = ("view_004.jpg", "view_011.jpg")
MIN_GAIN_DB = 2.3  # textured over vertex-coloured, mean over the held-out views (measured 2.6-3.0)


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


def test_photos_the_job_never_saw_are_placed_where_they_were_taken(
    held_out_job: tuple[Path, dict[str, StageResult]], demo_scene: Path
) -> None:
    """pipeline.localise against the demo's true cameras: the held-out photos' centres,
    mapped to the truth by the job's own cameras, land where they were rendered from."""
    from pipeline.localise import localise

    workspace, _ = held_out_job
    truth_json = demo_scene / "ground_truth" / "cameras.json"
    truth = json.loads(truth_json.read_text())
    alignment = align_to_truth(workspace / "undistort" / "sparse", truth_json)
    extent = np.ptp([-np.asarray(c["R"]).T @ c["t"] for c in truth["images"].values()], axis=0)
    for name in HELD_OUT:
        placed = localise(workspace, demo_scene / "images" / name)
        assert placed is not None, name
        pose = placed.cam_from_world
        centre = alignment.apply((-pose[:, :3].T @ pose[:, 3])[None])[0]
        cam = truth["images"][name]
        true_centre = -np.asarray(cam["R"]).T @ np.asarray(cam["t"])
        error = np.linalg.norm(centre - true_centre) / np.linalg.norm(extent)
        print(
            f"{name}: {placed.inliers} of {placed.correspondences} inliers, centre off {error:.4f}"
        )
        assert error < 0.002, (name, error)  # measured 0.03 % of the camera ring


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


# a passer-by: a figure in yellow and blue stripes (colours the demo scene does not have;
# stripes of light and dark, so that the photo is sharp there and the data term favours it)
PASSER_BY = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def _passer_by_share(workspace: Path, name: str, disc: np.ndarray) -> float:
    """Of the pixels inside `disc` that the textured mesh covers, seen from photo `name`'s
    camera, the share that came out in the passer-by's colours."""
    view = next(v for v in texturing.load_views(workspace / "undistort") if v.name == name)
    mesh, texture = texturing.load_textured(workspace / "texture")
    image, covered = texturing.render(
        mesh["vertices"], mesh["faces"], view.K, view.R, view.t, view.width, view.height,
        uv=mesh["uv"], texture=texture,
    )  # fmt: skip
    inside = covered & disc
    assert inside.sum() > 1000  # the figure stands in front of the object
    distance = np.linalg.norm(image[:, :, None, :] - PASSER_BY, axis=3).min(axis=2)
    return float((distance < 0.45)[inside].mean())


def test_a_passer_by_in_one_photo_stays_out_of_the_texture(
    held_out_job: tuple[Path, dict[str, StageResult]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A figure painted into the middle of one photo, where that photo is the best view
    of the object: the photometric check drops that photo for the faces the figure hides,
    so the texture shows the object there, as the other photos do. Without the check the
    figure is baked in (the check's effect, so the test can fail)."""
    name = "view_000.jpg"
    shares = {}
    for check in (True, False):
        workspace = _scratch(held_out_job[0], tmp_path / f"ws-{check}")
        path = workspace / "undistort" / "images" / name
        with Image.open(path) as im:
            photo = np.asarray(im.convert("RGB")).copy()
        h, w = photo.shape[:2]
        yy, xx = np.mgrid[:h, :w]
        disc = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (0.15 * h) ** 2
        stripe = (xx // 4) % 2
        photo[disc] = (PASSER_BY[stripe[disc]] * 255).astype(np.uint8)
        Image.fromarray(photo).save(path, quality=95)
        if not check:
            monkeypatch.setattr(
                texturing,
                "photometric_outliers",
                lambda seen, n: [np.zeros(len(s.faces), bool) for s in seen],
            )
        result = run_stage("texture", _context(workspace, tmp_path))
        shares[check] = _passer_by_share(workspace, name, disc)
        print(f"check {check}: {shares[check]:.3f} of the figure baked in, {result.metrics}")
    assert shares[False] > 0.3  # the photo the faces behind the figure take (measured 0.50-0.76)
    assert shares[True] < 0.02


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

CASTEL_HELD_OUT = (9, 15, 21)  # odd frames: the job (tests/pipeline/conftest.py) took the even
# The scores are taken on the castle: what the depth sensor sees nearer than
# castel_photos.CASTLE_MAX_DEPTH_M.
# Measured on the castle, 3 runs: textured 34.1-35.2 dB against vertex colours 29.2-30.0 dB (a
# flat colour 15.7-16.1), mean PSNR gain 5.0-5.1 dB, SSIM 0.95 against 0.85-0.87 (gain
# 0.082-0.101), 86-89 % of the castle's pixels covered. Before fusion masked the still
# background: 33.4-34.6 dB, a gain of 4.4 dB. A model that kept the background's matches
# (tilted, see test_real_photos.py) scored 27.5-29.2 dB, a gain of 0.8 dB, 76-78 % covered.
MIN_CASTEL_PSNR_DB = 33.6
MIN_CASTEL_MEAN_GAIN_DB = 4.6
MIN_CASTEL_SSIM_GAIN = 0.075
MIN_CASTEL_COVERAGE = 0.83
TARGET_CASTEL_GAIN_DB = 1.5  # what the textured export must reach (issue: real textures)


@pytest.fixture(scope="module")
def castel_held_out(
    castel: tuple[Path, dict[str, StageResult]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """Frames of the castel sequence the job never saw, placed in the job's own model
    (pipeline.localise, with the job's lens), and the scores of the textured and of the
    vertex-coloured mesh rendered from there through that lens, per frame."""
    from castel_photos import CASTEL, CASTLE_MAX_DEPTH_M
    from test_real_photos import sensor_depth

    from pipeline.localise import localise

    workspace, _ = castel
    root = tmp_path_factory.mktemp("castel_held_out")
    out: dict[str, dict[str, Any]] = {}
    for frame in CASTEL_HELD_OUT:
        path = root / f"image_{frame:04d}.jpg"
        with Image.open(CASTEL / "castel" / f"image_{frame:04d}.pgm") as im:
            im.save(path, quality=95)  # as the job's photos were made
            photo = np.asarray(im.convert("RGB"), np.float64) / 255.0
        placed = localise(workspace, path)
        assert placed is not None, f"{path.name} was not placed in the job's model"
        pose = placed.cam_from_world
        K = np.asarray(placed.camera.calibration_matrix())
        depth = sensor_depth(frame)
        # closed: the sensor's pixels land on the photo's with gaps of a pixel between them
        castle = ndimage.binary_closing((depth > 0) & (depth < CASTLE_MAX_DEPTH_M), iterations=2)
        scores = texturing.held_out_scores(
            workspace, photo, K, pose[:, :3], pose[:, 3], rays=placed.rays(), within=castle
        )
        print(f"\n{path.name} ({placed.inliers} of {placed.correspondences} inliers): {scores}")
        out[path.name] = {"placed": placed, **scores}
    return out


def test_left_out_real_photos_are_explained_better_by_the_texture(
    castel_held_out: dict[str, dict[str, Any]],
) -> None:
    gains, ssim_gains = [], []
    for name, v in castel_held_out.items():
        placed, tex, vc, flat = v["placed"], v["textured"], v["vertex_colour"], v["flat"]
        assert placed.inliers >= 0.5 * placed.correspondences, (name, placed)
        assert tex["coverage"] >= vc["coverage"] - 0.005 > MIN_CASTEL_COVERAGE, name
        assert tex["psnr_db"] > MIN_CASTEL_PSNR_DB > flat["psnr_db"] + 5, (name, tex, flat)
        gains.append(tex["psnr_db"] - vc["psnr_db"])
        ssim_gains.append(tex["ssim"] - vc["ssim"])
    assert float(np.mean(gains)) >= MIN_CASTEL_MEAN_GAIN_DB, gains
    assert min(ssim_gains) >= MIN_CASTEL_SSIM_GAIN, ssim_gains


def test_left_out_real_photos_gain_the_target_from_the_texture(
    castel_held_out: dict[str, dict[str, Any]],
) -> None:
    gains = [
        v["textured"]["psnr_db"] - v["vertex_colour"]["psnr_db"] for v in castel_held_out.values()
    ]
    assert float(np.mean(gains)) >= TARGET_CASTEL_GAIN_DB, gains


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


def test_photometric_outliers_level_exposure_then_drop_the_odd_photo_out() -> None:
    """Five photos of 300 faces: photo 1 is a stop darker and photo 2 warmer (exposure and
    white balance), which levelling forgives; photo 3 shows something else on faces
    0-49 (a passer-by). Faces seen by two photos only are never judged."""
    from pipeline.stages.texture.select import Seen

    rng = np.random.default_rng(1)
    n = 300
    truth = rng.uniform(0.2, 0.8, (n, 3))
    gains = np.array([[1, 1, 1], [0.5, 0.5, 0.5], [1.2, 1.0, 0.8], [1, 1, 1], [1, 1, 1]])
    seen = []
    for k, gain in enumerate(gains):
        faces = np.arange(n) if k < 3 else np.arange(200 if k == 4 else n)
        colour = np.clip(truth[faces] * gain + rng.normal(0, 0.01, (len(faces), 3)), 0, 1)
        if k == 3:
            colour[:50] = [1.0, 0.0, 1.0]
        seen.append(Seen(faces, np.ones(len(faces)), colour))
    seen.append(Seen(np.array([n, n + 1]), np.ones(2), np.array([[0.0, 0, 0], [1, 1, 1]])))
    seen.append(Seen(np.array([n, n + 1]), np.ones(2), np.array([[1.0, 1, 1], [0, 0, 0]])))
    outliers = texturing.photometric_outliers(seen, n + 2)
    assert [int(o.sum()) for o in outliers] == [0, 0, 0, 50, 0, 0, 0]
    assert outliers[3][:50].all()
