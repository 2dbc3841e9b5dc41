"""Crash rows on the real pipeline: the same kill -9 as the crash matrix, but landing
inside the real stages (pipeline/stages, on a small rendered demo scene) rather than in
the fast fake pipeline the other crash tests use."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import trimesh
from daemon_harness import Home, wait_for
from rel_helpers import open_ledger, orphans, stage_done_counts

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


def _running(home: Home, job_id: str, workspace: Path, stage: str) -> str | None:
    """How we know the stage is running and has not published: its temporary folder
    exists, or the ledger names it as the job's current stage (some stages compute
    in memory and open their temporary folder only to publish)."""
    if any(workspace.glob(f".{stage}.tmp-*")):
        return "temporary folder"
    ledger = open_ledger(home)
    try:
        job = ledger.get(job_id)
    finally:
        ledger.close()
    if job is not None and job.stage == stage and not (workspace / stage).exists():
        return "ledger"
    return None


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
    for stage in KILLED:
        t0 = time.monotonic()
        seen = wait_for(lambda stage=stage: _running(home, job_id, workspace, stage), 300, 0.01)
        home.kill9()
        wait_for(lambda: not orphans(home), 15)
        # the stage process notices its daemon is gone within a quarter of a second, so
        # a stage about to finish may still publish (one rename) before it stops
        published = (workspace / stage / "metrics.json").exists()
        rows.append(
            f"{stage} ({seen}) after {time.monotonic() - t0:.1f} s"
            + (" (it still published)" if published else "")
        )
        home.start(DROPMESH_TEST_PIPELINE="pipeline.stages:run_stage")
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
