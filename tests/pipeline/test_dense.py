"""The dense half of the real pipeline (stereo .. export) on the rendered demo scene,
scored against its ground truth."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap
import pytest
import trimesh

from pipeline import (
    Cancelled,
    JobSpec,
    PermanentError,
    StageContext,
    StageResult,
    run_stage,
)
from pipeline.devices import cuda_device_count
from pipeline.evaluate import evaluate, evaluate_object, umeyama
from pipeline.presets import preset
from pipeline.stages._common import choose_device
from pipeline.stages._workspace import read_metrics
from pipeline.stages.meshing import octree_depth
from pipeline.stages.stereo.colmap_files import (
    prepare_workspace,
    read_colmap_array,
    write_colmap_array,
    write_configs,
)
from pipeline.stages.stereo.normals import normals_from_depth, smallest_eigenvectors
from pipeline.stages.stereo.sgbm import pair_depths
from pipeline.stages.stereo.views import View

Sparse = tuple[Path, dict[str, StageResult]]
MakeContext = Callable[..., StageContext]

DENSE_STAGES = ("stereo", "fusion", "meshing", "color", "texture", "export")
# Whole scene (object and ground plate), at 1% of the scene's box diagonal: measured 0.992
# at "low" and "medium" on the easy scene. The plate is most of that area, so the object is
# also scored alone, at 1% of the object's own box diagonal: measured 0.970-0.972 at "low",
# 0.967 at "medium" (recall 0.94: Poisson smooths the thin parts).
MIN_FSCORE = 0.97
MIN_OBJECT_FSCORE = {"low": 0.95, "medium": 0.95}
# "auto" (the default) uses the GPU where pycolmap sees one
EXPECTED_DEVICE = "gpu" if cuda_device_count() > 0 else "cpu"


def _context(workspace: Path, images: Path, quality: str, **kwargs: Any) -> StageContext:
    spec = JobSpec(
        project="demo",
        images=images,
        quality=quality,
        formats=kwargs.pop("formats", ("glb",)),
        job_id="t1",
    )
    return StageContext(spec=spec, workspace=workspace, results_dir=workspace / "results", **kwargs)


def _copy_sparse(src: Path, dst: Path, *, with_undistort: bool = True) -> Path:
    ignore = None if with_undistort else shutil.ignore_patterns("undistort")
    shutil.copytree(src, dst, symlinks=True, ignore=ignore)
    return dst


def _run_dense(
    workspace: Path, images: Path, quality: str, **kwargs: Any
) -> dict[str, StageResult]:
    results = {}
    for name in DENSE_STAGES:
        results[name] = run_stage(name, _context(workspace, images, quality, **kwargs))
    return results


@pytest.fixture(scope="module")
def dense_low(
    sparse_workspace: Sparse, demo_scene: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, StageResult]]:
    """The dense stages at quality "low" on the shared sparse workspace (low)."""
    workspace = _copy_sparse(sparse_workspace[0], tmp_path_factory.mktemp("dense") / "low")
    return workspace, _run_dense(workspace, demo_scene / "images", "low", formats=("glb",))


@pytest.fixture(scope="module")
def dense_medium(
    sparse_workspace: Sparse, demo_scene: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, StageResult]]:
    """Undistort again at "medium" (its image size follows the preset), then the dense
    stages at "medium"."""
    workspace = _copy_sparse(
        sparse_workspace[0], tmp_path_factory.mktemp("dense") / "medium", with_undistort=False
    )
    images = demo_scene / "images"
    run_stage("undistort", _context(workspace, images, "medium"))
    return workspace, _run_dense(workspace, images, "medium", formats=("glb",))


def _fscore(workspace: Path, demo_scene: Path) -> dict[str, Any]:
    score = evaluate(
        workspace / "color" / "mesh.ply",
        demo_scene / "ground_truth",
        workspace / "undistort" / "sparse",
        samples=100_000,
    )
    return score.to_json()


def _object_fscore(workspace: Path, demo_scene: Path) -> dict[str, Any]:
    score = evaluate_object(
        workspace / "color" / "mesh.ply",
        demo_scene / "ground_truth",
        workspace / "undistort" / "sparse",
        samples=100_000,
    )
    return score.to_json()


# ---------------------------------------------------------------- units


def test_colmap_array_round_trip(tmp_path: Path) -> None:
    depth = np.random.default_rng(0).random((7, 5)).astype(np.float32)
    normals = np.random.default_rng(1).random((7, 5, 3)).astype(np.float32)
    write_colmap_array(tmp_path / "d.bin", depth)
    write_colmap_array(tmp_path / "n.bin", normals)
    assert (tmp_path / "d.bin").read_bytes().startswith(b"5&7&1&")
    assert np.array_equal(read_colmap_array(tmp_path / "d.bin"), depth)
    assert np.array_equal(read_colmap_array(tmp_path / "n.bin"), normals)
    # COLMAP's layout: whole channels one after another, each row-major
    raw = np.frombuffer((tmp_path / "n.bin").read_bytes()[6:], "<f4")
    assert np.array_equal(raw[:35], normals[:, :, 0].ravel())


def test_pair_depths_gives_both_views_of_a_plane() -> None:
    """Two views 0.5 apart of a textured plane 5 in front: one matching gives the depth
    maps of both views (the source's by forward warping), right where they overlap."""
    import cv2

    w, h, f, shift = 200, 150, 200.0, 20  # disparity f * b / z = 200 * 0.5 / 5 = 20 px
    K = np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1.0]])
    noise = np.random.default_rng(0).integers(0, 256, (h, w + shift, 3)).astype(np.uint8)
    texture = cv2.GaussianBlur(noise, (0, 0), 1.5)
    gx, gy = np.meshgrid(np.linspace(-1.5, 1.5, 15), np.linspace(-1.2, 1.2, 12))
    points = np.stack([gx.ravel(), gy.ravel(), np.full(gx.size, 5.0)], axis=-1)
    ids = np.arange(len(points), dtype=np.int64)

    def view(index: int, x: float) -> View:
        return View(
            index=index,
            name=f"v{index}",
            K=K,
            R=np.eye(3),
            t=np.array([-x, 0.0, 0.0]),
            width=w,
            height=h,
            points=points,
            point_ids=ids,
        )

    # the source, 0.5 to the right, sees the plane 20 px further left
    depths = pair_depths(view(0, 0.0), view(1, 0.5), texture[:, :w], texture[:, shift:])
    assert depths is not None
    for depth, unmatched in zip(depths, (np.s_[:, :shift], np.s_[:, w - shift :]), strict=True):
        assert depth.shape == (h, w)
        valid = np.isfinite(depth)
        assert valid.mean() > 0.6
        assert not valid[unmatched].any()  # what the other view does not see
        # within 1% (SGBM's sub-pixel disparities lean towards whole pixels)
        assert np.abs(np.median(depth[valid]) - 5.0) < 0.05
        assert np.percentile(np.abs(depth[valid] - 5.0), 95) < 0.1


