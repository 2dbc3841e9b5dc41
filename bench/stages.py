"""Per-stage time and peak memory of the whole pipeline on the demo scene, per preset: the
hard variant at 1600x1200 px (10,000 SIFT keypoints a view, as real photos give; the easy
scene with --variant easy).

Each stage runs in its own fresh Python process (as the daemon runs it), so each stage's
peak RSS is its own; `seconds` is the stage's own time, `import_s` what its process spent
importing the stage's module, `wall_s` process start to exit.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.common import write_results
from bench.workload import fscore, load, run_pipeline_children, scene, spec_json

SIZE = (1600, 1200)


def measure(
    n_images: int, size: tuple[int, int], quality: str, root: Path, variant: str = "easy"
) -> dict[str, Any]:
    scene_dir = scene(n_images, size, variant=variant)
    workspace = root / f"{quality}-{n_images}"
    shutil.rmtree(workspace, ignore_errors=True)
    stages = run_pipeline_children(spec_json(scene_dir, quality), workspace)
    out: dict[str, Any] = {
        "quality": quality,
        "images": n_images,
        "size": list(size),
        "variant": variant,
        "stages": stages,
        "total_s": round(sum(s["seconds"] for s in stages.values()), 3),
        "total_wall_s": round(sum(s["wall_s"] for s in stages.values()), 3),
        "peak_rss_mb": max(s["peak_rss_mb"] for s in stages.values()),
        "fscore": fscore(workspace, scene_dir),
        "object_fscore": fscore(workspace, scene_dir, object_only=True),
    }
    shutil.rmtree(workspace, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--variant", default="hard", help="demo scene variant (default hard)")
    args = ap.parse_args(argv)
    n_images = 8 if args.quick else 16
    qualities = ("low", "medium") if args.quick else ("low", "medium", "high")
    runs = []
    before = load()
    with tempfile.TemporaryDirectory(prefix="dropmesh-bench-") as tmp:
        for quality in qualities:
            r = measure(n_images, SIZE, quality, Path(tmp), variant=args.variant)
            runs.append(r)
            print(
                f"pipeline {quality:6s} {n_images} {args.variant} images {SIZE[0]}x{SIZE[1]}: "
                f"{r['total_s']:.1f} s in stages, {r['total_wall_s']:.1f} s with process "
                f"start-up, peak {r['peak_rss_mb']:.0f} MB, F-score {r['fscore']}, "
                f"object F-score {r['object_fscore']}"
            )
            for name, s in r["stages"].items():
                print(
                    f"  {name:10s} {s['seconds']:7.2f} s  import {s['import_s']:5.2f} s  "
                    f"peak {s['peak_rss_mb']:6.0f} MB"
                )
    results = {"quick": args.quick, "load_before": before, "load_after": load(), "runs": runs}
    path = write_results("pipeline", results)
    print(f"written to {path}")
    return results


if __name__ == "__main__":
    main()
