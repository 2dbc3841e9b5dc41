"""Shared workload for the pipeline benchmarks: demo scenes, and running stages either in
this process or each in its own child process (wall time, import time, peak RSS)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("DROPMESH_BENCH_CACHE", "/tmp/dropmesh-bench-cache"))


def child_env(root: Path = ROOT, **extra: str) -> dict[str, str]:
    """Environment for child Pythons: `root` (this checkout) first on the import path."""
    env = dict(os.environ)
    paths = [str(root)] + ([str(ROOT)] if root != ROOT else [])  # bench itself from here
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def scene(n_images: int, size: tuple[int, int], seed: int = 0, variant: str = "easy") -> Path:
    """A rendered demo scene (cached between runs): `images/`, `ground_truth/`."""
    tag = "" if variant == "easy" else f"-{variant}"
    out = CACHE / f"scene-{n_images}-{size[0]}x{size[1]}-{seed}{tag}"
    if (out / "ground_truth" / "cameras.json").is_file():
        return out
    from pipeline.demo import render_scene

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    render_scene(tmp, n_images=n_images, size=size, seed=seed, variant=variant)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_stage_child(
    stage: str,
    spec: dict[str, Any],
    workspace: Path,
    device: str = "cpu",
    threads: int = 0,
    root: Path = ROOT,
) -> dict[str, Any]:
    """Run one stage in a fresh Python process with the pipeline from checkout `root`;
    returns wall seconds (process start to exit), the child's import and stage seconds
    and its peak RSS."""
    payload = json.dumps(
        {
            "stage": stage,
            "spec": spec,
            "workspace": str(workspace),
            "device": device,
            "threads": threads,
        }
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.stagechild", payload],
        env=child_env(root),
        cwd=root,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = round(wall, 3)
    return out


def run_pipeline_children(
    spec: dict[str, Any],
    workspace: Path,
    stages: tuple[str, ...] | None = None,
    root: Path = ROOT,
) -> dict[str, dict[str, Any]]:
    from pipeline import STAGES

    return {s: run_stage_child(s, spec, workspace, root=root) for s in (stages or STAGES)}


def fscore(workspace: Path, scene_dir: Path, object_only: bool = False) -> float | None:
    """F-score of the coloured mesh against the scene's ground truth, at 1 % of the whole
    scene's diagonal, or (`object_only`) against the object alone at 1 % of its diagonal."""
    from pipeline.evaluate import evaluate, evaluate_object

    mesh = workspace / "color" / "mesh.ply"
    if not mesh.is_file():
        return None
    score = (evaluate_object if object_only else evaluate)(
        mesh, scene_dir / "ground_truth", workspace / "mapping" / "sparse" / "0"
    )
    return round(float(score.fscore), 4)


def spec_json(scene_dir: Path, quality: str, **options: Any) -> dict[str, Any]:
    return {
        "project": "bench",
        "images": str(scene_dir / "images"),
        "quality": quality,
        "formats": ["glb"],
        "options": options,
        "job_id": "bench",
    }
