"""Crash rows on the real pipeline: the same kill -9 as the crash matrix, but landing
inside the real stages (pipeline/stages, on a small rendered demo scene) rather than in
the fast fake pipeline the other crash tests use."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import trimesh
from daemon_harness import Home, wait_for
from rel_helpers import open_ledger, orphans, stage_done_counts

from daemon.ledger import Ledger
from daemon.states import TERMINAL, StageState
from pipeline import STAGES
from pipeline.demo import render_scene

# every stage that publishes files (texture too, once the pipeline has it)
KILLED = [
    s
    for s in ("features", "matching", "mapping", "stereo", "fusion", "meshing", "texture", "export")
    if s in STAGES
]

# which pipeline the scenarios run (RELIABILITY.md says so per row)
PIPELINE = "real (pipeline/stages, rendered demo scene)"


def _kill_inside(home: Home, ledger: Ledger, job_id: str, workspace: Path, stage: str) -> str:
    """Kill the daemon with SIGKILL as soon as `stage` is seen running, and say how it was
    seen: its temporary folder exists, or the ledger names it as the job's current stage
    (some stages compute in memory and open their temporary folder only to publish).

    The shortest stages (mapping 10 small photos) last about 0.2 s, so each look is cheap:
    one directory listing and one read on a ledger connection kept open, every few
    milliseconds. A job that ends, or a stage that finishes unseen, fails at once with
    what happened rather than after the timeout."""
    deadline = time.monotonic() + 300
    prefix = f".{stage}.tmp-"
    while True:
        with contextlib.suppress(FileNotFoundError):
            if any(e.name.startswith(prefix) for e in os.scandir(workspace)):
                home.kill9()
                return "temporary folder"
        job = ledger.get(job_id)
        if job.stage == stage and not (workspace / stage).exists():
            home.kill9()
            return "ledger"
        if job.state in TERMINAL:
            raise AssertionError(f"the job {job.state} before {stage} was seen: {job.error}")
        done = {s.name for s in ledger.stages(job_id) if s.state == StageState.DONE}
        if stage in done:
            raise AssertionError(f"{stage} started and finished between two looks")
        if time.monotonic() > deadline:
            raise AssertionError(f"{stage} not seen within 300 s (job {job.state}, {job.stage})")
        time.sleep(0.003)


def test_kill_inside_each_real_stage(home: Home, record_property: Any) -> None:
    """One job of 10 rendered photos (480x360, quality low) on the real pipeline. For each
    stage that publishes files (features, matching, mapping, stereo, fusion, meshing,
    export), the daemon is killed with SIGKILL while that stage runs (the ledger names it
    as the job's stage, or its temporary folder exists), then restarted. The job
    succeeds; the ledger records every stage done exactly once; no temporary folder is
    left behind; the GLB loads with its faces; no process of a killed daemon is left."""
    scene = home.root / "photos" / "real"
    render_scene(scene, n_images=10, size=(480, 360), seed=0)
    home.start(DROPMESH_TEST_PIPELINE="pipeline.stages:run_stage")
    home.drop("real", images="../photos/real/images", quality="low", formats=["glb"])
    job_id = wait_for(lambda: (home.job("real") or {}).get("id"), 30)
    workspace = home.workspaces / job_id
    rows = []
    ledger = open_ledger(home)
    try:
        for stage in KILLED:
            t0 = time.monotonic()
            seen = _kill_inside(home, ledger, job_id, workspace, stage)
            wait_for(lambda: not orphans(home), 15)
            # the stage process notices its daemon is gone within a quarter of a second,
            # so a stage about to finish may still publish (one rename) before it stops
            published = (workspace / stage / "metrics.json").exists()
            rows.append(
                f"{stage} ({seen}) after {time.monotonic() - t0:.1f} s"
                + (" (it still published)" if published else "")
            )
            home.start(DROPMESH_TEST_PIPELINE="pipeline.stages:run_stage")
    finally:
        ledger.close()
    print(f"\nkilled inside: {rows}")
    record_property("killed inside", ", ".join(rows))
    job = home.wait_state("real", "succeeded", "failed", timeout=600)
    assert job["state"] == "succeeded", job["error"]
    assert stage_done_counts(home, job_id) == dict.fromkeys(STAGES, 1)
    assert not list(workspace.glob(".*.tmp-*"))
    glb = Path(next(p for p in job["exports"] if p.endswith(".glb")))
    mesh = trimesh.load(glb, force="mesh")
    assert len(mesh.faces) > 1000
    assert not orphans(home)
