"""The CUDA paths of pycolmap that dropmesh uses: SIFT extraction, matching and PatchMatch
stereo on the GPU, each checked against the CPU or the ground truth. They run wherever
pycolmap sees a CUDA device (the pycolmap-cuda12 build on a machine with an NVIDIA GPU)
and skip elsewhere, saying why."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline import StageResult
from pipeline.devices import cuda_device_count, pycolmap_build

needs_cuda = pytest.mark.skipif(
    cuda_device_count() == 0,
    reason=f"no CUDA device seen by pycolmap ({pycolmap_build()}): the GPU tests run where "
    "the CUDA build of pycolmap sees an NVIDIA GPU",
)

Sparse = tuple[Path, dict[str, StageResult]]
VIEWS = 5  # consecutive views of the ring: each overlaps the next


def test_one_pycolmap_build_matching_the_module() -> None:
    """Exactly one pycolmap distribution is installed, and it is the one whose module is
    imported: the CUDA build's module has CUDA, the CPU build's has not."""
    import pycolmap

    build = pycolmap_build()
    assert " and " not in build and "not installed" not in build, build
    assert ("CUDA" in build) == bool(getattr(pycolmap, "has_cuda", False)), build


def _extract(images: Path, names: list[str], db: Path, device: Any) -> list[int]:
    import pycolmap

    pycolmap.extract_features(db, images, image_names=names, device=device)
    with pycolmap.Database.open(str(db)) as database:
        return [
            database.read_keypoints(im.image_id).shape[0]
            for im in sorted(database.read_all_images(), key=lambda im: im.name)
        ]


@needs_cuda
def test_gpu_sift_finds_what_the_cpu_finds(demo_scene: Path, tmp_path: Path) -> None:
    import pycolmap

    names = sorted(p.name for p in (demo_scene / "images").glob("*.jpg"))[:VIEWS]
    gpu = _extract(demo_scene / "images", names, tmp_path / "gpu.db", pycolmap.Device.cuda)
    cpu = _extract(demo_scene / "images", names, tmp_path / "cpu.db", pycolmap.Device.cpu)
    print(f"\nkeypoints gpu {gpu} cpu {cpu}")
    assert min(gpu) > 500
    for g, c in zip(gpu, cpu, strict=True):
        assert abs(g - c) < 0.2 * c, (gpu, cpu)


@needs_cuda
def test_gpu_matching_verifies_neighbouring_views(demo_scene: Path, tmp_path: Path) -> None:
    import pycolmap

    names = sorted(p.name for p in (demo_scene / "images").glob("*.jpg"))[:VIEWS]
    db = tmp_path / "gpu.db"
    _extract(demo_scene / "images", names, db, pycolmap.Device.cuda)
    pycolmap.match_exhaustive(db, device=pycolmap.Device.cuda)
    with pycolmap.Database.open(str(db)) as database:
        ids = {im.name: im.image_id for im in database.read_all_images()}
        inliers = [
            database.read_two_view_geometry(ids[a], ids[b]).inlier_matches.shape[0]
            for a, b in zip(names, names[1:], strict=False)
        ]
    print(f"\nverified matches between neighbours (gpu): {inliers}")
    assert min(inliers) > 100, inliers


@needs_cuda
def test_gpu_patch_match_depths_agree_with_ground_truth(
    sparse_workspace: Sparse, demo_scene: Path, ground_truth: dict[str, Any], tmp_path: Path
) -> None:
    """PatchMatch (photometric + geometric) on the undistorted demo workspace; each
    depth map, at the one scale that best maps the reconstruction onto the truth, against
    the depth of the true mesh seen from the true camera."""
    import open3d as o3d
    import pycolmap

    from pipeline.stages.stereo import read_colmap_array, write_configs

    workspace = shutil.copytree(sparse_workspace[0] / "undistort", tmp_path / "dense")
    model = pycolmap.Reconstruction(str(workspace / "sparse"))
    names = [model.images[i].name for i in sorted(model.reg_image_ids())]
    write_configs(workspace, names, None)
    options = pycolmap.PatchMatchOptions()
    options.geom_consistency = True
    pycolmap.patch_match_stereo(str(workspace), workspace_format="COLMAP", options=options)

    mesh = o3d.io.read_triangle_mesh(str(demo_scene / "ground_truth" / "mesh.ply"))
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(
        o3d.core.Tensor(np.asarray(mesh.vertices, np.float32)),
        o3d.core.Tensor(np.asarray(mesh.triangles, np.uint32)),
    )
    ratios, coverage = [], []
    for image in model.images.values():
        depth = read_colmap_array(
            workspace / "stereo" / "depth_maps" / f"{image.name}.geometric.bin"
        )
        camera = model.cameras[image.camera_id]
        h, w = depth.shape
        rows, cols = np.mgrid[0:h, 0:w]
        pixels = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], 1).astype(np.float64)
        pixels *= np.array([camera.width / w, camera.height / h])
        rays_cam = np.concatenate([camera.cam_from_img(pixels), np.ones((len(pixels), 1))], 1)
        truth_cam = ground_truth["images"][image.name]
        rot = np.asarray(truth_cam["R"])
        centre = np.asarray(truth_cam["centre"])
        directions = rays_cam @ rot  # unnormalised: the hit distance is the depth
        rays = np.concatenate([np.broadcast_to(centre, directions.shape), directions], 1)
        truth = scene.cast_rays(o3d.core.Tensor(rays.astype(np.float32)))["t_hit"].numpy()
        truth = truth.reshape(h, w)
        ok = (depth > 0) & np.isfinite(truth)
        coverage.append(ok.mean())
        ratios.append(truth[ok] / depth[ok])
    r = np.concatenate(ratios)
    error = np.abs(r / np.median(r) - 1.0)
    print(f"\npatch match: coverage {np.round(coverage, 3).tolist()}, error {np.median(error)}")
    assert min(coverage) > 0.3, coverage
    assert np.median(error) < 0.01, np.median(error)
