"""The stage table. Names are shared by the ledger, the CLI and the tests."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from pipeline.context import (
    CancelledFn,
    JobSpec,
    ProgressFn,
    StageContext,
    StageResult,
    _never,
    _no_progress,
)

STAGES: tuple[str, ...] = (
    "ingest",
    "features",
    "matching",
    "mapping",
    "undistort",
    "stereo",
    "fusion",
    "meshing",
    "color",
    "export",
)


def stage_function(name: str) -> Callable[[StageContext], StageResult]:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    module = importlib.import_module(f"pipeline.stages.{name}")
    fn: Callable[[StageContext], StageResult] = module.run
    return fn


def run_stage(name: str, ctx: StageContext) -> StageResult:
    """Run one stage. Safe to call again after a crash: stages skip finished work."""
    return stage_function(name)(ctx)


def run(
    spec: JobSpec,
    workspace: Path,
    progress: ProgressFn = _no_progress,
    cancelled: CancelledFn = _never,
    *,
    results_dir: Path | None = None,
    device: str = "auto",
) -> dict[str, StageResult]:
    """Run every stage in this process (for scripts and benchmarks; the daemon runs
    each stage in its own child process instead)."""
    results: dict[str, StageResult] = {}
    for i, name in enumerate(STAGES):

        def stage_progress(f: float, m: str, i: int = i) -> None:
            progress((i + f) / len(STAGES), m)

        ctx = StageContext(
            spec=spec,
            workspace=workspace,
            results_dir=results_dir or workspace / "results",
            progress=stage_progress,
            cancelled=cancelled,
            device=device,
        )
        results[name] = run_stage(name, ctx)
    return results
