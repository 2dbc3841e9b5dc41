"""The whole pipeline on real photos: ViSP's "castel" sequence, a painted model castle on a
cluttered desk filmed by a hand-held Intel RealSense (Debian's `visp-images-data`, GPL-2,
installed by `make test`).

The sequence has what the rendered demo scene lacks: sensor noise, blur, lighting that
changes with the view, no EXIF, and a short, curved camera path. It also has ground
truth of its own: the colour camera's calibrated focal length, and a depth-sensor frame
registered to every photo. The reconstruction lives in an arbitrary scale, so depths are
compared after one scale factor (the median ratio over all the views).
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
from castel_photos import CASTEL
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

# Measured on this sequence at quality "low" (focal 575 px, depth maps 5.7 % and mesh
# 6.9 % median relative error); the bounds leave room for run-to-run variation.
MAX_FOCAL_ERROR = 0.10
MAX_REPROJECTION_PX = 1.5
MAX_DEPTH_MAP_ERROR = 0.07
MAX_MESH_ERROR = 0.075
# The same error as a share of a constant depth's on the same pixels (about 6 % here).
MAX_DEPTH_MAP_RATIO = 0.8
MAX_MESH_RATIO = 0.9
# Per view, Pearson correlation of the reconstructed depth with the sensor's.
MIN_DEPTH_CORRELATION = 0.5
# Share of the sensor's valid pixels that get a fused depth, in the worst view.
# Measured: at least 0.40 (depth maps) and 0.73 (mesh) of the sensor's pixels in every view.
MIN_DEPTH_COVERAGE = 0.35
MIN_MESH_COVERAGE = 0.65


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


def relative_errors(ratios: list[np.ndarray]) -> np.ndarray:
    """|depth / truth - 1| after the one scale that best maps the reconstruction onto the
    sensor (the median ratio)."""
    r = np.concatenate(ratios)
    scale = np.median(r)
    out: np.ndarray = np.abs(r / scale - 1.0)
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


DEPTH_FINDING = (
    "the reconstruction is tilted about the camera's horizontal axis: its depth grows down "
    "the image (+0.70 with the row) while the sensor's falls (-0.44), so against the sensor "
    "it correlates at about -0.45 per view and a constant depth scores as well (5.8 % "
    "against 5.7 %): the top of the view (the box behind the castle, the tower's roof) comes "
    "out far too near. The sensor's depth is the photos' geometry (it explains 1.5 times the "
    "matches a constant or inverted depth explains: the test above), so the tilt is the "
    "reconstruction's; yet bundle adjustment started from poses found against the sensor's "
    "depth, with the calibrated lens held fixed, ends in the same tilted model (1.21 px RMS "
    "either way), and 30 frames, quality medium, the global mapper and other initial pairs "
    "all tilt the same way. The hand-held camera moves only 66 mm over the 30 frames, about "
    "a fifth of the distance to the castle, but that alone does not tilt the pipeline: the "
    "demo scene filmed along such an arc (variant 'arc', test_variants.py) gets its depth "
    "within 0.9 %. Nor do distortion models: OPENCV or FULL_OPENCV, principal point free, "
    "leave the sparse depth correlating at -0.26 to -0.42 with the sensor's. Nor can a "
    "rolling shutter make frame 0's depth rise 40 % from its top rows to its bottom ones: "
    "the camera moves at most 5 % of its path between two frames"
)


@pytest.mark.xfail(strict=True, reason=DEPTH_FINDING)
def test_depth_maps_agree_with_the_depth_sensor(
    castel: tuple[Path, dict[str, StageResult]],
) -> None:
    workspace, _ = castel
    maps = sorted((workspace / "stereo" / "stereo" / "depth_maps").glob("*.geometric.bin"))
    assert len(maps) == 15
    ratios, constant, coverage, correlation = [], [], [], []
    for path in maps:
        depth = read_colmap_array(path)
        truth = sensor_depth(frame_of(path.name))
        truth = np.asarray(
            Image.fromarray(truth.astype(np.float32)).resize(depth.shape[::-1], Image.NEAREST)
        )
        ok = (depth > 0) & (truth > 0)
        # a depth for most of what the sensor sees in every view
        coverage.append(ok.sum() / max(1, (truth > 0).sum()))
        ratios.append(truth[ok] / depth[ok])
        constant.append(truth[ok])  # the trivial answer: one depth everywhere
        correlation.append(float(np.corrcoef(depth[ok], truth[ok])[0, 1]))
    print(f"\ncoverage of the sensor's depth per view: {np.round(coverage, 3).tolist()}")
    assert min(coverage) > MIN_DEPTH_COVERAGE, coverage
    error = np.median(relative_errors(ratios))
    # the trivial answer, a constant depth at its best scale, on the same pixels: the scene
    # lies at nearly one depth, so it scores about 6 %, below the absolute bar; only the
    # ratio and the correlation tell a real reconstruction from it
    baseline = np.median(relative_errors(constant))
    print(
        f"depth maps: error {error:.4f}, constant depth {baseline:.4f}, correlation {correlation}"
    )
    # depth must rise and fall where the sensor's does (a constant cannot)
    assert min(correlation) > MIN_DEPTH_CORRELATION, correlation
    assert error < MAX_DEPTH_MAP_ERROR, error
    assert error < MAX_DEPTH_MAP_RATIO * baseline, (error, baseline)


@pytest.mark.xfail(strict=True, reason=DEPTH_FINDING)
def test_mesh_agrees_with_the_depth_sensor(
    castel: tuple[Path, dict[str, StageResult]],
) -> None:
    """The coloured mesh, seen from every photo's camera (rays through each pixel, with the
    recovered lens), against the sensor's depth at that pixel."""
    workspace, _ = castel
    model = pycolmap.Reconstruction(str(workspace / "mapping" / "sparse" / "0"))
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.t.io.read_triangle_mesh(str(workspace / "color" / "mesh.ply")))
    rows, cols = np.mgrid[0:480, 0:640]
    pixels = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], axis=1).astype(np.float64)
    ratios, constant, coverage, correlation = [], [], [], []
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
        coverage.append(ok.sum() / max(1, (truth > 0).sum()))
        ratios.append(truth[ok] / depth[ok])
        constant.append(truth[ok])
        correlation.append(float(np.corrcoef(depth[ok], truth[ok])[0, 1]))
    print(f"\nmesh coverage of the sensor's depth per view: {np.round(coverage, 3).tolist()}")
    assert min(coverage) > MIN_MESH_COVERAGE, coverage
    error = np.median(relative_errors(ratios))
    baseline = np.median(relative_errors(constant))
    print(f"mesh: error {error:.4f}, constant depth {baseline:.4f}, correlation {correlation}")
    assert min(correlation) > MIN_DEPTH_CORRELATION, correlation
    assert error < MAX_MESH_ERROR, error
    assert error < MAX_MESH_RATIO * baseline, (error, baseline)


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
