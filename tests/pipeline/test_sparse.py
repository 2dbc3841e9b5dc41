"""The sparse half of the real pipeline (ingest .. undistort) on the rendered demo scene,
checked against its ground truth."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap
import pytest
from PIL import Image

from pipeline import Cancelled, JobSpec, PermanentError, StageContext, StageResult, run_stage
from pipeline.presets import preset
from pipeline.stages import mapping, matching
from pipeline.stages._workspace import read_metrics
from pipeline.stages.features import camera_groups
from pipeline.stages.matching import choose_matcher, make_pairs
from pipeline.stages.undistort import MIN_STEREO_SIZE, stereo_size

Sparse = tuple[Path, dict[str, StageResult]]
MakeContext = Callable[..., StageContext]

# Measured on the demo scene: centre errors at most 0.04% of the scene size.
MAX_CENTRE_ERROR = 0.001  # of the scene size
MAX_REPROJECTION_ERROR = 1.5  # px


def test_every_image_registered(sparse_workspace: Sparse, ground_truth: dict[str, Any]) -> None:
    _, results = sparse_workspace
    n_images = len(ground_truth["images"])
    metrics = results["mapping"].metrics
    assert metrics["total"] == n_images
    assert metrics["registered"] == n_images, metrics["unregistered"]
    assert metrics["models"] == 1
    assert metrics["points"] > 1000
    assert 0 < metrics["mean_reprojection_error"] < MAX_REPROJECTION_ERROR


def test_camera_centres_match_ground_truth(
    sparse_workspace: Sparse, ground_truth: dict[str, Any]
) -> None:
    workspace, _ = sparse_workspace
    model = pycolmap.Reconstruction(workspace / "mapping" / "sparse" / "0")
    names = sorted(image.name for image in model.images.values())
    estimated = np.array([model.find_image_with_name(n).projection_center() for n in names])
    truth = np.array([ground_truth["images"][n]["centre"] for n in names])
    sim = pycolmap.estimate_sim3d(estimated, truth)
    assert sim is not None
    matrix = np.asarray(sim.matrix())
    aligned = estimated @ matrix[:, :3].T + matrix[:, 3]
    errors = np.linalg.norm(aligned - truth, axis=1)
    assert errors.max() < MAX_CENTRE_ERROR * ground_truth["scene_size"], errors
    # (the focal length is not checked here: these photos carry the exact value in EXIF,
    # so it would only echo the prior; test_variants.py checks it on photos without EXIF)


def test_features_share_one_camera_with_exif_prior(
    sparse_workspace: Sparse, ground_truth: dict[str, Any]
) -> None:
    workspace, results = sparse_workspace
    assert results["features"].metrics["cameras"] == 1
    images = json.loads((workspace / "ingest" / "images.json").read_text())["images"]
    assert len(images) == len(ground_truth["images"])
    for image in images:
        assert image["focal_px"] == pytest.approx(ground_truth["focal_px"], rel=1e-3)


def test_undistort_writes_a_dense_workspace(
    sparse_workspace: Sparse, ground_truth: dict[str, Any]
) -> None:
    workspace, results = sparse_workspace
    dense = workspace / "undistort"
    assert len(list((dense / "images").iterdir())) == len(ground_truth["images"])
    for name in ("cameras.bin", "images.bin", "points3D.bin"):
        assert (dense / "sparse" / name).is_file()
    for name in ("depth_maps", "normal_maps", "consistency_graphs"):
        assert (dense / "stereo" / name).is_dir()
    assert (dense / "stereo" / "patch-match.cfg").is_file()
    model = pycolmap.Reconstruction(dense / "sparse")
    metrics = results["undistort"].metrics
    assert metrics["stereo_size"] == 400  # low's cap; half of 640 px would be below the floor
    for camera in model.cameras.values():
        assert camera.model.name == "PINHOLE"
        assert max(camera.width, camera.height) <= metrics["stereo_size"]
    # nothing half-built is left beside the published folders
    assert not [p for p in workspace.iterdir() if p.name.startswith(".")]


def test_depth_maps_are_made_at_half_the_photos_size_within_floor_and_cap() -> None:
    assert stereo_size(1600, 3200) == 1600  # high on the photos it is meant for
    assert stereo_size(1600, 1600) == 800  # high on 1600 px photos: half, as medium
    assert stereo_size(800, 1600) == 800
    assert stereo_size(800, 1024) == MIN_STEREO_SIZE == 640  # half would be 512
    assert stereo_size(800, 640) == 640  # never below the floor, never above the photo
    assert stereo_size(800, 480) == 480
    assert stereo_size(400, 1600) == 400  # the cap wins over the floor
    assert stereo_size(0, 5000) == 2500  # no cap


def test_finished_stages_return_their_recorded_result(
    sparse_workspace: Sparse, stage_context: MakeContext
) -> None:
    workspace, results = sparse_workspace
    for name in ("ingest", "features", "matching", "mapping", "undistort"):
        ctx = stage_context(workspace, Path("/nonexistent"))  # inputs are not read again
        assert run_stage(name, ctx).metrics == results[name].metrics


def _copy_images(demo_scene: Path, dest: Path, count: int) -> list[Path]:
    dest.mkdir(parents=True)
    sources = sorted((demo_scene / "images").glob("*.jpg"))[:count]
    return [Path(shutil.copy(src, dest / src.name)) for src in sources]


def _unrelated_photos(folder: Path, count: int, seed: int) -> None:
    """`unrelated_<i>.jpg`: smooth noise, nothing in which matches any other photo."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        noise = rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
        Image.fromarray(noise).resize((640, 480), Image.Resampling.BICUBIC).save(
            folder / f"unrelated_{i}.jpg"
        )


