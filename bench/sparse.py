"""Sparse reconstruction: dropmesh's features / matching / mapping stages against COLMAP's
own command line (`colmap feature_extractor`, `exhaustive_matcher`, `mapper`), side by
side in one run, alternating which goes first, on the same images. Two comparisons:

- `matched`: the rendered demo scene with the same settings on both sides (the preset's
  values): max image size, max number of SIFT features, one shared SIMPLE_RADIAL camera
  with the SAME initial focal length (dropmesh's prior, EXIF or 1.2 x the longest side,
  given to COLMAP as `--ImageReader.camera_params`; COLMAP 3.8 would otherwise derive
  ~1,170 px from the demo's EXIF where dropmesh has the exact 1,126), CPU only, every
  core, exhaustive pairs, guided matching on every pair when the preset uses it at all,
  and the mapper thresholds dropmesh uses (min_num_matches 8, abs_pose_min_num_inliers 12,
  abs_pose_min_inlier_ratio 0.15, min_model_size 3).
  The CPU SIFT MATCHERS DIFFER and cannot be made the same: COLMAP 3.8's CPU matcher is
  brute force only; pycolmap 4.2.1's default is an index-based nearest-neighbour search
  (`cpu_brute_force_matcher` off), which dropmesh uses. Bundle-adjustment iteration caps
  also differ (3.8: 25 local / 50 global; 4.2: solver defaults).
- `defaults`: what a user compares. Real photos (ViSP's castel sequence, every second
  frame, from Debian's visp-images-data); dropmesh's preset as it is (no options) against
  COLMAP's CLI defaults: `feature_extractor --ImageReader.single_camera 1`,
  `exhaustive_matcher`, `mapper`, and nothing else but `use_gpu 0` for extraction and
  matching: COLMAP 3.8's default SIFT runs on OpenGL and aborts on a machine with no
  display or GPU ("Check failed: context_.create()"), as a user here would find.

Every run's seconds and registered images are kept, with the median and the spread (min,
max) of the dropmesh/COLMAP ratios.
"""

from __future__ import annotations

import argparse
import json
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
CASTEL = Path("/usr/share/visp-images-data/ViSP-images/mbt-depth/castel/castel")
CASTEL_STEP = 2  # every second frame of the 30, as tests/pipeline/test_real_photos.py


def castel_photos(dest: Path) -> Path:
    """The castel frames as JPEGs, as a user would drop them."""
    from PIL import Image

    frames = sorted(CASTEL.glob("image_*.pgm"))[::CASTEL_STEP]
    if not frames:
        raise SystemExit(f"{CASTEL} is missing: install Debian's visp-images-data")
    dest.mkdir(parents=True, exist_ok=True)
    for pgm in frames:
        Image.open(pgm).save(dest / f"{pgm.stem}.jpg", quality=95)
    return dest


def castel_job(dest: Path, quality: str) -> tuple[Path, dict[str, Any]]:
    """The castel photos (castel_photos, into `dest`) and a job of them at `quality`."""
    images = castel_photos(dest)
    spec = spec_json(images.parent, quality)
    spec["images"] = str(images)
    return images, spec


def colmap_default_commands(images: Path, ws: Path) -> dict[str, list[str]]:
    db = str(ws / "database.db")
    return {
        "features": [
            "colmap", "feature_extractor", "--database_path", db, "--image_path", str(images),
            "--ImageReader.single_camera", "1", "--SiftExtraction.use_gpu", "0",
        ],
        "matching": [
            "colmap", "exhaustive_matcher", "--database_path", db, "--SiftMatching.use_gpu", "0",
        ],
        "mapping": [
            "colmap", "mapper", "--database_path", db, "--image_path", str(images),
            "--output_path", str(ws / "sparse"),
        ],
    }  # fmt: skip


def focal_prior(spec: dict[str, Any], scratch: Path) -> list[float]:
    """dropmesh's initial camera for these images (all one size), from its own ingest and
    the features stage's rule: focal (EXIF, or DEFAULT_FOCAL_FACTOR x the longest side),
    cx, cy, k."""
    from pipeline.stages.features import DEFAULT_FOCAL_FACTOR

    shutil.rmtree(scratch, ignore_errors=True)
    run_stage_child("ingest", spec, scratch)
    first = json.loads((scratch / "ingest" / "images.json").read_text())["images"][0]
    w, h = int(first["width"]), int(first["height"])
    f = first["focal_px"] or DEFAULT_FOCAL_FACTOR * max(w, h)
    shutil.rmtree(scratch, ignore_errors=True)
    return [round(float(f), 3), w / 2.0, h / 2.0, 0.0]


