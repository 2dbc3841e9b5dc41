"""The real pipeline (quality "low", 16 photos) on each harder demo variant, with bars
of its own: every photo registered in one model, camera centres against the truth, the
lens (focal length without EXIF, radial distortion), the object's F-score at 1 % of its
own box diagonal, and how far the sparse points lie from the true surface along each
photo's rays. Each bar sits just past what was measured (figures beside it), so a real
regression fails. The easy scene is covered by test_sparse.py and test_dense.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest
from variant_runs import IMAGES, run_variant

from pipeline.demo import IMAGE_SET


class Bars(NamedTuple):
    centre: float  # max camera centre error, as a share of the scene size
    object_f: float  # min object F-score
    scene_f: float  # min scene F-score
    depth: float = 0.001  # max median depth error along the photos' rays (depth_errors)
    focal: float = 0.005  # max relative focal length error


# Measured (centre error max, object F, scene F, depth error) on 2 cores:
#   distortion 0.00052 0.975 0.992 0.0003; no-exif 0.00032 0.973 0.991 0.0003; exposure
#   0.00030 0.974 0.991 0.0004; specular 0.00045 0.974 0.991 0.0004; blur 0.00039 0.973
#   0.990 0.0003; handheld 0.00047 0.966 0.985 0.0005; photo (resized to 800 px by "low")
#   0.00075 0.938 0.981 0.0003; hard (also 800 px) 0.00022 0.899 0.979 0.0002; arc 0.00021
#   0.815-0.821 0.915-0.918 0.0088-0.0092, focal 0.0052-0.0059 (a constant depth: 0.16);
#   turntable 0.00026 0.974 0.906 0.0003, every pair showing the backdrop still, 38 % of
#   each photo masked as still backdrop for fusion (without the masks: object F 0.703,
#   precision 0.55, the backdrop's depth left fragments round the objects). The
#   focal length errs at most 0.0011 elsewhere (no EXIF: 0.0010, hard 0.0002).
BARS: dict[str, Bars] = {
    "distortion": Bars(0.0012, 0.95, 0.97),
    "no-exif": Bars(0.0012, 0.95, 0.97),
    "exposure": Bars(0.0012, 0.95, 0.97),
    "specular": Bars(0.0012, 0.95, 0.97),
    "blur": Bars(0.0012, 0.95, 0.97),
    "handheld": Bars(0.0012, 0.945, 0.965),
    "photo": Bars(0.0015, 0.92, 0.96),
    "hard": Bars(0.0006, 0.87, 0.96),
    # a fifth of the distance, as castel's hand-held video (tests/pipeline/test_real_photos)
    "arc": Bars(0.0005, 0.79, 0.89, depth=0.012, focal=0.008),
    # cameras as exact as the easy scene's; object precision 0.994, recall 0.953; the scene
    # F-score is lower than the others' with or without masks (0.902 without): the plate's
    # far side, seen at a grazing angle, has few keypoints and little depth
    "turntable": Bars(0.0006, 0.95, 0.89),
}
MAX_K1_ERROR = 0.008  # measured |k1 - truth| at most 0.0050 (arc; photo 0.0039)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BARS))
def test_variant_reconstructs_within_its_bars(
    name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    if name in ("photo", "hard") and not IMAGE_SET.is_dir():
        pytest.skip(f"{IMAGE_SET} is missing: install Debian's visp-images-data")
    bars = BARS[name]
    figures = run_variant(tmp_path_factory.mktemp(name), name)
    print(f"\n{name}: {json.dumps(figures)}")
    assert figures["registered"] == figures["total"] == IMAGES, figures
    assert figures["models"] == 1
    # only a fixed camera's photos show a background that stands still (without leaving
    # its matches out, mapping placed none of the turntable's photos), and fusion leaves
    # it out of the dense cloud through masks
    if name == "turntable":
        assert figures["still_background_pairs"] > 0.9 * figures["pairs"], figures
        assert 0.25 < figures["background_masked"] < 0.5, figures  # the backdrop: 0.38
    else:
        assert figures["still_background_pairs"] == 0, figures
        assert figures["background_masked"] is None, figures
    assert figures["centre_error_max"] < bars.centre, figures
    # no EXIF in "no-exif" and "hard": the focal length is found, not read
    assert figures["focal_error"] < bars.focal, figures
    assert abs(figures["k1"] - figures["k1_truth"]) < MAX_K1_ERROR, figures
    assert figures["object"]["fscore"] >= bars.object_f, figures
    assert figures["scene_fscore"] >= bars.scene_f, figures
    # the points' depth, against a constant depth per photo (0.07-0.16 here)
    assert figures["depth_error"] < bars.depth, figures
    assert figures["depth_error"] < 0.1 * figures["depth_error_constant"], figures


def test_variants_change_what_they_say(tmp_path: Path) -> None:
    """Each variant's photos really differ from the easy scene's in its own way (small
    renders, two views): no EXIF where promised, other pixels where promised."""
    import numpy as np
    from PIL import Image

    from pipeline.demo import render_scene

    def render(variant: str) -> tuple[dict, list[np.ndarray], list[Image.Exif]]:
        info = render_scene(tmp_path / variant, n_images=2, size=(160, 120), variant=variant)
        files = sorted((tmp_path / variant / "images").glob("*.jpg"))
        ims = [Image.open(f) for f in files]
        return info, [np.asarray(im, dtype=np.float64) for im in ims], [im.getexif() for im in ims]

    easy_info, easy, easy_exif = render("easy")
    assert all(e.get(0x010F) == "dropmesh" for e in easy_exif)
    for variant in (
        "distortion",
        "no-exif",
        "exposure",
        "specular",
        "blur",
        "handheld",
        "arc",
        "turntable",
    ):
        info, pixels, exif = render(variant)
        assert info["variant"]["name"] == variant
        moved = [np.abs(a - b).mean() for a, b in zip(pixels, easy, strict=True)]
        if variant == "no-exif":
            assert not any(e.get(0x010F) for e in exif)
            assert max(moved) < 1.0  # the same pixels
        else:
            assert min(moved) > 1.0, (variant, moved)
    assert render("distortion")[0]["params"][3] < 0
    with pytest.raises(ValueError, match="unknown demo variant 'fisheye'"):
        render_scene(tmp_path / "x", n_images=1, variant="fisheye")


# Measured SIFT keypoints per 1600x1200 view (pycolmap, up to 30,000 features, views 0-3):
# photo 10,970 / 9,222 / 9,330; hard 8,453 / 13,949 / 7,895 / 9,075 (median 8,764).
MIN_MEDIAN_KEYPOINTS = 8000


@pytest.mark.slow
@pytest.mark.parametrize("name", ["photo", "hard"])
def test_photo_textures_give_real_photo_keypoint_counts(name: str, tmp_path: Path) -> None:
    """At 1600 px a view of the photo-textured variants gives as many SIFT keypoints as a
    real photo does (8,000+), so speed measured on them is measured on real work."""
    import numpy as np
    import pycolmap

    from pipeline.demo import render_scene

    if not IMAGE_SET.is_dir():
        pytest.skip(f"{IMAGE_SET} is missing: install Debian's visp-images-data")
    render_scene(tmp_path / "scene", n_images=4, variant=name)
    options = pycolmap.FeatureExtractionOptions()
    options.max_image_size = 1600
    options.sift.max_num_features = 30000
    db = tmp_path / "db.db"
    pycolmap.extract_features(
        db, tmp_path / "scene" / "images", extraction_options=options, device=pycolmap.Device.cpu
    )
    with pycolmap.Database.open(str(db)) as database:
        counts = [
            database.read_keypoints(im.image_id).shape[0] for im in database.read_all_images()
        ]
    print(f"\n{name}: keypoints per view {counts}")
    assert np.median(counts) >= MIN_MEDIAN_KEYPOINTS, counts
