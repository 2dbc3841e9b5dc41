"""matching: match features between image pairs and verify them geometrically.

Reads `features/database.db`. Publishes `<workspace>/matching/`:

- `database.db`: a copy of the features database plus matches and two-view geometries;
- `pairs.txt`: the image pairs that were matched (COLMAP's "name1 name2" format);
- `metrics.json`.

Pair selection (preset `matcher`):

- `exhaustive`: every pair; `auto` picks it up to EXHAUSTIVE_MAX images.
- `sequential`: images in name order, each with its OVERLAP next neighbours plus
  neighbours at 2^k, and the order taken as a loop (photos walked around an object close
  the ring).
- `vocabtree`: image retrieval. A vocabulary tree is built from this project's own SIFT
  descriptors (no tree is downloaded: there may be no network), every image is indexed,
  and each is paired with the RETRIEVED images that look most like it. For photo sets in
  no particular order.
- `auto` above EXHAUSTIVE_MAX images: sequential and vocabtree pairs together, so photos
  taken in order and photos in any order both find their neighbours.
- `spatial` needs GPS priors, which are not read; it falls back to `auto`'s choice and
  says so in the metrics.

Pairs are matched in blocks so progress is real and a cancel stops within one block.
Guided matching (preset `guided_matching`) recovers matches the first pass misses on hard
pairs, at ~20x the CPU time of plain matching at 8,000 features; "weak" (the default) spends
it only where it pays: on pairs of images with few keypoints, where it is cheap, and on pairs
that a first, plain pass verified with few inliers, if one of their two photos is poorly
connected (fewer than WELL_CONNECTED strong pairs). A photo with enough strong pairs is
placed by them; more matches on its weak pairs cost time and place nothing. A weak pair is
matched again guided by the geometry its plain pass verified, on the GUIDED_KEYPOINTS
largest keypoints of each photo, which bounds its memory (on 8 photos of the hard demo
variant: a peak of 870 MB instead of 1,500 MB, 5.5 s instead of 7.5 s, cameras 4 % closer
to the truth than with all keypoints). On the hard demo variant at 64 photos of 1600 px,
every photo had 18 or more strong pairs after the plain pass, while re-matching its 151 weak
pairs guided took 60 % of the stage: WELL_CONNECTED spares that.

Photos of a subject moved before a fixed camera (a turntable) show a background that
stands still; when a quarter of the verified pairs show one, every pair is verified again
without the matches that do not move (pipeline/stages/_still.py), and a note says so;
the metric `fixed_camera` tells fusion to leave that background out too.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap

from pipeline.context import StageContext, StageResult
from pipeline.errors import PermanentError
from pipeline.presets import Preset
from pipeline.stages._common import (
    FEATURES_DB,
    MATCHING_DB,
    RANDOM_SEED,
    Timer,
    call_cancellable,
    colmap_device,
    require,
    stage_preset,
    thread_count,
)
from pipeline.stages._still import STILL_PAIRS, still_pairs, verify_without_still
from pipeline.stages._workspace import building, finished, record

NAME = "matching"
EXHAUSTIVE_MAX = 60  # images; above this exhaustive matching stops scaling on a CPU
OVERLAP = 12  # sequential neighbours on each side
MIN_BLOCK = 48  # pairs per matching call (at least; at most ~20 calls in all)
GUIDED_BELOW = 100  # inliers: pairs verified with fewer are weak, with more strong
WELL_CONNECTED = 4  # strong pairs: a photo with this many gains nothing from guided matching
# keypoints x keypoints: pairs up to this are matched guided at once (~0.5 s a pair on 2
# cores); guided matching costs ~20x plain matching at 8,000 x 8,000
GUIDED_CHEAP = 2500 * 2500
# CPU guided matching holds a keypoints x keypoints matrix per pair: measured 1,412 MB for
# one pair of 10,000 x 10,000 (the hard demo variant at 1600 px), about 14 bytes an entry.
# Weak pairs are matched again guided on at most this many keypoints of each photo, the
# largest in scale (as COLMAP's GPU matcher matches at most max_num_matches of them):
# 7,000 x 7,000 x 14 bytes is 654 MB, and the stage stays under 1 GB.
GUIDED_KEYPOINTS = 7000
RETRIEVED = 20  # images retrieved per image by the vocabulary tree
RETRIEVAL_FEATURES = 1000  # strongest features per image used to retrieve and re-rank
TREE_SAMPLES_PER_IMAGE = 2000  # descriptors per image the tree is built from,
TREE_MAX_SAMPLES = 100_000  # and in all
TREE_SAMPLES_PER_WORD = 50  # k-means needs a few dozen samples per visual word
TREE_WORDS = (256, 16384)  # visual words, at least and at most


def choose_matcher(requested: str, n_images: int) -> str:
    if requested in ("exhaustive", "sequential", "vocabtree"):
        return requested
    return "exhaustive" if n_images <= EXHAUSTIVE_MAX else "sequential+vocabtree"


def make_pairs(names: list[str], matcher: str) -> list[tuple[str, str]]:
    """Image pairs to match, each once, in a stable order."""
    names = sorted(names)
    n = len(names)
    index_pairs: set[tuple[int, int]] = set()
    if matcher == "exhaustive":
        index_pairs = {(i, j) for i in range(n) for j in range(i + 1, n)}
    else:
        offsets = set(range(1, OVERLAP + 1))
        k = 2 * OVERLAP
        while k < n:  # quadratic overlap: a few long-range links per image
            offsets.add(k)
            k *= 2
        for i in range(n):
            for d in offsets:
                if d >= n:
                    continue
                j = (i + d) % n  # wraps around: the photo sequence is treated as a loop
                index_pairs.add((min(i, j), max(i, j)))
    return [(names[i], names[j]) for i, j in sorted(index_pairs)]


def build_vocab_tree(db_path: Path, out: Path, threads: int) -> int:
    """A vocabulary tree from a sample of the database's SIFT descriptors, written to
    `out`. Returns its number of visual words."""
    rng = np.random.default_rng(0)
    db = pycolmap.Database.open(db_path)
    try:
        images = db.read_all_images()
        per_image = min(TREE_SAMPLES_PER_IMAGE, TREE_MAX_SAMPLES // max(1, len(images)))
        chunks = []
        for image in images:
            descriptors = np.asarray(db.read_descriptors(image.image_id).to_float().data)
            if len(descriptors) > per_image:
                pick = rng.choice(len(descriptors), per_image, replace=False)
                descriptors = descriptors[np.sort(pick)]
            chunks.append(descriptors)
    finally:
        db.close()
    samples = np.concatenate(chunks).astype(np.float32)
    words = int(np.clip(len(samples) // TREE_SAMPLES_PER_WORD, *TREE_WORDS))
    index = pycolmap.VisualIndex.create(samples.shape[1], 64)
    options = pycolmap.VisualIndex.BuildOptions()
    options.num_visual_words = words
    options.num_iterations = 20
    options.num_rounds = 1
    options.num_threads = threads
    index.build(
        options, pycolmap.FeatureDescriptorsFloat(pycolmap.FeatureExtractorType.SIFT, samples)
    )
    index.write(out)
    return int(index.num_visual_words())


def retrieval_pairs(db_path: Path, tree: Path, threads: int) -> list[tuple[str, str]]:
    """Each image with the RETRIEVED images most like it, each pair once, in a stable
    order: twice as many candidates are retrieved by the tree at `tree`, then re-ranked by
    how well the positions of their shared visual words agree. Without that re-ranking,
    which neighbours a small set finds varies from one tree to the next."""
    options = pycolmap.VocabTreePairingOptions()
    options.vocab_tree_path = str(tree)
    options.num_images = 2 * RETRIEVED + 1  # an image retrieves itself first
    options.num_images_after_verification = RETRIEVED + 1
    options.max_num_features = RETRIEVAL_FEATURES
    options.num_threads = threads
    db = pycolmap.Database.open(db_path)
    try:
        names = {image.image_id: image.name for image in db.read_all_images()}
        found = pycolmap.VocabTreePairGenerator(options, db).all_pairs()
    finally:
        db.close()
    pairs = {tuple(sorted((names[a], names[b]))) for a, b in found if a != b}
    return sorted((a, b) for a, b in pairs)


@dataclass
class Pairs:
    """The pairs to match and how they were chosen."""

    images: int
    matcher: str
    pairs: list[tuple[str, str]]
    tree_words: int | None = None  # visual words of the vocabulary tree, if one was built
    notes: list[str] = field(default_factory=list)


def select_pairs(ctx: StageContext, requested: str, db_path: Path, folder: Path) -> Pairs:
    """The image pairs to match, for the preset's `matcher`; a vocabulary tree, if one is
    needed, is built in `folder`."""
    names = image_names(db_path)
    chosen = Pairs(len(names), choose_matcher(requested, len(names)), pairs=[])
    if requested == "spatial":
        chosen.notes.append(
            f"matcher 'spatial' needs GPS priors, which are not read; used {chosen.matcher}"
        )
        ctx.log.warning("matching: %s", chosen.notes[-1])
    if chosen.matcher != "vocabtree":
        chosen.pairs = make_pairs(names, chosen.matcher)
    if "vocabtree" in chosen.matcher:
        threads = thread_count(ctx)
        ctx.progress(0.0, "building a vocabulary tree from the photos' features")
        tree = folder / "vocab_tree.bin"
        chosen.tree_words = call_cancellable(
            ctx,
            lambda _token: build_vocab_tree(db_path, tree, threads),
            abandon_on_cancel=True,  # k-means cannot be interrupted
        )
        ctx.progress(0.0, f"retrieving the {RETRIEVED} most similar photos of each")
        retrieved = call_cancellable(
            ctx,
            lambda _token: retrieval_pairs(db_path, tree, threads),
            abandon_on_cancel=True,
        )
        chosen.pairs = sorted(set(chosen.pairs) | set(retrieved))
    return chosen


def match_pairs(
    ctx: StageContext,
    settings: Preset,
    db_path: Path,
    pairs: list[tuple[str, str]],
    dev: pycolmap.Device,
) -> list[tuple[str, str]]:
    """Match and verify `pairs` into the database, in blocks (real progress, and a cancel
    stops within one block). Returns the pairs matched with guided matching: all of them
    for guided_matching "on", none for "off". For "weak", guided matching is spent where
    it pays: on pairs cheap to match guided (see split_by_cost), and on the others only
    if a plain pass verified them with few inliers (see weak_pairs)."""
    mode = settings.guided_matching
    if mode != "weak":
        options = matching_options(ctx, guided=mode == "on")
        _match_blocks(ctx, db_path, dev, pairs, options, 0.0, 1.0)
        return list(pairs) if mode == "on" else []
    counts = keypoint_counts(db_path)
    cheap, costly = split_by_cost(counts, pairs)
    guided = matching_options(ctx, guided=True)
    share = len(cheap) / max(1, len(pairs))
    _match_blocks(ctx, db_path, dev, cheap, guided, 0.0, share, what="matched (guided)")
    _match_blocks(ctx, db_path, dev, costly, matching_options(ctx, guided=False), share, 0.9)
    weak = weak_pairs(costly, pair_inliers(db_path))
    if weak:
        match_guided_again(ctx, db_path, dev, weak, 0.9, 1.0)
    ctx.progress(1.0, f"matched {len(pairs)} pairs, {len(cheap) + len(weak)} of them guided")
    return cheap + weak


def keypoint_counts(db_path: Path) -> dict[str, int]:
    db = pycolmap.Database.open(db_path)
    try:
        return {im.name: db.num_keypoints_for_image(im.image_id) for im in db.read_all_images()}
    finally:
        db.close()


def largest_keypoints(keypoints: np.ndarray, n: int) -> np.ndarray:
    """The indices, in order, of the `n` keypoints of largest scale (rows of COLMAP's
    x, y, a11, a12, a21, a22), or of all of them if there are no more than `n`."""
    if len(keypoints) <= n:
        return np.arange(len(keypoints))
    a = keypoints[:, 2:6].astype(np.float64)
    scale = np.hypot(a[:, 0], a[:, 2]) + np.hypot(a[:, 1], a[:, 3])
    return np.sort(np.argsort(-scale, kind="stable")[:n])


def match_guided_again(
    ctx: StageContext,
    db_path: Path,
    dev: pycolmap.Device,
    pairs: list[tuple[str, str]],
    start_fraction: float,
    end_fraction: float,
) -> None:
    """Match `pairs` again, guided by the geometry their plain pass verified, on the
    largest GUIDED_KEYPOINTS keypoints of each photo (see largest_keypoints), and keep the
    inliers found if there are more of them. One pair at a time, so a cancel stops
    within one pair; each photo's features are read once."""
    matcher = pycolmap.FeatureMatcher.create(matching_options(ctx, guided=True), dev)
    max_error = pycolmap.TwoViewGeometryOptions().ransac.max_error
    db = pycolmap.Database.open(db_path)
    try:
        images = {image.name: image for image in db.read_all_images()}
        cameras = {cam.camera_id: cam for cam in db.read_all_cameras()}

        @cache
        def features(name: str) -> tuple[np.ndarray, Any, Any]:
            image = images[name]
            rows = db.read_keypoints(image.image_id)
            chosen = largest_keypoints(rows, GUIDED_KEYPOINTS)
            keypoints = pycolmap.FeatureKeypoints(
                pycolmap.FeatureKeypoint(x=x, y=y, a11=a11, a12=a12, a21=a21, a22=a22)
                for x, y, a11, a12, a21, a22 in rows[chosen].tolist()
            )
            descriptors = db.read_descriptors(image.image_id)
            kept = pycolmap.FeatureDescriptors(descriptors.type, descriptors.data[chosen])
            return chosen, keypoints, kept

        span = end_fraction - start_fraction
        for done, (a, b) in enumerate(pairs, 1):
            ctx.check_cancelled()
            first, second = images[a], images[b]
            geometry = db.read_two_view_geometry(first.image_id, second.image_id)
            before = len(geometry.inlier_matches)
            chosen1, keypoints1, descriptors1 = features(a)
            chosen2, keypoints2, descriptors2 = features(b)
            matcher.match_guided(
                max_error,
                keypoints1,
                descriptors1,
                cameras[first.camera_id],
                keypoints2,
                descriptors2,
                cameras[second.camera_id],
                geometry,
            )
            found = np.asarray(geometry.inlier_matches)
            if len(found) > before:
                geometry.inlier_matches = np.stack(
                    [chosen1[found[:, 0]], chosen2[found[:, 1]]], axis=1
                ).astype(np.uint32)
                db.update_two_view_geometry(first.image_id, second.image_id, geometry)
            ctx.progress(
                start_fraction + span * done / len(pairs),
                f"guided matching {done}/{len(pairs)} pairs",
            )
    finally:
        db.close()


