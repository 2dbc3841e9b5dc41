"""The whole job at scale: the hard demo variant (distortion, no EXIF, changing exposure,
highlights, blur, a hand-held path, photographs for textures; 10,000 SIFT keypoints a view,
as real photos give) at 128 images of 1600x1200 px, preset medium (full-size images, depth
maps of 800 px), each stage in its own process as the daemon runs it. Targets: the job in
under 15 minutes on 2 cores (stages with their process start-ups), a peak under 4 GB in
every stage, under 2 GB in matching."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from bench.common import write_results
from bench.stages import measure
from bench.workload import load

SIZE = (1600, 1200)
LIMIT_MB = 4096


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="32 images instead of 128")
    ap.add_argument("--variant", default="hard", help="demo scene variant (default hard)")
    args = ap.parse_args(argv)
    n_images = 32 if args.quick else 128
    before = load()
    with tempfile.TemporaryDirectory(prefix="dropmesh-bench-") as tmp:
        run = measure(n_images, SIZE, "medium", Path(tmp), variant=args.variant)
    print(
        f"memory: {n_images} images {SIZE[0]}x{SIZE[1]} {args.variant} medium: peak "
        f"{run['peak_rss_mb']:.0f} MB (limit {LIMIT_MB}), {run['total_s']:.0f} s in stages, "
        f"{run['total_wall_s']:.0f} s with start-ups, F-score {run['fscore']}"
    )
    for name, s in run["stages"].items():
        print(f"  {name:10s} {s['seconds']:8.1f} s  peak {s['peak_rss_mb']:6.0f} MB")
    out = {
        "quick": args.quick,
        "limit_mb": LIMIT_MB,
        "within_limit": run["peak_rss_mb"] < LIMIT_MB,
        "run": run,
        "load_before": before,
        "load_after": load(),
    }
    print(f"written to {write_results('memory', out)}")
    return out


if __name__ == "__main__":
    main()