def colmap_commands(images: Path, ws: Path, p: Any, prior: list[float]) -> dict[str, list[str]]:
    db = str(ws / "database.db")
    camera = ",".join(str(x) for x in prior)
    return {
        "features": [
            "colmap", "feature_extractor",
            "--database_path", db,
            "--image_path", str(images),
            "--ImageReader.single_camera", "1",
            "--ImageReader.camera_model", "SIMPLE_RADIAL",
            "--ImageReader.camera_params", camera,
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
            "--SiftMatching.guided_matching", "0" if p.guided_matching == "off" else "1",
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


def run_colmap(images: Path, ws: Path, commands: Any) -> dict[str, Any]:
    """COLMAP's three commands (`commands(images, ws)`), each timed from process start to
    exit."""
    shutil.rmtree(ws, ignore_errors=True)
    (ws / "sparse").mkdir(parents=True)
    out: dict[str, Any] = {}
    for step, cmd in commands(images, ws).items():
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


def compare(
    name: str,
    images: Path,
    spec: dict[str, Any],
    commands: Any,
    reps: int,
    tmp: Path,
) -> dict[str, Any]:
    """`reps` runs of each side, alternating which goes first."""
    rows: list[dict[str, Any]] = []
    for rep in range(reps):
        order = ("dropmesh", "colmap") if rep % 2 == 0 else ("colmap", "dropmesh")
        row: dict[str, Any] = {"order": list(order), "load": load()}
        for who in order:
            if who == "dropmesh":
                row[who] = run_dropmesh(spec, tmp / "dm")
            else:
                row[who] = run_colmap(images, tmp / "cm", commands)
        d, c = row["dropmesh"], row["colmap"]
        for side in (d, c):
            side["total"] = round(sum(side[s] for s in STEPS), 3)
        row["ratio"] = {s: round(d[s] / c[s], 3) for s in STEPS}
        row["ratio"]["total"] = round(d["total"] / c["total"], 3)
        row["ratio"]["total_with_ingest"] = round((d["ingest"] + d["total"]) / c["total"], 3)
        rows.append(row)
        print(f"sparse {name} rep {rep + 1}/{reps}: registered dropmesh {d['registered']}, "
              f"COLMAP {c['registered']}; dropmesh/COLMAP " + ", ".join(
                f"{k} {v:.2f}" for k, v in row["ratio"].items()), flush=True)  # fmt: skip
    keys = list(rows[0]["ratio"])
    return {
        "runs": rows,
        "median_ratio": {k: round(statistics.median(r["ratio"][k] for r in rows), 3) for k in keys},
        "ratio_spread": {
            k: [min(r["ratio"][k] for r in rows), max(r["ratio"][k] for r in rows)] for k in keys
        },
        "seconds": {
            who: {
                "median": round(statistics.median(r[who]["total"] for r in rows), 3),
                "min": min(r[who]["total"] for r in rows),
                "max": max(r[who]["total"] for r in rows),
            }
            for who in ("dropmesh", "colmap")
        },
        "registered": {who: [r[who]["registered"] for r in rows] for who in ("dropmesh", "colmap")},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--quality", default="medium")
    ap.add_argument(
        "--only", choices=("matched", "defaults"), help="run one of the two comparisons"
    )
    args = ap.parse_args(argv)
    from pipeline.presets import preset

    n_images = 8 if args.quick else 16
    reps = 1 if args.quick else 3
    p = preset(args.quality)
    before = load()
    results: dict[str, Any] = {
        "quick": args.quick,
        "quality": args.quality,
        "colmap_version": _colmap_version(),
    }
    with tempfile.TemporaryDirectory(prefix="dropmesh-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if args.only in (None, "matched"):
            scene_dir = scene(n_images, SIZE)
            guided = "off" if p.guided_matching == "off" else "on"
            spec = spec_json(scene_dir, args.quality, matcher="exhaustive", guided_matching=guided)
            prior = focal_prior(spec, tmp / "prior")
            images = scene_dir / "images"
            matched = compare(
                "matched", images, spec,
                lambda im, ws: colmap_commands(im, ws, p, prior), reps, tmp,
            )  # fmt: skip
            matched.update(
                images=n_images,
                size=list(SIZE),
                settings={
                    "max_image_size": p.max_image_size,
                    "max_num_features": p.max_num_features,
                    "guided_matching": f"{guided} (every pair, both sides)",
                    "camera": "one shared SIMPLE_RADIAL",
                    "initial_camera": prior,
                    "num_threads": -1,
                    "matcher": "exhaustive",
                },
                matchers={
                    "colmap": "COLMAP 3.8 CPU SIFT matcher: brute force",
                    "dropmesh": "pycolmap 4.2.1 CPU SIFT matcher: index-based nearest "
                    "neighbours (cpu_brute_force_matcher off); the matchers differ",
                },
                targets={"issue5": 1.1, "issue6": 1.0},
            )
            results["matched"] = matched
        if args.only in (None, "defaults"):
            images, spec = castel_job(tmp / "castel", args.quality)
            defaults = compare("defaults", images, spec, colmap_default_commands, reps, tmp)
            defaults.update(
                photos=f"{CASTEL} image_*.pgm, every {CASTEL_STEP}nd frame, as JPEG",
                images=len(list(images.iterdir())),
                settings={
                    "dropmesh": f"preset {args.quality!r}, no options",
                    "colmap": "feature_extractor --ImageReader.single_camera 1, "
                    "exhaustive_matcher, mapper; nothing else but use_gpu 0 (its OpenGL "
                    "SIFT aborts with no display)",
                },
                target={"total_ratio_at_most": 0.5, "registered": "dropmesh >= COLMAP"},
            )
            results["defaults"] = defaults
    results["load_before"] = before
    results["load_after"] = load()
    path = write_results("sparse", results)
    for key in ("matched", "defaults"):
        if key in results:
            median = results[key]["median_ratio"]
            print(f"{key}: median dropmesh/COLMAP " + ", ".join(
                f"{k} {v:.2f}" for k, v in median.items()))  # fmt: skip
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