def split_by_cost(
    counts: dict[str, int], pairs: list[tuple[str, str]]
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The pairs cheap to match guided (their keypoint counts multiply to at most
    GUIDED_CHEAP: CPU guided matching compares every keypoint with every other), and the
    rest."""
    cheap = [(a, b) for a, b in pairs if counts[a] * counts[b] <= GUIDED_CHEAP]
    chosen = set(cheap)
    return cheap, [pair for pair in pairs if pair not in chosen]


def _match_blocks(
    ctx: StageContext,
    db_path: Path,
    dev: pycolmap.Device,
    pairs: list[tuple[str, str]],
    matching: pycolmap.FeatureMatchingOptions,
    start_fraction: float,
    end_fraction: float,
    what: str = "matched",
) -> None:
    verification = pycolmap.TwoViewGeometryOptions()
    verification.ransac.random_seed = RANDOM_SEED
    block_file = db_path.parent / "block.txt"
    matched = 0
    step = max(MIN_BLOCK, -(-len(pairs) // 20))
    span = end_fraction - start_fraction
    for start in range(0, len(pairs), step):
        block = pairs[start : start + step]
        _write_pairs(block_file, block)
        pairing = pycolmap.ImportedPairingOptions()
        pairing.match_list_path = block_file
        call_cancellable(ctx, partial(_match, db_path, matching, pairing, verification, dev))
        matched += len(block)
        ctx.progress(
            start_fraction + span * matched / max(1, len(pairs)),
            f"{what} {matched}/{len(pairs)} pairs",
        )
    block_file.unlink(missing_ok=True)


def pair_inliers(db_path: Path) -> dict[tuple[str, str], int]:
    """Inliers of every pair with a verified geometry in the database, by the pair's
    photo names (in name order)."""
    db = pycolmap.Database.open(db_path)
    try:
        names = {image.image_id: image.name for image in db.read_all_images()}
        pair_ids, geometries = db.read_two_view_geometries()
    finally:
        db.close()
    out: dict[tuple[str, str], int] = {}
    for pair_id, geometry in zip(pair_ids, geometries, strict=True):
        a, b = sorted(names[i] for i in pycolmap.pair_id_to_image_pair(pair_id))
        out[(a, b)] = len(geometry.inlier_matches)
    return out


def poorly_connected(inliers: dict[tuple[str, str], int]) -> set[str]:
    """The photos with fewer than WELL_CONNECTED strong pairs (verified with GUIDED_BELOW
    inliers or more), of those in `inliers` (see pair_inliers)."""
    strong = dict.fromkeys((name for pair in inliers for name in pair), 0)
    for pair, n in inliers.items():
        if n >= GUIDED_BELOW:
            for name in pair:
                strong[name] += 1
    return {name for name, n in strong.items() if n < WELL_CONNECTED}


def weak_pairs(
    pairs: list[tuple[str, str]], inliers: dict[tuple[str, str], int]
) -> list[tuple[str, str]]:
    """Of `pairs`, those verified with fewer than GUIDED_BELOW inliers, but at least one,
    that show a poorly connected photo: those are the pairs guided matching helps. A pair
    with no geometry at all gains nothing from it (guided matching searches along the
    geometry verification found), a pair with many inliers needs no more, and two
    well-connected photos are placed without it."""
    poorly = poorly_connected(inliers)
    return [
        (a, b)
        for a, b in pairs
        if (a in poorly or b in poorly)
        and 0 < inliers.get((min(a, b), max(a, b)), 0) < GUIDED_BELOW
    ]


def _match(
    db_path: Path,
    matching: pycolmap.FeatureMatchingOptions,
    pairing: pycolmap.ImportedPairingOptions,
    verification: pycolmap.TwoViewGeometryOptions,
    dev: pycolmap.Device,
    token: pycolmap.CancellationToken,
) -> None:
    pycolmap.match_image_pairs(
        db_path,
        matching_options=matching,
        pairing_options=pairing,
        verification_options=verification,
        device=dev,
        cancellation_token=token,
    )


def matching_options(
    ctx: StageContext, guided: bool, threads: int | None = None
) -> pycolmap.FeatureMatchingOptions:
    options = pycolmap.FeatureMatchingOptions()
    options.num_threads = thread_count(ctx) if threads is None else threads
    options.guided_matching = guided
    return options


def image_names(db_path: Path) -> list[str]:
    db = pycolmap.Database.open(db_path)
    try:
        return [image.name for image in db.read_all_images()]
    finally:
        db.close()


def count_verified(db_path: Path) -> int:
    """Pairs whose verified geometry has inliers."""
    return sum(1 for n in pair_inliers(db_path).values() if n > 0)


def run(ctx: StageContext) -> StageResult:
    done = finished(ctx, NAME)
    if done is not None:
        return done
    timer = Timer()
    source_db = require(ctx, FEATURES_DB)
    settings = stage_preset(ctx)
    dev, dev_name = colmap_device(ctx)
    with building(ctx, NAME) as tmp:
        db_path = tmp / MATCHING_DB[-1]
        shutil.copyfile(source_db, db_path)
        chosen = select_pairs(ctx, settings.matcher, db_path, tmp)
        _write_pairs(tmp / "pairs.txt", chosen.pairs)
        guided = match_pairs(ctx, settings, db_path, chosen.pairs, dev)
        still, fixed_camera = leave_out_still_background(ctx, db_path, chosen.notes)
        verified = count_verified(db_path)
        if verified == 0:
            raise PermanentError(
                "no two photos could be matched",
                hint="photos must overlap (neighbouring photos share 60-80% of the view) "
                "and show a textured, static subject",
            )
        result = StageResult(
            metrics={
                "matcher": chosen.matcher,
                "images": chosen.images,
                "pairs": len(chosen.pairs),
                "verified_pairs": verified,
                "vocab_tree_words": chosen.tree_words,
                "guided_matching": settings.guided_matching,
                "guided_pairs": len(guided),
                "still_background_pairs": still,
                "fixed_camera": fixed_camera,
                "notes": chosen.notes,
                "seconds": timer.seconds,
            },
            device=dev_name,
        )
        record(tmp, result)
    return result


def leave_out_still_background(
    ctx: StageContext, db_path: Path, notes: list[str]
) -> tuple[int, bool]:
    """Photos of a subject moved before a fixed camera: verify every pair again without the
    matches on the background that stood still (see _still). The pairs that showed one,
    and whether the photos were taken so."""
    still, counted = still_pairs(db_path)
    if not counted or still < STILL_PAIRS * counted:
        return still, False
    ctx.progress(1.0, f"the background stands still in {still} of {counted} pairs")
    before, after = verify_without_still(db_path)
    notes.append(
        f"the background stood still in {still} of {counted} pairs of photos (a fixed "
        f"camera, the subject moving): verified again without the matches that stand "
        f"still, {after} of {before} inliers remain; fusion leaves that background out"
    )
    ctx.log.warning("matching: %s", notes[-1])
    return still, True


def _write_pairs(path: Path, pairs: list[tuple[str, str]]) -> None:
    path.write_text("".join(f"{a} {b}\n" for a, b in pairs))
