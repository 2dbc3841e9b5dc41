"""Fixtures for the real-pipeline tests: a small rendered demo scene with ground truth,
a workspace where the sparse stages (ingest .. undistort) have run on it once, and the
whole pipeline run once on real photos (ViSP's castel sequence)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from castel_photos import CASTEL, STEP
from PIL import Image

from pipeline import STAGES, JobSpec, StageContext, StageResult, run_stage
from pipeline.demo import render_scene

DEMO_IMAGES = 16
DEMO_SIZE = (640, 480)
SPARSE_STAGES = ("ingest", "features", "matching", "mapping", "undistort")


@pytest.fixture(scope="session")
def demo_scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rendered demo scene: `images/*.jpg`, `ground_truth/{mesh,object}.ply`,
    `ground_truth/cameras.json`. Shared by every test in the session: read only."""
    out = tmp_path_factory.mktemp("demo_scene")
    render_scene(out, n_images=DEMO_IMAGES, size=DEMO_SIZE, seed=0)
    return out


@pytest.fixture(scope="session")
def ground_truth(demo_scene: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((demo_scene / "ground_truth" / "cameras.json").read_text())
    return data


def make_context(workspace: Path, images: Path, **kwargs: Any) -> StageContext:
    spec = JobSpec(project="demo", images=images, quality=kwargs.pop("quality", "low"))
    return StageContext(spec=spec, workspace=workspace, results_dir=workspace / "results", **kwargs)


@pytest.fixture(scope="session")
def stage_context() -> Callable[..., StageContext]:
    """`stage_context(workspace, images, **StageContext fields)`: a context for quality
    "low" (quality=... overrides)."""
    return make_context


@pytest.fixture(scope="session")
def sparse_workspace(
    demo_scene: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, StageResult]]:
    """A workspace where ingest, features, matching, mapping and undistort have run on the
    demo scene (quality "low"). Returns the workspace and each stage's result."""
    workspace = tmp_path_factory.mktemp("sparse_workspace")
    results = {}
    for name in SPARSE_STAGES:
        results[name] = run_stage(name, make_context(workspace, demo_scene / "images"))
    return workspace, results


@pytest.fixture(scope="session")
def castel_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The photos as JPEGs, as a user would drop them."""
    if not (CASTEL / "castel").is_dir():
        reason = f"{CASTEL} is missing: install Debian's visp-images-data (make test does)"
        if os.environ.get("DROPMESH_REQUIRE_REAL_PHOTOS"):
            pytest.fail(f"DROPMESH_REQUIRE_REAL_PHOTOS is set, but {reason}")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("castel")
    images = root / "photos"
    images.mkdir()
    for pgm in sorted((CASTEL / "castel").glob("image_*.pgm"))[::STEP]:
        Image.open(pgm).save(images / f"{pgm.stem}.jpg", quality=95)
    return images


@pytest.fixture(scope="session")
def castel(castel_photos: Path) -> tuple[Path, dict[str, StageResult]]:
    """A workspace where every stage has run on the photos at quality "low". Read only:
    shared by the tests on real photos and the texture's held-out check."""
    images = castel_photos
    root = images.parent
    workspace = root / "workspace"
    spec = JobSpec(project="castel", images=images, quality="low", job_id="real")
    results = {}
    for name in STAGES:
        ctx = StageContext(spec=spec, workspace=workspace, results_dir=root / "results")
        results[name] = run_stage(name, ctx)
    return workspace, results
