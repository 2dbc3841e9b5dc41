"""The whole pipeline on real photos: ViSP's "castel" sequence, a painted model castle on a
cluttered desk, moved by hand in front of a fixed Intel RealSense (Debian's
`visp-images-data`, GPL-2, installed by `make test`).

The sequence has what the rendered demo scene lacks: sensor noise, blur, lighting that
changes with the view, no EXIF, and a background (a box, pens, the window) that stands
still while the subject moves, as on a turntable: matching must leave its matches out.
It also has ground truth of its own: the colour camera's calibrated focal length, and a
depth-sensor frame registered to every photo. The reconstruction lives in an arbitrary
scale, so depths are compared after one scale factor (the median ratio over all views).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import open3d as o3d
import pycolmap
import pytest
import trimesh
from castel_photos import CASTEL, CASTLE_MAX_DEPTH_M
from PIL import Image

from pipeline import JobSpec, StageContext, StageResult, run_stage
from pipeline.stages.stereo.colmap_files import read_colmap_array

# From the sequence's chateau.xml and chateau_depth.xml (pixels) and depth_M_color.txt.
COLOUR_K = np.array(
    [[615.1674804688, 0, 312.1889953613], [0, 615.1675415039, 243.4373779297], [0, 0, 1]]
)
DEPTH_K = np.array(
    [[476.0536193848, 0, 311.4845581055], [0, 476.0534973145, 246.2832336426], [0, 0, 1]]
)
DEPTH_UNIT_M = 0.000124986647  # the sensor's raw depth unit

# Measured on this sequence at quality "low": focal 677 px (the castle alone, in the middle
# of the photos, observes the lens less well than a rigid model of castle and background
# did; that model was wrong, see test_matching_leaves_out_the_background_that_stood_still),
# reprojection 0.48 px, depth maps 1.85 % and mesh 1.65 % median relative error against a
# constant depth's 6.1 % and 5.9 %, the worst view at 0.36 and 0.31 of its constant's (the
# mesh before fusion masked the still background: 1.80 % against 6.5 %, worst 0.32).
MAX_FOCAL_ERROR = 0.13
MAX_REPROJECTION_PX = 1.0
MAX_DEPTH_MAP_ERROR = 0.022
MAX_MESH_ERROR = 0.019
# The same error as a share of a constant depth's on the same pixels, over all views and
# in the worst one (a constant scores about 6 %: the scene lies at nearly one depth).
MAX_DEPTH_MAP_RATIO = 0.35
MAX_MESH_RATIO = 0.3
MAX_VIEW_RATIO = 0.45
# Share of the sensor's valid pixels that get a depth map's depth, in the worst view
# (measured: 0.55), and of the castle's that the mesh covers (0.84).
MIN_DEPTH_COVERAGE = 0.45
MIN_CASTLE_COVERAGE = 0.8
# Share of the background's sensor pixels (the box and the room, behind the castle) that the
# mesh covers, in the worst view: 0.19 (fusion masks the background that stood still; what
# is left lies beside the tower, behind the castle's top, not on the box); without the
# masks 0.45, fragments of the box fused where the camera was in the castle's frame.
MAX_BACKGROUND_COVERAGE = 0.25


def frame_of(image_name: str) -> int:
    return int(image_name.split("_")[1].split(".")[0])


def sensor_depth(frame: int) -> np.ndarray:
    """The depth sensor's frame, in metres, seen from the colour camera (0 = no depth)."""
    raw = np.fromfile(CASTEL / "castel" / f"depth_image_{frame:04d}.bin", dtype=np.uint8)
    h, w = (int(x) for x in np.frombuffer(raw[:8].tobytes(), dtype=np.uint32))
    z = np.frombuffer(raw[8:].tobytes(), dtype=np.uint16).reshape(h, w) * DEPTH_UNIT_M
    rows, cols = np.nonzero(z > 0)
    pixels = np.stack([cols, rows, np.ones_like(cols)]).astype(np.float64)
    in_depth = np.linalg.solve(DEPTH_K, pixels) * z[rows, cols]
    colour_from_depth = np.linalg.inv(np.loadtxt(CASTEL / "depth_M_color.txt"))
    in_colour = colour_from_depth[:3, :3] @ in_depth + colour_from_depth[:3, 3:]
    uvw = COLOUR_K @ in_colour
    u = np.rint(uvw[0] / uvw[2]).astype(np.int64)
    v = np.rint(uvw[1] / uvw[2]).astype(np.int64)
    ok = (in_colour[2] > 0) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
    out = np.full((h, w), np.inf)
    np.minimum.at(out, (v[ok], u[ok]), in_colour[2][ok])  # nearest surface per pixel
    out[np.isinf(out)] = 0.0
    return out