def test_normals_of_a_plane_face_the_camera() -> None:
    K = np.array([[100.0, 0, 32], [0, 100.0, 24], [0, 0, 1]])
    uu, vv = np.meshgrid(np.arange(64.0), np.arange(48.0))
    # the plane z = 2 + 0.5 x, seen by a camera at the origin
    x = (uu - 32) / 100
    depth = (2.0 / (1.0 - 0.5 * x)).astype(np.float32)
    n = normals_from_depth(depth, K)
    expected = np.array([0.5, 0.0, -1.0]) / np.linalg.norm([0.5, 0.0, -1.0])
    inner = n[5:-5, 5:-5].reshape(-1, 3)
    assert np.allclose(inner, expected, atol=1e-3)


def test_smallest_eigenvectors_match_lapack() -> None:
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(500, 3, 3)))
    # plane-like spreads (one tiny eigenvalue), as local plane fits give, in any orientation
    lam = np.stack(
        [
            10 ** rng.uniform(-9, -5, 500),
            10 ** rng.uniform(-4, -2, 500),
            10 ** rng.uniform(-4, -2, 500),
        ],
        axis=-1,
    )
    cov = np.einsum("nij,nj,nkj->nik", q, lam, q)
    cov[:3] = np.eye(3) * 1e-3  # repeated eigenvalues: any unit vector of the eigenspace
    cov[3:6] = np.einsum("ni,nj->nij", q[3:6, :, 0], q[3:6, :, 0])  # a line
    upper = {(i, j): cov[:, i, j].copy() for i in range(3) for j in range(i, 3)}
    vec = smallest_eigenvectors(upper)
    assert np.allclose(np.linalg.norm(vec, axis=1), 1.0)
    smallest = np.linalg.eigvalsh(cov)[:, 0]
    rayleigh = np.einsum("ni,nij,nj->n", vec, cov, vec)
    assert np.allclose(rayleigh, smallest, rtol=1e-6, atol=1e-15)
    expected = np.linalg.eigh(cov[6:])[1][:, :, 0]
    assert np.allclose(np.abs(np.einsum("ni,ni->n", vec[6:], expected)), 1.0, atol=1e-9)


