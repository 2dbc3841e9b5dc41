"""The helpers every stage shares (pipeline/stages/_common.py), the CPU stereo
engine's thread pool and the still background's masks (pipeline/stages/_still.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline import Cancelled, JobSpec, PermanentError, StageContext
from pipeline.devices import CudaSupport
from pipeline.stages._common import (
    FUSED_CLOUD,
    choose_device,
    require,
    thread_count,
)
from pipeline.stages._still import background_mask
from pipeline.stages.stereo.cpu import parallel


def _ctx(tmp_path: Path, **kwargs: Any) -> StageContext:
    spec = JobSpec(project="p", images=tmp_path / "images")
    return StageContext(
        spec=spec, workspace=tmp_path / "ws", results_dir=tmp_path / "results", **kwargs
    )


def test_require_names_the_missing_output_and_the_stage(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    with pytest.raises(PermanentError, match="fused.ply is missing") as info:
        require(ctx, FUSED_CLOUD)
    assert info.value.hint == "the fusion stage must finish first"
    path = ctx.workspace.joinpath(*FUSED_CLOUD)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"ply\n")
    assert require(ctx, FUSED_CLOUD) == path


def test_thread_count_is_a_count(tmp_path: Path) -> None:
    assert thread_count(_ctx(tmp_path, threads=3)) == 3
    assert thread_count(_ctx(tmp_path)) == len(os.sched_getaffinity(0))


def test_device_choice(tmp_path: Path) -> None:
    assert choose_device("cpu") == "cpu"  # without asking for a GPU
    with pytest.raises(PermanentError, match="unknown device 'tpu'"):
        choose_device("tpu")


def test_cuda_support_says_why_there_is_no_gpu() -> None:
    assert CudaSupport(built=False, devices=0).why_not == "this pycolmap build has no CUDA support"
    assert CudaSupport(built=True, devices=0).why_not == "no CUDA device is visible"
    assert CudaSupport(built=True, devices=1).why_not == ""


def test_parallel_returns_every_result_by_item(tmp_path: Path) -> None:
    counts: list[int] = []
    results = parallel(_ctx(tmp_path), range(20), lambda i: i * i, 3, counts.append)
    assert results == {i: i * i for i in range(20)}
    assert counts == list(range(1, 21))


def test_parallel_stops_on_cancel(tmp_path: Path) -> None:
    started: list[int] = []

    def work(i: int) -> int:
        started.append(i)
        time.sleep(0.05)
        return i

    ctx = _ctx(tmp_path, cancelled=lambda: True)
    with pytest.raises(Cancelled):
        parallel(ctx, range(100), work, 2, lambda done: None)
    assert 0 < len(started) <= 8  # the first few, not the other ~90


def test_guided_matching_keeps_the_largest_keypoints() -> None:
    """Guided matching of many keypoints keeps the n of largest scale (from the affine
    shape: a keypoint of scale s has a11 = a22 = s cos t, a21 = -a12 = s sin t), in their
    order; n or fewer are all kept."""
    from pipeline.stages.matching import largest_keypoints

    rng = np.random.default_rng(0)
    scale, angle = rng.uniform(1, 20, 500), rng.uniform(-np.pi, np.pi, 500)
    cos, sin = scale * np.cos(angle), scale * np.sin(angle)
    rows = np.stack([rng.uniform(0, 99, 500), rng.uniform(0, 99, 500), cos, -sin, sin, cos], 1)
    kept = largest_keypoints(rows.astype(np.float32), 100)
    assert list(kept) == sorted(kept) and len(kept) == 100
    assert set(kept) == set(np.argsort(-scale)[:100])
    assert list(largest_keypoints(rows, 500)) == list(range(500))
    assert list(largest_keypoints(rows[:3], 100)) == [0, 1, 2]


def test_background_mask_follows_the_nearest_keypoint() -> None:
    rng = np.random.default_rng(0)
    still = rng.uniform([0, 0], [40, 60], (50, 2))  # a wall on the left
    subject = rng.uniform([60, 0], [100, 60], (50, 2))  # the subject on the right
    lone = np.array([[90.0, 30.0]])  # a still keypoint among the subject's
    mask = background_mask(np.vstack([still, lone]), subject, 100, 60)
    assert mask.shape == (60, 100)
    assert mask[:, :40].all() and not mask[:, 60:75].any()
    # the lone keypoint masks only what lies nearer to it than to the subject's
    assert mask[30, 90] and 0 < mask[:, 60:].mean() < 0.05
    assert not background_mask(np.zeros((0, 2)), subject, 100, 60).any()
    assert background_mask(still, np.zeros((0, 2)), 100, 60).all()
