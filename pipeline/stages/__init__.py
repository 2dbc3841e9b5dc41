"""The stage table: every fact about a stage that other modules need lives here.

Names are shared by the ledger, the CLI, the daemon and the tests; `uses_gpu` tells the
daemon which stages need its one GPU slot; `weight` is a stage's rough share of a job's
time, for the overall progress figure and the ETA.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
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
from pipeline.stages._workspace import remove_stage_outputs


@dataclass(frozen=True)
class StageInfo:
    name: str
    uses_gpu: bool
    weight: int


STAGE_TABLE: tuple[StageInfo, ...] = (
    StageInfo("ingest", uses_gpu=False, weight=2),
    StageInfo("features", uses_gpu=True, weight=10),
    StageInfo("matching", uses_gpu=True, weight=12),
    StageInfo("mapping", uses_gpu=False, weight=12),
    StageInfo("undistort", uses_gpu=False, weight=3),
    StageInfo("stereo", uses_gpu=True, weight=35),
    StageInfo("fusion", uses_gpu=False, weight=8),
    StageInfo("meshing", uses_gpu=False, weight=10),
    StageInfo("color", uses_gpu=False, weight=4),
    StageInfo("texture", uses_gpu=False, weight=8),
    StageInfo("export", uses_gpu=False, weight=4),
)
STAGES: tuple[str, ...] = tuple(st.name for st in STAGE_TABLE)
GPU_STAGES: frozenset[str] = frozenset(st.name for st in STAGE_TABLE if st.uses_gpu)
STAGE_WEIGHTS: dict[str, int] = {st.name: st.weight for st in STAGE_TABLE}


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


__all__ = [
    "GPU_STAGES",
    "STAGES",
    "STAGE_TABLE",
    "STAGE_WEIGHTS",
    "StageInfo",
    "remove_stage_outputs",
    "run",
    "run_stage",
    "stage_function",
]