def test_every_photo_is_placed_with_the_calibrated_focal_length(
    castel: tuple[Path, dict[str, StageResult]],
) -> None:
    _, results = castel
    mapping = results["mapping"].metrics
    assert results["ingest"].metrics["with_exif_focal"] == 0
    assert mapping["registered"] == mapping["total"] == 15
    assert mapping["mean_reprojection_error"] < MAX_REPROJECTION_PX
    focal = mapping["cameras"][0]["params"][0]
    assert abs(focal / COLOUR_K[0, 0] - 1.0) < MAX_FOCAL_ERROR, focal


def test_matching_leaves_out_the_background_that_stood_still(
    castel: tuple[Path, dict[str, StageResult]],
) -> None:
    """The box, the pens and the window stand still while the castle moves: most pairs
    show it (measured: all 105), and the pairs are verified again without its matches
    (25,782 of 70,060 inliers remain). Kept, they
    tilted the model (frame 0's depth rose 40 % from its top rows to its bottom ones while
    the sensor's fell; depth maps 5.7 % off, no better than a constant depth). Fusion then
    masks that background in every photo (measured: 28 % of a photo, the median)."""
    _, results = castel
    matching = results["matching"].metrics
    assert matching["still_background_pairs"] > 0.6 * matching["pairs"], matching
    assert any("background stood still" in note for note in matching["notes"]), matching
    assert matching["fixed_camera"] is True, matching
    assert 0.15 < results["fusion"].metrics["background_masked"] < 0.45, results["fusion"]


def placed_by_depth(first: np.ndarray, depth: np.ndarray, seen: np.ndarray) -> int:
    """How many of a photo's matches to frame 0 one pose explains (RANSAC PnP inliers at 3 px,
    calibrated lens) when frame 0's keypoints are lifted to 3D with `depth`."""
    rays = np.linalg.solve(COLOUR_K, np.vstack([first.T, np.ones(len(first))]))
    points = (rays * depth).T
    found, _, _, inliers = cv2.solvePnPRansac(
        points, seen, COLOUR_K, None, reprojectionError=3.0, iterationsCount=2000
    )
    return len(inliers) if found and inliers is not None else 0