def test_umeyama_recovers_a_similarity() -> None:
    rng = np.random.default_rng(0)
    src = rng.normal(size=(10, 3))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    rot = q * np.sign(np.linalg.det(q))
    dst = 2.5 * src @ rot.T + np.array([1.0, -2.0, 0.5])
    s, r, t = umeyama(src, dst)
    assert s == pytest.approx(2.5)
    assert np.allclose(r, rot)
    assert np.allclose(t, [1.0, -2.0, 0.5])


def test_gpu_request_without_gpu_is_a_permanent_error(tmp_path: Path) -> None:
    if cuda_device_count() > 0:
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(PermanentError, match="device=gpu"):
        choose_device("gpu")
    assert choose_device("auto") == "cpu"
    assert choose_device("cpu") == "cpu"


# ---------------------------------------------------------------- failures


def test_empty_cloud_is_a_permanent_error_not_a_crash(
    sparse_workspace: Sparse, demo_scene: Path, tmp_path: Path
) -> None:
    """Depth maps with nothing in them fuse to an empty cloud: fusion must fail cleanly
    (Poisson on an empty cloud would crash the process) and meshing must refuse too."""
    workspace = _copy_sparse(sparse_workspace[0], tmp_path / "ws")
    images = demo_scene / "images"
    out = workspace / "stereo"
    out.mkdir()
    prepare_workspace(out)
    model = pycolmap.Reconstruction(workspace / "undistort" / "sparse")
    names = [model.images[i].name for i in model.reg_image_ids()]
    cam = next(iter(model.cameras.values()))
    for name in names:
        for kind, shape in (("depth_maps", (cam.height, cam.width)), ("normal_maps", None)):
            data = np.zeros(shape or (cam.height, cam.width, 3), np.float32)
            write_colmap_array(out / "stereo" / kind / f"{name}.geometric.bin", data)
    write_configs(out, names, None)
    (out / "metrics.json").write_text(json.dumps({"metrics": {"engine": "test"}}))

    with pytest.raises(PermanentError, match="fused point cloud has 0 points"):
        run_stage("fusion", _context(workspace, images, "low"))
    assert not (workspace / "fusion").exists()

    (workspace / "fusion").mkdir()
    (workspace / "fusion" / "fused.ply").write_text(
        "ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\nproperty float y\n"
        "property float z\nend_header\n"
    )
    with pytest.raises(PermanentError, match="empty"):
        run_stage("meshing", _context(workspace, images, "low"))


