"""Peak memory at scale: the demo scene at 128 images of 1600x1200 px, preset medium
(full-size images, depth maps of 800 px), each stage in its own process as the daemon runs
it. The target is a peak under 4 GB in every stage."""

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
    args = ap.parse_args(argv)
    n_images = 32 if args.quick else 128
    before = load()
    with tempfile.TemporaryDirectory(prefix="dropmesh-bench-") as tmp:
        run = measure(n_images, SIZE, "medium", Path(tmp))
    print(
        f"memory: {n_images} images {SIZE[0]}x{SIZE[1]} medium: peak {run['peak_rss_mb']:.0f} MB "
        f"(limit {LIMIT_MB}), {run['total_s']:.0f} s in stages, F-score {run['fscore']}"
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