def test_the_sensor_depth_explains_the_photos_better_than_a_flat_or_inverted_one(
    castel_photos: Path,
) -> None:
    """The ground truth the depth tests score against is the photos' own geometry: frame 0's
    SIFT keypoints lifted to 3D with the sensor's depth (as `sensor_depth` registers it)
    place later frames by their matches better than the same keypoints at one constant
    depth or with near and far swapped. Measured: 336 matches explained against 216
    (constant) and 223 (inverted) over frames 12-28."""
    sift = cv2.SIFT_create(8000)

    def features(frame: int) -> tuple[np.ndarray, np.ndarray]:
        image = cv2.imread(str(CASTEL / "castel" / f"image_{frame:04d}.pgm"), 0)
        keypoints, descriptors = sift.detectAndCompute(image, None)
        return np.array([k.pt for k in keypoints]), descriptors

    first, first_descriptors = features(0)
    truth = sensor_depth(0)
    # the sensor's depth at each keypoint: the median of a 3x3 window that is all valid and
    # lies on one surface (within 1 cm)
    lifted = np.zeros(len(first))
    for i, (u, v) in enumerate(np.rint(first).astype(int)):
        window = truth[max(0, v - 1) : v + 2, max(0, u - 1) : u + 2]
        window = window[window > 0]
        if len(window) >= 5 and np.ptp(window) < 0.01:
            lifted[i] = np.median(window)
    explained = {"sensor": 0, "constant": 0, "inverted": 0}
    for frame in (12, 16, 20, 24, 28):
        keypoints, descriptors = features(frame)
        pairs = cv2.BFMatcher().knnMatch(first_descriptors, descriptors, k=2)
        good = [a for a, b in pairs if a.distance < 0.75 * b.distance and lifted[a.queryIdx] > 0]
        ours = first[[m.queryIdx for m in good]]
        seen = keypoints[[m.trainIdx for m in good]]
        z = lifted[[m.queryIdx for m in good]]
        for name, depth in (
            ("sensor", z),
            ("constant", np.full_like(z, np.median(z))),
            ("inverted", z.max() + z.min() - z),
        ):
            explained[name] += placed_by_depth(ours, depth, seen)
    print(f"\nmatches explained over frames 12-28: {explained}")
    assert explained["sensor"] > 1.3 * max(explained["constant"], explained["inverted"])


def depth_scores(views: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float, float]:
    """Of (reconstructed depth, sensor depth) on the same pixels, per view: the median
    relative error after one scale, a constant depth's (the trivial answer, one depth per
    view at its best) on the same pixels, and the worst view's error as a share of its
    own constant's (a reconstruction must rise and fall where the sensor does in every
    view, which no constant can)."""
    ratios = [truth / depth for depth, truth in views]
    scale = np.median(np.concatenate(ratios))
    errors = [np.abs(r / scale - 1.0) for r in ratios]
    constants = [np.abs(truth / np.median(truth) - 1.0) for _, truth in views]
    worst = max(float(np.median(e) / np.median(c)) for e, c in zip(errors, constants, strict=True))
    return (
        float(np.median(np.concatenate(errors))),
        float(np.median(np.concatenate(constants))),
        worst,
    )


def test_depth_maps_agree_with_the_depth_sensor(
    castel: tuple[Path, dict[str, StageResult]],
) -> None:
    workspace, _ = castel
    maps = sorted((workspace / "stereo" / "stereo" / "depth_maps").glob("*.geometric.bin"))
    assert len(maps) == 15
    views, coverage = [], []
    for path in maps:
        depth = read_colmap_array(path)
        truth = sensor_depth(frame_of(path.name))
        truth = np.asarray(
            Image.fromarray(truth.astype(np.float32)).resize(depth.shape[::-1], Image.NEAREST)
        )
        ok = (depth > 0) & (truth > 0)
        # a depth for most of what the sensor sees in every view
        coverage.append(ok.sum() / max(1, (truth > 0).sum()))
        views.append((depth[ok], truth[ok]))
    print(f"\ncoverage of the sensor's depth per view: {np.round(coverage, 3).tolist()}")
    assert min(coverage) > MIN_DEPTH_COVERAGE, coverage
    error, baseline, worst = depth_scores(views)
    print(f"depth maps: error {error:.4f}, constant depth {baseline:.4f}, worst view {worst:.2f}")
    assert error < MAX_DEPTH_MAP_ERROR, error
    assert error < MAX_DEPTH_MAP_RATIO * baseline, (error, baseline)
    assert worst < MAX_VIEW_RATIO, worst


