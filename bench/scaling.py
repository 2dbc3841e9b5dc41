"""Scaling: per-stage time and peak memory at 8, 16, 32, 64 (and 128) images of the hard
demo variant at 1600x1200 px (10,000 SIFT keypoints a view, as real photos give), presets
low and medium, each stage in its own process. Checks that the job grows no faster than
about n log n past 32 images (above 60 photos matching leaves exhaustive pairs, from 64
mapping is global)."""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

from bench.common import write_results
from bench.stages import measure
from bench.workload import load

SIZE = (1600, 1200)


def growth(runs: list[dict[str, Any]], stage: str) -> list[dict[str, Any]]:
    """Between consecutive image counts: time ratio of `stage` against n log n's."""
    out = []
    for a, b in zip(runs, runs[1:], strict=False):
        ta, tb = a["stages"][stage]["seconds"], b["stages"][stage]["seconds"]
        na, nb = a["images"], b["images"]
        nlogn = (nb * math.log(nb)) / (na * math.log(na))
        out.append(
            {
                "from": na,
                "to": nb,
                "time_ratio": round(tb / ta, 3) if ta > 0 else None,
                "nlogn_ratio": round(nlogn, 3),
                "quadratic_ratio": round((nb / na) ** 2, 3),
                "pairs": [a["stages"][stage]["metrics"].get("pairs"),
                          b["stages"][stage]["metrics"].get("pairs")],
                "matcher": b["stages"][stage]["metrics"].get("matcher"),
            }
        )  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-images", type=int, default=64)
    ap.add_argument("--quality", action="append", choices=("low", "medium"), default=None)
    ap.add_argument("--variant", default="hard", help="demo scene variant (default hard)")
    args = ap.parse_args(argv)
    qualities = args.quality or ["low", "medium"]
    counts = [n for n in (8, 16, 32, 64, 128) if n <= (16 if args.quick else args.max_images)]
    before = load()
    out: dict[str, Any] = {
        "quick": args.quick,
        "size": list(SIZE),
        "variant": args.variant,
        "counts": counts,
    }
    with tempfile.TemporaryDirectory(prefix="dropmesh-bench-") as tmp:
        for quality in qualities:
            runs = []
            for n in counts:
                r = measure(n, SIZE, quality, Path(tmp), variant=args.variant)
                runs.append(r)
                print(
                    f"scaling {quality:6s} {n:4d} images: {r['total_s']:7.1f} s, "
                    f"matching {r['stages']['matching']['seconds']:.1f} s "
                    f"({r['stages']['matching']['metrics'].get('matcher')}), peak "
                    f"{r['peak_rss_mb']:.0f} MB, F-score {r['fscore']}"
                )
            out[quality] = {"runs": runs, "matching_growth": growth(runs, "matching")}
    out["load_before"], out["load_after"] = before, load()
    path = write_results("scaling", out)
    print(f"written to {path}")
    return out


if __name__ == "__main__":
    main()
