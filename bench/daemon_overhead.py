"""Daemon overhead: the demo scene dropped into the inbox of a real daemon (real pipeline,
default timings from config.toml) until its GLB is published, against `pipeline.run` in a
plain script (a fresh Python process, imports included) on the same images and preset.
Runs alternate, side by side in one run. Both sides are timed the same way: from a cold
interpreter start (the script's `python -c`; the daemon's `python -m daemon.cli run`, a
fresh daemon with a fresh home for each run) until the job has ended (the script's
process has exited; the daemon's ledger says the job succeeded, which is after the GLB
appears: the export stage goes on with the preview and report). Reported per run and as
medians: the ratio daemon/script and the overhead per job in seconds (daemon - script).

Where the difference goes: per stage, the ledger's wall time (child spawn to result)
against the stage's own time (`metrics.seconds`), and the cost of starting a spawned
Python that imports each stage's module (what every stage's child pays before working).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import write_results
from bench.workload import child_env, load, scene
from tests.daemon_harness import Home, wait_for

SIZE = (1024, 768)
# The daemon as configured by default (the harness's fast test timings undone), with the
# real pipeline on the CPU.
DAEMON_ENV = {
    "DROPMESH_TEST_PIPELINE": "pipeline.stages:run_stage",
    "DROPMESH_RETRY_BASE_S": "30",
    "DROPMESH_RETRY_MAX_S": "900",
    "DROPMESH_RESCAN_S": "30",
    "DROPMESH_SETTLE_S": "1.0",
    "DROPMESH_HEARTBEAT_S": "2.0",
    "DROPMESH_DEVICE": "cpu",
    "DROPMESH_NOTIFY": "false",
}

SCRIPT = """
import sys, time
from pathlib import Path
from pipeline import JobSpec, run
spec = JobSpec(project="plain", images=Path(sys.argv[1]), quality=sys.argv[2], job_id="plain")
run(spec, Path(sys.argv[3]), results_dir=Path(sys.argv[3]) / "results", device="cpu")
"""


def run_script(images: Path, quality: str, ws: Path) -> float:
    shutil.rmtree(ws, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", SCRIPT, str(images), quality, str(ws)],
        env=child_env(),
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - t0


def _stages(db: Path, project: str) -> list[dict[str, Any]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        rows = con.execute(
            "select s.name, s.started_at, s.finished_at, s.peak_rss_mb, s.metrics, j.created_at "
            "from stages s join jobs j on j.id = s.job_id where j.project = ? order by s.seq",
            (project,),
        ).fetchall()
    finally:
        con.close()
    out = []
    for name, start, end, rss, metrics, created in rows:
        m = json.loads(metrics) if isinstance(metrics, str) else (metrics or {})
        out.append(
            {
                "stage": name,
                "wall_s": round(end - start, 3) if start and end else None,
                "seconds": m.get("seconds"),
                "peak_rss_mb": rss,
                "started_after_s": round(start - created, 3) if start else None,
            }
        )
    return out


def _job_state(db: Path, project: str) -> str | None:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = con.execute("select state from jobs where project = ?", (project,)).fetchone()
    finally:
        con.close()
    return str(row[0]) if row else None


def run_daemon(root: Path, images_src: Path, quality: str, project: str) -> dict[str, Any]:
    """A fresh daemon (new home, cold interpreter) started, one request dropped as soon as
    it watches its inbox, timed until the ledger says the job has succeeded; then the
    daemon is stopped."""
    home = Home(root)
    photos = home.root / "photos" / project
    shutil.copytree(images_src, photos)
    db = home.root / "jobs.db"
    t0 = time.perf_counter()
    home.start(**DAEMON_ENV)
    try:
        watching = time.perf_counter() - t0
        home.drop(project, images=f"../photos/{project}", project=project, quality=quality)
        glb = home.results / project
        wait_for(lambda: list(glb.glob("*_textured_mesh_poisson.glb")), 1800, 0.02)
        glb_s = time.perf_counter() - t0
        wait_for(lambda: _job_state(db, project) == "succeeded", 600, 0.02)
        total = time.perf_counter() - t0
    finally:
        home.stop()
    return {
        "seconds": round(total, 3),
        "watching_s": round(watching, 3),
        "glb_s": round(glb_s, 3),
        "stages": _stages(db, project),
    }


def startup_costs(stages: tuple[str, ...]) -> dict[str, float]:
    """Seconds for a fresh Python to start and import each stage module (median of 3),
    the bare interpreter, and pycolmap / open3d / cv2 alone."""
    targets = {"python": "pass"}
    for mod in ("pycolmap", "open3d", "cv2", "scipy.spatial", "trimesh"):
        targets[mod] = f"import {mod}"
    targets["daemon.stageproc"] = "import daemon.stageproc"
    for s in stages:
        targets[f"stage:{s}"] = f"import pipeline.stages.{s}"
    out = {}
    for name, code in targets.items():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-c", code], env=child_env(), check=True, capture_output=True
            )
            times.append(time.perf_counter() - t0)
        out[name] = round(statistics.median(times), 3)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--quality", default="low")
    args = ap.parse_args(argv)
    from pipeline import STAGES

    n_images = 8 if args.quick else 16
    reps = 1 if args.quick else 2
    scene_dir = scene(n_images, SIZE)
    before = load()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dropmesh-bench-") as tmp:
        for rep in range(reps):
            order = ("daemon", "script") if rep % 2 == 0 else ("script", "daemon")
            row: dict[str, Any] = {"order": list(order), "load": load()}
            for who in order:
                if who == "daemon":
                    row["daemon"] = run_daemon(
                        Path(tmp) / f"home{rep}", scene_dir / "images", args.quality, f"bench{rep}"
                    )
                else:
                    ws = Path(tmp) / "plain"
                    row["script_s"] = round(run_script(scene_dir / "images", args.quality, ws), 3)
            row["ratio"] = round(row["daemon"]["seconds"] / row["script_s"], 3)
            row["overhead_s"] = round(row["daemon"]["seconds"] - row["script_s"], 3)
            rows.append(row)
            d = row["daemon"]
            own = sum(s["seconds"] or 0 for s in d["stages"])
            print(
                f"daemon rep {rep + 1}/{reps}: daemon {d['seconds']:.1f} s "
                f"(stages' own time {own:.1f} s), script {row['script_s']:.1f} s, "
                f"ratio {row['ratio']:.3f}, overhead {row['overhead_s']:+.1f} s",
                flush=True,
            )
    costs = startup_costs(STAGES)
    spawn_total = sum(costs[f"stage:{s}"] for s in STAGES)
    last = rows[-1]["daemon"]["stages"]
    results = {
        "quick": args.quick,
        "quality": args.quality,
        "images": n_images,
        "size": list(SIZE),
        "runs": rows,
        "timing": "both sides from a cold interpreter start until the job has ended",
        "median_ratio": round(statistics.median(r["ratio"] for r in rows), 3),
        "ratio_spread": [min(r["ratio"] for r in rows), max(r["ratio"] for r in rows)],
        "median_overhead_s": round(statistics.median(r["overhead_s"] for r in rows), 3),
        "overhead_spread_s": [
            min(r["overhead_s"] for r in rows),
            max(r["overhead_s"] for r in rows),
        ],
        "target_ratio": 1.03,
        "startup_s": costs,
        "startup_all_stages_s": round(spawn_total, 3),
        "per_stage_overhead_s": {
            s["stage"]: round((s["wall_s"] or 0) - (s["seconds"] or 0), 3) for s in last
        },
        "load_before": before,
        "load_after": load(),
    }
    path = write_results("daemon", results)
    print(
        f"median daemon/script {results['median_ratio']:.3f} (target <= 1.03), overhead "
        f"{results['median_overhead_s']:+.1f} s per job; a fresh "
        f"Python importing each stage costs {spawn_total:.1f} s over the {len(STAGES)} stages"
    )
    print(f"written to {path}")
    return results


if __name__ == "__main__":
    main()