def test_cancel_stops_stereo_and_publishes_nothing(
    sparse_workspace: Sparse, demo_scene: Path, tmp_path: Path
) -> None:
    workspace = _copy_sparse(sparse_workspace[0], tmp_path / "ws")
    seen: list[str] = []

    def progress(fraction: float, message: str) -> None:
        seen.append(message)

    ctx = _context(
        workspace,
        demo_scene / "images",
        "low",
        progress=progress,
        cancelled=lambda: len(seen) > 0,
        device="cpu",
    )
    with pytest.raises(Cancelled):
        run_stage("stereo", ctx)
    assert not (workspace / "stereo").exists()
    assert not list(workspace.glob(".stereo.tmp-*"))


# ---------------------------------------------------------------- the scene


def test_low_quality_mesh_matches_ground_truth(
    dense_low: tuple[Path, dict[str, StageResult]], demo_scene: Path
) -> None:
    workspace, results = dense_low
    score = _fscore(workspace, demo_scene)
    obj = _object_fscore(workspace, demo_scene)
    timings = {k: r.metrics.get("seconds") for k, r in results.items()}
    print(f"\nlow: {score}\nobject: {obj}\ntimings: {timings}")
    assert results["stereo"].device == EXPECTED_DEVICE
    assert results["stereo"].metrics["device"] == EXPECTED_DEVICE
    assert score["fscore"] >= MIN_FSCORE, score
    assert obj["fscore"] >= MIN_OBJECT_FSCORE["low"], obj
    assert obj["threshold"] < 0.6 * score["threshold"]  # the object's scale, not the scene's
    assert results["meshing"].metrics["faces"] <= 50_000


@pytest.mark.skipif(
    cuda_device_count() == 0, reason="no CUDA device: the GPU path runs where pycolmap sees one"
)
def test_gpu_stereo_matches_ground_truth(
    sparse_workspace: Sparse, demo_scene: Path, tmp_path: Path
) -> None:
    workspace = _copy_sparse(sparse_workspace[0], tmp_path / "gpu")
    results = _run_dense(workspace, demo_scene / "images", "low", device="gpu")
    assert results["stereo"].device == "gpu"
    score = _fscore(workspace, demo_scene)
    print(f"\ngpu: {score}")
    assert score["fscore"] >= MIN_FSCORE, score


def test_medium_quality_mesh_matches_ground_truth(
    dense_medium: tuple[Path, dict[str, StageResult]], demo_scene: Path
) -> None:
    workspace, results = dense_medium
    score = _fscore(workspace, demo_scene)
    obj = _object_fscore(workspace, demo_scene)
    timings = {k: r.metrics.get("seconds") for k, r in results.items()}
    print(f"\nmedium: {score}\nobject: {obj}\ntimings: {timings}")
    assert score["fscore"] >= MIN_FSCORE, score
    assert obj["fscore"] >= MIN_OBJECT_FSCORE["medium"], obj
    assert results["meshing"].metrics["faces"] <= preset("medium").face_budget
    # depth maps at 640 px, within a halving of medium's 800: medium's own octree depth
    assert read_metrics(workspace, "undistort")["stereo_size"] == 640
    assert results["meshing"].metrics["poisson_depth"] == preset("medium").poisson_depth


def test_octree_depth_drops_a_level_per_halving_of_the_depth_maps() -> None:
    assert octree_depth(10, 1600, 1600) == 10  # high on photos of 3200 px
    assert octree_depth(10, 1600, 800) == 9  # high on photos of 1600 px
    assert octree_depth(10, 1600, 640) == 9  # high on photos of 1024 px or less
    assert octree_depth(9, 800, 640) == 9
    assert octree_depth(9, 800, None) == 9  # a workspace from before stereo_size
    assert octree_depth(9, 0, 2500) == 9  # no cap


