"""Sparse reconstruction: dropmesh's features / matching / mapping stages against COLMAP's
own command line (`colmap feature_extractor`, `exhaustive_matcher`, `mapper`) on the same
images with the same settings, side by side in one run, alternating which goes first.

Settings matched explicitly on both sides (the preset's values): max image size, max
number of SIFT features, one shared SIMPLE_RADIAL camera, CPU only, every core
(num_threads -1), guided matching, exhaustive pairs, and the mapper thresholds dropmesh
uses (min_num_matches 8, abs_pose_min_num_inliers 12, abs_pose_min_inlier_ratio 0.15,
min_model_size 3). Left at each version's defaults (COLMAP 3.8 CLI vs pycolmap 4.2.1):
the CPU SIFT matcher (3.8 brute force; 4.2 an index-based nearest-neighbour search, its
`cpu_brute_force_matcher` is off), bundle-adjustment iteration caps (3.8: 25 local /
50 global; 4.2: solver defaults), the initial focal length (3.8: EXIF or 1.2 x the
longest side; dropmesh: EXIF or 1.2 x the longest side, written by the features stage).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import write_results
from bench.workload import load, run_stage_child, scene, spec_json

SIZE = (1024, 768)
STEPS = ("features", "matching", "mapping")


def colmap_commands(images: Path, ws: Path, p: Any) -> dict[str, list[str]]:
    db = str(ws / "database.db")
    return {
        "features": [
            "colmap", "feature_extractor",
            "--database_path", db,
            "--image_path", str(images),
            "--ImageReader.single_camera", "1",
            "--ImageReader.camera_model", "SIMPLE_RADIAL",
            "--SiftExtraction.use_gpu", "0",
            "--SiftExtraction.num_threads", "-1",
            "--SiftExtraction.max_image_size", str(p.max_image_size),
            "--SiftExtraction.max_num_features", str(p.max_num_features),
        ],
        "matching": [
            "colmap", "exhaustive_matcher",
            "--database_path", db,
            "--SiftMatching.use_gpu", "0",
            "--SiftMatching.num_threads", "-1",
            "--SiftMatching.guided_matching", "1" if p.guided_matching == "on" else "0",
        ],
        "mapping": [
            "colmap", "mapper",
            "--database_path", db,
            "--image_path", str(images),
            "--output_path", str(ws / "sparse"),
            "--Mapper.num_threads", "-1",
            "--Mapper.min_num_matches", "8",
            "--Mapper.abs_pose_min_num_inliers", "12",
            "--Mapper.abs_pose_min_inlier_ratio", "0.15",
            "--Mapper.min_model_size", "3",
        ],
    }  # fmt: skip


def run_colmap(images: Path, ws: Path, p: Any) -> dict[str, Any]:
    shutil.rmtree(ws, ignore_errors=True)
    (ws / "sparse").mkdir(parents=True)
    out: dict[str, Any] = {}
    for step, cmd in colmap_commands(images, ws, p).items():
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        out[step] = round(time.perf_counter() - t0, 3)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:2])} failed:\n{proc.stderr[-2000:]}")
    import pycolmap

    models = sorted((ws / "sparse").iterdir())
    best = max((pycolmap.Reconstruction(m) for m in models), key=lambda r: r.num_reg_images())
    out["registered"] = best.num_reg_images()
    out["points"] = best.num_points3D()
    out["reprojection_error"] = round(float(best.compute_mean_reprojection_error()), 3)
    return out


def run_dropmesh(spec: dict[str, Any], ws: Path) -> dict[str, Any]:
    shutil.rmtree(ws, ignore_errors=True)
    out: dict[str, Any] = {"ingest": run_stage_child("ingest", spec, ws)["wall_s"]}
    stage_s: dict[str, float] = {}
    for step in STEPS:
        r = run_stage_child(step, spec, ws)
        out[step] = r["wall_s"]  # process start to exit, like the CLI's
        stage_s[step] = r["seconds"]
        if step == "mapping":
            out["registered"] = r["metrics"]["registered"]
            out["points"] = r["metrics"]["points"]
            out["reprojection_error"] = r["metrics"]["mean_reprojection_error"]
    out["stage_seconds"] = stage_s
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--quality", default="medium")
    args = ap.parse_args(argv)
    from pipeline.presets import preset

    n_images = 8 if args.quick else 16
    reps = 1 if args.quick else 3
    scene_dir = scene(n_images, SIZE)
    p = preset(args.quality)
    spec = spec_json(scene_dir, args.quality)
    before = load()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dropmesh-bench-") as tmp:
        for rep in range(reps):
            order = ("dropmesh", "colmap") if rep % 2 == 0 else ("colmap", "dropmesh")
            row: dict[str, Any] = {"order": list(order)}
            for who in order:
                if who == "dropmesh":
                    row[who] = run_dropmesh(spec, Path(tmp) / "dm")
                else:
                    row[who] = run_colmap(scene_dir / "images", Path(tmp) / "cm", p)
            d, c = row["dropmesh"], row["colmap"]
            row["ratio"] = {s: round(d[s] / c[s], 3) for s in STEPS}
            row["ratio"]["total"] = round(sum(d[s] for s in STEPS) / sum(c[s] for s in STEPS), 3)
            row["ratio"]["total_with_ingest"] = round(
                (d["ingest"] + sum(d[s] for s in STEPS)) / sum(c[s] for s in STEPS), 3
            )
            rows.append(row)
            print(f"sparse rep {rep + 1}/{reps}: " + ", ".join(
                f"{k} {v:.2f}" for k, v in row["ratio"].items()))  # fmt: skip
    median = {k: round(statistics.median(r["ratio"][k] for r in rows), 3) for k in rows[0]["ratio"]}
    results = {
        "quick": args.quick,
        "quality": args.quality,
        "images": n_images,
        "size": list(SIZE),
        "settings": {
            "max_image_size": p.max_image_size,
            "max_num_features": p.max_num_features,
            "guided_matching": p.guided_matching,
            "camera": "one shared SIMPLE_RADIAL",
            "num_threads": -1,
            "matcher": "exhaustive",
        },
        "colmap_version": _colmap_version(),
        "runs": rows,
        "median_ratio": median,
        "targets": {"issue5": 1.1, "issue6": 1.0},
        "load_before": before,
        "load_after": load(),
    }
    path = write_results("sparse", results)
    print("median dropmesh/COLMAP: " + ", ".join(f"{k} {v:.2f}" for k, v in median.items()))
    print(f"written to {path}")
    return results


def _colmap_version() -> str:
    try:
        out = subprocess.run(["colmap", "-h"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


if __name__ == "__main__":
    main()