def test_mesh_agrees_with_the_depth_sensor(
    castel: tuple[Path, dict[str, StageResult]],
) -> None:
    """The coloured mesh, seen from every photo's camera (rays through each pixel, with the
    recovered lens), against the sensor's depth at that pixel: the castle covered, and the
    background that stood still left out."""
    workspace, _ = castel
    model = pycolmap.Reconstruction(str(workspace / "mapping" / "sparse" / "0"))
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.t.io.read_triangle_mesh(str(workspace / "color" / "mesh.ply")))
    rows, cols = np.mgrid[0:480, 0:640]
    pixels = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], axis=1).astype(np.float64)
    views, castle_coverage, background_coverage = [], [], []
    for image in model.images.values():
        camera = model.cameras[image.camera_id]
        rays_cam = np.concatenate([camera.cam_from_img(pixels), np.ones((len(pixels), 1))], 1)
        pose = image.cam_from_world().matrix()
        rotation, translation = pose[:, :3], pose[:, 3]
        directions = rays_cam @ rotation  # unnormalised: the hit distance is the depth
        origins = np.broadcast_to(-rotation.T @ translation, directions.shape)
        rays = o3d.core.Tensor(np.concatenate([origins, directions], 1).astype(np.float32))
        depth = scene.cast_rays(rays)["t_hit"].numpy().reshape(480, 640)
        truth = sensor_depth(frame_of(image.name))
        ok = np.isfinite(depth) & (truth > 0)
        castle = (truth > 0) & (truth < CASTLE_MAX_DEPTH_M)
        castle_coverage.append((ok & castle).sum() / max(1, castle.sum()))
        background = truth >= CASTLE_MAX_DEPTH_M
        background_coverage.append((ok & background).sum() / max(1, background.sum()))
        views.append((depth[ok], truth[ok]))
    print(f"\nmesh coverage of the castle per view: {np.round(castle_coverage, 3).tolist()}")
    print(f"and of the background: {np.round(background_coverage, 3).tolist()}")
    assert min(castle_coverage) > MIN_CASTLE_COVERAGE, castle_coverage
    assert max(background_coverage) < MAX_BACKGROUND_COVERAGE, background_coverage
    error, baseline, worst = depth_scores(views)
    print(f"mesh: error {error:.4f}, constant depth {baseline:.4f}, worst view {worst:.2f}")
    assert error < MAX_MESH_ERROR, error
    assert error < MAX_MESH_RATIO * baseline, (error, baseline)
    assert worst < MAX_VIEW_RATIO, worst


def test_glb_from_real_photos_loads_with_its_texture(
    castel: tuple[Path, dict[str, StageResult]],
) -> None:
    _, results = castel
    glb = next(e.path for e in results["export"].exports if e.format == "glb")
    mesh: Any = trimesh.load(glb, force="mesh")
    assert len(mesh.faces) > 10_000
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals)
    assert mesh.visual.uv.shape == (len(mesh.vertices), 2)
    texture = np.asarray(mesh.visual.material.baseColorTexture.convert("RGB"))
    assert texture.std() > 10  # the photos' colours, not one flat colour


@pytest.mark.parametrize("guided_cheap", [None, 0])
def test_medium_places_every_photo_with_the_calibrated_focal_length(
    castel_photos: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    guided_cheap: int | None,
) -> None:
    """The default preset ("medium": guided matching only where it pays) places every
    photo too, with the calibrated focal length. The castel photos have ~1,700 keypoints
    each, so all their pairs are cheap to match guided; with GUIDED_CHEAP at 0 they take
    the path photos with many keypoints take (a plain pass, guided matching only on
    weakly verified pairs), which must place every photo as well."""
    from pipeline.stages import matching

    if guided_cheap is not None:
        monkeypatch.setattr(matching, "GUIDED_CHEAP", guided_cheap)
    spec = JobSpec(project="castel", images=castel_photos, quality="medium", job_id="m")
    results = {}
    for name in ("ingest", "features", "matching", "mapping"):
        ctx = StageContext(spec=spec, workspace=tmp_path / "ws", results_dir=tmp_path / "r")
        results[name] = run_stage(name, ctx)
    mapping = results["mapping"].metrics
    assert mapping["registered"] == mapping["total"] == 15, mapping["unregistered"]
    assert mapping["mean_reprojection_error"] < MAX_REPROJECTION_PX
    focal = mapping["cameras"][0]["params"][0]
    assert abs(focal / COLOUR_K[0, 0] - 1.0) < MAX_FOCAL_ERROR, focal