def test_ingest_rejects_a_corrupt_image_naming_it(
    demo_scene: Path, tmp_path: Path, stage_context: MakeContext
) -> None:
    images = tmp_path / "photos"
    copies = _copy_images(demo_scene, images, 4)
    data = copies[0].read_bytes()
    (images / "broken photo.jpg").write_bytes(data[: len(data) // 3])  # truncated
    (images / "notes.txt").write_text("not an image, skipped")
    workspace = tmp_path / "ws"
    with pytest.raises(PermanentError) as info:
        run_stage("ingest", stage_context(workspace, images))
    assert "broken photo.jpg" in str(info.value)
    assert not (workspace / "ingest").exists()
    assert not [p for p in workspace.iterdir() if p.name.startswith(".ingest")]


def test_ingest_rejects_too_few_images(
    demo_scene: Path, tmp_path: Path, stage_context: MakeContext
) -> None:
    images = tmp_path / "photos"
    _copy_images(demo_scene, images, 2)
    with pytest.raises(PermanentError, match="at least 3"):
        run_stage("ingest", stage_context(tmp_path / "ws", images))


def test_ingest_resizes_mixed_sizes_and_scales_the_focal_prior(
    demo_scene: Path, tmp_path: Path, ground_truth: dict[str, Any], stage_context: MakeContext
) -> None:
    images = tmp_path / "photos"
    copies = _copy_images(demo_scene, images, 3)
    with Image.open(copies[0]) as im:  # a larger copy with its EXIF
        exif = im.getexif()
        im.resize((1280, 960)).save(images / "large.jpg", exif=exif)
    Image.open(copies[1]).save(images / "no_exif.png")  # PNG, no EXIF
    with Image.open(copies[2]) as im:  # stored sideways, EXIF says rotate 90 degrees
        exif = im.getexif()
        exif[0x0112] = 6
        im.save(images / "portrait.jpg", exif=exif)
    workspace = tmp_path / "ws"
    result = run_stage("ingest", stage_context(workspace, images))  # low: max side 800
    assert result.metrics["images"] == 6
    records = {
        r["name"]: r
        for r in json.loads((workspace / "ingest" / "images.json").read_text())["images"]
    }
    large = records["large.jpg"]
    assert (large["width"], large["height"]) == (800, 600)
    # the stale focal-plane resolution is ignored; the 35 mm equivalent (whole mm) is used
    assert large["focal_source"] == "exif_35mm"
    assert large["focal_px"] == pytest.approx(ground_truth["focal_px"] * 800 / 640, rel=2e-2)
    with Image.open(workspace / "ingest" / "images" / "large.jpg") as im:
        assert im.size == (800, 600)
    assert records["no_exif.png"]["focal_px"] is None
    portrait = records["portrait.jpg"]
    assert (portrait["width"], portrait["height"]) == (480, 640)
    assert portrait["focal_px"] == pytest.approx(ground_truth["focal_px"], rel=1e-3)
    with Image.open(workspace / "ingest" / "images" / "portrait.jpg") as im:
        assert im.size == (480, 640)
    groups = camera_groups(list(records.values()))
    assert sorted(len(g) for g in groups) == [1, 1, 1, 3]


def test_cancel_stops_features(
    demo_scene: Path, tmp_path: Path, stage_context: MakeContext
) -> None:
    workspace = tmp_path / "ws"
    run_stage("ingest", stage_context(workspace, demo_scene / "images"))
    reported: list[float] = []
    ctx = stage_context(
        workspace,
        demo_scene / "images",
        progress=lambda fraction, message: reported.append(fraction),
        cancelled=lambda: bool(reported),  # cancel once the first batch is done
    )
    with pytest.raises(Cancelled):
        run_stage("features", ctx)
    assert reported and max(reported) < 1.0
    assert not (workspace / "features").exists()
    assert not [p for p in workspace.iterdir() if p.name.startswith(".features")]


def test_features_number_the_photos_in_name_order_whichever_finishes_first(
    demo_scene: Path, tmp_path: Path, stage_context: MakeContext
) -> None:
    """Every other photo is a flat grey, extracted long before the textured one named just
    before it: the extractor's threads finish them out of order. Image ids (which order the
    pairs, the mapping and so the model) still follow the names."""
    images = tmp_path / "photos"
    images.mkdir()
    for i, src in enumerate(sorted((demo_scene / "images").glob("*.jpg"))[:6]):
        shutil.copy(src, images / f"photo_{2 * i:02d}.jpg")
        with Image.open(src) as im:  # the same camera, by its EXIF
            flat = Image.new("RGB", im.size, (128, 128, 128))
            flat.save(images / f"photo_{2 * i + 1:02d}.jpg", exif=im.getexif())
    workspace = tmp_path / "ws"
    for name in ("ingest", "features"):
        run_stage(name, stage_context(workspace, images))
    db = pycolmap.Database.open(workspace / "features" / "database.db")
    try:
        ids = {image.name: image.image_id for image in db.read_all_images()}
        frames = {data.id for frame in db.read_all_frames() for data in frame.data_ids}
        keypoints = {name: db.num_keypoints_for_image(i) for name, i in ids.items()}
    finally:
        db.close()
    assert [ids[name] for name in sorted(ids)] == list(range(1, 13)), ids
    assert frames == set(ids.values())  # one frame per photo, as the extractor writes
    assert all(keypoints[f"photo_{2 * i:02d}.jpg"] > 500 for i in range(6)), keypoints
    assert all(keypoints[f"photo_{2 * i + 1:02d}.jpg"] == 0 for i in range(6)), keypoints


def test_pair_selection() -> None:
    names = [f"img_{i:03d}.jpg" for i in range(100)]
    assert choose_matcher("auto", 40) == "exhaustive"
    assert choose_matcher("auto", 100) == "sequential+vocabtree"
    assert choose_matcher("vocabtree", 100) == "vocabtree"
    assert choose_matcher("sequential", 10) == "sequential"
    assert len(make_pairs(names[:10], "exhaustive")) == 45
    pairs = make_pairs(names, "sequential")
    assert len(pairs) == len(set(pairs))
    assert all(a < b for a, b in pairs)
    assert ("img_000.jpg", "img_099.jpg") in pairs  # the ring closes
    assert ("img_000.jpg", "img_050.jpg") not in pairs
    assert len(pairs) < len(names) * 20


def test_mapping_fails_clearly_when_too_few_images_register(
    demo_scene: Path, tmp_path: Path, stage_context: MakeContext
) -> None:
    images = tmp_path / "photos"
    _copy_images(demo_scene, images, 3)
    _unrelated_photos(images, 4, seed=1)
    workspace = tmp_path / "ws"
    for name in ("ingest", "features", "matching"):
        run_stage(name, stage_context(workspace, images))
    with pytest.raises(PermanentError) as info:
        run_stage("mapping", stage_context(workspace, images))
    assert "of 7 images" in str(info.value)
    assert info.value.hint and "overlap" in info.value.hint
    assert not (workspace / "mapping").exists()


def _centre_errors(model_dir: Path, truth: dict[str, Any]) -> np.ndarray:
    model = pycolmap.Reconstruction(model_dir)
    names = sorted(image.name for image in model.images.values() if image.name in truth)
    estimated = np.array([model.find_image_with_name(n).projection_center() for n in names])
    centres = np.array([truth[n]["centre"] for n in names])
    sim = pycolmap.estimate_sim3d(estimated, centres)
    assert sim is not None
    matrix = np.asarray(sim.matrix())
    return np.asarray(np.linalg.norm(estimated @ matrix[:, :3].T + matrix[:, 3] - centres, axis=1))


def test_auto_mapper_maps_big_sets_globally() -> None:
    assert mapping.auto_mapper(mapping.GLOBAL_FROM - 1) == "incremental"
    assert mapping.auto_mapper(mapping.GLOBAL_FROM) == "global"
    assert preset("medium").mapper == "auto"


def test_auto_maps_globally_and_incrementally_when_photos_stay_out(
    demo_scene: Path,
    ground_truth: dict[str, Any],
    tmp_path: Path,
    stage_context: MakeContext,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With `auto` choosing global mapping (GLOBAL_FROM lowered to this set's size), the
    16 demo photos are placed globally; two unrelated photos stay out, so incremental
    mapping runs too, and the model that places more photos is kept (global on a tie)."""
    images = tmp_path / "photos"
    _copy_images(demo_scene, images, len(ground_truth["images"]))
    _unrelated_photos(images, 2, seed=2)
    workspace = tmp_path / "ws"
    for name in ("ingest", "features", "matching"):
        run_stage(name, stage_context(workspace, images))
    monkeypatch.setattr(mapping, "GLOBAL_FROM", 18)
    with caplog.at_level("INFO", logger="pipeline"):
        metrics = run_stage("mapping", stage_context(workspace, images)).metrics
    assert "global mapping placed 16 of 18 images; mapping incrementally as well" in caplog.text
    assert (metrics["mapper"], metrics["registered"], metrics["total"]) == ("global", 16, 18)
    assert sorted(metrics["unregistered"]) == ["unrelated_0.jpg", "unrelated_1.jpg"]
    errors = _centre_errors(workspace / "mapping" / "sparse" / "0", ground_truth["images"])
    assert len(errors) == 16 and errors.max() < MAX_CENTRE_ERROR * ground_truth["scene_size"]


def test_vocabulary_tree_finds_the_neighbours_of_photos_in_no_order(
    demo_scene: Path,
    ground_truth: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The photos renamed in a random order, so names say nothing of where each was
    taken: the tree built from their own features must still pair each photo with the
    ones beside it, and those few pairs must be enough to place every photo."""
    images = tmp_path / "photos"
    images.mkdir()
    sources = sorted((demo_scene / "images").glob("*.jpg"))
    order = np.random.default_rng(3).permutation(len(sources))
    truth_of = {}
    for k, src in zip(order, sources, strict=True):
        shutil.copy(src, images / f"photo_{k:02d}.jpg")
        truth_of[f"photo_{k:02d}.jpg"] = np.array(ground_truth["images"][src.name]["centre"])
    retrieved = 4
    monkeypatch.setattr(matching, "RETRIEVED", retrieved)
    spec = JobSpec(
        project="shuffled", images=images, quality="low", options={"matcher": "vocabtree"}
    )
    workspace = tmp_path / "ws"
    results = {}
    for name in ("ingest", "features", "matching", "mapping"):
        ctx = StageContext(spec=spec, workspace=workspace, results_dir=tmp_path / "results")
        results[name] = run_stage(name, ctx)

    metrics = results["matching"].metrics
    assert metrics["matcher"] == "vocabtree"
    assert metrics["vocab_tree_words"] >= 256
    pairs = [
        line.split() for line in (workspace / "matching" / "pairs.txt").read_text().splitlines()
    ]
    n = len(sources)
    assert len(pairs) <= n * retrieved < n * (n - 1) // 2

    centre = np.mean(list(truth_of.values()), axis=0)

    def angle(a: str, b: str) -> float:
        u, v = truth_of[a] - centre, truth_of[b] - centre
        return float(np.degrees(np.arccos(np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v))))

    every_pair = [angle(a, b) for i, a in enumerate(truth_of) for b in list(truth_of)[i + 1 :]]
    chosen = [angle(a, b) for a, b in pairs]
    assert np.median(chosen) < 0.6 * np.median(every_pair), (chosen, np.median(every_pair))
    assert results["mapping"].metrics["registered"] == n


def _inliers(db_path: Path) -> dict[tuple[str, str], int]:
    db = pycolmap.Database.open(db_path)
    try:
        names = {image.image_id: image.name for image in db.read_all_images()}
        pair_ids, geometries = db.read_two_view_geometries()
    finally:
        db.close()
    counts = {}
    for pair_id, geometry in zip(pair_ids, geometries, strict=True):
        a, b = pycolmap.pair_id_to_image_pair(pair_id)
        counts[tuple(sorted((names[a], names[b])))] = len(geometry.inlier_matches)
    return counts


def _match_weak(sparse_workspace: Sparse, demo_scene: Path, tmp_path: Path) -> Path:
    """Run matching with guided_matching "weak" on a copy of the sparse workspace's
    features; returns the new workspace."""
    source, _ = sparse_workspace
    workspace = tmp_path / "ws"
    for name in ("ingest", "features"):
        shutil.copytree(source / name, workspace / name)
    spec = JobSpec(
        project="demo",
        images=demo_scene / "images",
        quality="low",
        options={"guided_matching": "weak"},
    )
    run_stage("matching", StageContext(spec=spec, workspace=workspace, results_dir=tmp_path / "r"))
    return workspace


@pytest.mark.parametrize("guided_below", [0, 10**6])
@pytest.mark.parametrize("guided_cheap", [0, 10**12])
def test_weak_pairs_are_matched_again_guided(
    sparse_workspace: Sparse,
    demo_scene: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    guided_below: int,
    guided_cheap: int,
) -> None:
    """guided_matching "weak": pairs cheap to match guided (every pair when GUIDED_CHEAP
    is huge) are matched guided at once; the others get a plain pass, then guided
    matching again on those verified with fewer than GUIDED_BELOW inliers (none at 0;
    every verified pair at a million). Guided matching keeps every pair verified and finds more
    inliers in all (so the weak pairs were matched again, not skipped as already done)."""
    source, results = sparse_workspace
    plain = _inliers(source / "matching" / "database.db")  # quality "low": no guided pass
    assert results["matching"].metrics["guided_pairs"] == 0
    monkeypatch.setattr(matching, "GUIDED_BELOW", guided_below)
    monkeypatch.setattr(matching, "GUIDED_CHEAP", guided_cheap)
    workspace = _match_weak(sparse_workspace, demo_scene, tmp_path)
    metrics = read_metrics(workspace, "matching")
    weak = _inliers(workspace / "matching" / "database.db")
    verified = {pair for pair, n in plain.items() if n > 0}
    assert metrics["guided_matching"] == "weak"
    # geometric verification is not bit-stable across runs (threads): a pair or two on the
    # edge of verification may go either way, so the sets are compared within that margin
    margin = max(2, len(verified) // 50)
    if guided_cheap:
        assert metrics["guided_pairs"] == metrics["pairs"]
    elif guided_below:
        assert abs(metrics["guided_pairs"] - len(verified)) <= margin
    else:
        assert metrics["guided_pairs"] == 0
    assert len({pair for pair, n in weak.items() if n > 0} ^ verified) <= margin
    if guided_below or guided_cheap:
        assert sum(weak.values()) > sum(plain.values())  # matched again, not skipped


@pytest.mark.parametrize("well_connected", [0, 10**6])
def test_weak_pairs_are_matched_guided_only_for_poorly_connected_photos(
    sparse_workspace: Sparse,
    demo_scene: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    well_connected: int,
) -> None:
    """A weak pair (verified with fewer than GUIDED_BELOW inliers) is matched again guided
    only if one of its photos has fewer than WELL_CONNECTED strong pairs: with 0 no photo
    is poorly connected and nothing is re-matched; with a million every photo is, and every
    weak pair is re-matched."""
    source, _ = sparse_workspace
    plain = _inliers(source / "matching" / "database.db")
    weak_before = [pair for pair, n in plain.items() if 0 < n < matching.GUIDED_BELOW]
    assert weak_before, "the demo ring has weak pairs (its far neighbours)"
    monkeypatch.setattr(matching, "GUIDED_CHEAP", 0)
    monkeypatch.setattr(matching, "WELL_CONNECTED", well_connected)
    workspace = _match_weak(sparse_workspace, demo_scene, tmp_path)
    metrics = read_metrics(workspace, "matching")
    if well_connected == 0:
        assert metrics["guided_pairs"] == 0
        inliers = matching.pair_inliers(workspace / "matching" / "database.db")
        assert matching.poorly_connected(inliers) == set()
    else:
        margin = max(2, len(weak_before) // 10)  # verification is not bit-stable (threads)
        assert abs(metrics["guided_pairs"] - len(weak_before)) <= margin, metrics


def test_weak_pairs_are_matched_guided_on_their_largest_keypoints(
    sparse_workspace: Sparse,
    demo_scene: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Guided matching again of a weak pair looks at the GUIDED_KEYPOINTS keypoints of
    largest scale of each photo (its memory grows with their product): with every
    verified pair weak and a cap of 80 % of the fewest keypoints a photo has, the pairs it
    improves gain inliers among those keypoints only, and every pair keeps at least the
    inliers of its plain pass."""
    source, _ = sparse_workspace
    plain = _inliers(source / "matching" / "database.db")
    cap = int(0.8 * min(matching.keypoint_counts(source / "matching" / "database.db").values()))
    for name, value in (("GUIDED_CHEAP", 0), ("GUIDED_BELOW", 10**6), ("GUIDED_KEYPOINTS", cap)):
        monkeypatch.setattr(matching, name, value)
    workspace = _match_weak(sparse_workspace, demo_scene, tmp_path)
    db_path = workspace / "matching" / "database.db"
    guided = _inliers(db_path)
    verified = [pair for pair, n in plain.items() if n > 0]
    assert read_metrics(workspace, "matching")["guided_pairs"] >= len(verified) - 2
    margin = max(2, len(verified) // 50)  # verification is not bit-stable (threads)
    assert sum(guided.get(pair, 0) < plain[pair] for pair in verified) <= margin
    improved = [pair for pair in verified if guided.get(pair, 0) > plain[pair]]
    assert len(improved) > len(verified) // 2, (len(improved), len(verified))
    db = pycolmap.Database.open(db_path)
    try:
        ids = {image.name: image.image_id for image in db.read_all_images()}
        largest = {
            name: set(matching.largest_keypoints(db.read_keypoints(i), cap).tolist())
            for name, i in ids.items()
        }
        for a, b in improved:
            found = db.read_two_view_geometry(ids[a], ids[b]).inlier_matches
            assert set(found[:, 0].tolist()) <= largest[a], (a, b)
            assert set(found[:, 1].tolist()) <= largest[b], (a, b)
    finally:
        db.close()


def test_guided_matching_choices_are_checked() -> None:
    from pipeline.presets import OPTION_CHOICES, PRESETS

    assert OPTION_CHOICES["guided_matching"] == ("off", "weak", "on")
    assert {p.guided_matching for p in PRESETS.values()} <= set(OPTION_CHOICES["guided_matching"])