def test_glb_loads_back_with_its_texture(
    dense_low: tuple[Path, dict[str, StageResult]],
) -> None:
    workspace, results = dense_low
    exports = {e.format: e.path for e in results["export"].exports}
    assert set(exports) == {"glb", "png", "json"}
    glb = exports["glb"]
    assert glb == workspace / "results" / "t1_textured_mesh_poisson.glb"
    mesh = trimesh.load(glb, force="mesh")
    assert isinstance(mesh, trimesh.Trimesh)
    assert len(mesh.faces) == results["meshing"].metrics["faces"]
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals)
    texture = np.asarray(mesh.visual.material.baseColorTexture.convert("RGB"))
    assert mesh.visual.uv.shape == (len(mesh.vertices), 2)
    assert texture.std() > 10  # real colours, not one flat default
    assert not list((workspace / "results").glob(".*"))  # no temporary files left


def test_report_and_preview(dense_low: tuple[Path, dict[str, StageResult]]) -> None:
    workspace, results = dense_low
    report = json.loads((workspace / "results" / "t1_report.json").read_text())
    assert report["device"] == EXPECTED_DEVICE
    assert report["images_registered"] == report["images_total"] == 16
    assert 0 < report["mean_reprojection_error_px"] < 2
    assert report["dense_points"] == results["fusion"].metrics["points"]
    assert report["mesh"]["faces"] == results["meshing"].metrics["faces"]
    assert {"stereo", "fusion", "meshing", "color", "mapping"} <= set(report["timings_s"])
    png = workspace / "results" / "t1_preview.png"
    from PIL import Image

    with Image.open(png) as img:
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.shape == (600, 800, 3)
    background = pixels[0, 0]
    assert (np.abs(pixels.astype(int) - background).sum(axis=2) > 30).mean() > 0.05


def test_export_again_with_other_formats_redoes_only_export(
    dense_low: tuple[Path, dict[str, StageResult]], demo_scene: Path
) -> None:
    workspace, _ = dense_low
    before = {
        name: (workspace / name / "metrics.json").stat().st_mtime_ns
        for name in ("stereo", "fusion", "meshing", "color", "texture")
    }
    ctx = _context(workspace, demo_scene / "images", "low", formats=("ply", "obj"))
    for name in ("stereo", "fusion", "meshing", "color", "texture", "export"):
        result = run_stage(name, ctx)
    assert {e.format for e in result.exports} == {"ply", "obj", "png", "json"}
    after = {name: (workspace / name / "metrics.json").stat().st_mtime_ns for name in before}
    assert before == after
    ply = trimesh.load(workspace / "results" / "t1_textured_mesh_poisson.ply", force="mesh")
    obj = trimesh.load(workspace / "results" / "t1_textured_mesh_poisson.obj", force="mesh")
    assert isinstance(ply, trimesh.Trimesh) and isinstance(obj, trimesh.Trimesh)
    assert len(ply.faces) == len(obj.faces) > 0
    assert isinstance(ply.visual, trimesh.visual.ColorVisuals)
    assert np.asarray(ply.visual.vertex_colors)[:, :3].std() > 10
    assert read_metrics(workspace, "export")["formats"] == ["ply", "obj"]


def test_full_pipeline_on_the_demo_scene(demo_scene: Path, tmp_path: Path) -> None:
    """pipeline.run from photos to exports, every stage in order, on a fresh workspace."""
    from pipeline import STAGES, run

    spec = JobSpec(
        project="demo",
        images=demo_scene / "images",
        quality="low",
        formats=("glb", "ply"),
        job_id="full",
    )
    fractions: list[float] = []
    results = run(
        spec,
        tmp_path / "ws",
        progress=lambda f, m: fractions.append(f),
        results_dir=tmp_path / "results",
        device="auto",
    )
    assert list(results) == list(STAGES)
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert {e.format for e in results["export"].exports} == {"glb", "ply", "png", "json"}
    assert all(e.path.parent == tmp_path / "results" for e in results["export"].exports)
    score = evaluate(
        tmp_path / "ws" / "color" / "mesh.ply",
        demo_scene / "ground_truth",
        tmp_path / "ws" / "undistort" / "sparse",
        samples=50_000,
    )
    assert score.fscore >= MIN_FSCORE, score
