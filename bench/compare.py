"""Before/after: the whole pipeline from a baseline revision's `pipeline/` (any git
revision you name: the commit before a change you want to measure) against this
checkout's, side by side in one run, alternating which goes first; per-stage ratios
after/before, medians. The results record the baseline as named and as resolved.

    python -m bench compare --baseline REF [--quality medium] [--images 16]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.common import write_results
from bench.workload import ROOT, fscore, load, run_pipeline_children, scene, spec_json

SIZE = (1024, 768)


def export_pipeline(ref: str, dest: Path) -> Path:
    """`pipeline/` as of `ref`, unpacked into dest (no worktree, nothing else)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "pipeline"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def resolve_revision(ref: str) -> str | None:
    """The full commit hash `ref` names in this repository, or None."""
    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() if out.returncode == 0 else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--baseline",
        required=True,
        metavar="REF",
        help="git revision whose pipeline/ is 'before' (e.g. a commit, tag or HEAD~3)",
    )
    ap.add_argument("--quality", default="medium")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    baseline = resolve_revision(args.baseline)
    if baseline is None:
        ap.error(f"--baseline {args.baseline!r} is not a commit in {ROOT}")
    reps = 1 if args.quick else args.reps
    n_images = 8 if args.quick else args.images
    scene_dir = scene(n_images, SIZE)
    spec = spec_json(scene_dir, args.quality)
    before_load = load()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dropmesh-bench-") as tmp:
        base_root = export_pipeline(baseline, Path(tmp) / "baseline")
        roots = {"before": base_root, "after": ROOT}
        for rep in range(reps):
            order = ("before", "after") if rep % 2 == 0 else ("after", "before")
            row: dict[str, Any] = {"order": list(order)}
            for who in order:
                ws = Path(tmp) / f"ws-{who}"
                shutil.rmtree(ws, ignore_errors=True)
                stages = run_pipeline_children(spec, ws, root=roots[who])
                row[who] = {
                    "stages": {k: v["seconds"] for k, v in stages.items()},
                    "peak_rss_mb": {k: v["peak_rss_mb"] for k, v in stages.items()},
                    "total_s": round(sum(v["seconds"] for v in stages.values()), 3),
                    "fscore": fscore(ws, scene_dir),
                }
            b, a = row["before"], row["after"]
            row["ratio"] = {
                k: round(a["stages"][k] / b["stages"][k], 3) if b["stages"][k] > 0 else None
                for k in b["stages"]
            }
            row["ratio"]["total"] = round(a["total_s"] / b["total_s"], 3)
            rows.append(row)
            print(
                f"compare rep {rep + 1}/{reps}: before {b['total_s']:.1f} s "
                f"(F {b['fscore']}), after {a['total_s']:.1f} s (F {a['fscore']}), "
                f"after/before {row['ratio']['total']:.3f}"
            )
    keys = list(rows[0]["ratio"])
    median = {
        k: round(statistics.median(r["ratio"][k] for r in rows if r["ratio"][k] is not None), 3)
        for k in keys
    }
    results = {
        "quick": args.quick,
        "baseline": args.baseline,
        "baseline_commit": baseline,
        "head": _head(),
        "changed_files": _changed(args.baseline),
        "quality": args.quality,
        "images": n_images,
        "size": list(SIZE),
        "runs": rows,
        "median_ratio": median,
        "load_before": before_load,
        "load_after": load(),
    }
    path = write_results("compare", results)
    print("median after/before: " + ", ".join(f"{k} {v:.2f}" for k, v in median.items()))
    print(f"written to {path}")
    return results


def _changed(ref: str) -> list[str]:
    """Files under pipeline/ that differ between `ref` and the working tree."""
    out = subprocess.run(
        ["git", "-C", str(ROOT), "diff", "--name-only", ref, "--", "pipeline"],
        capture_output=True,
        text=True,
    )
    return out.stdout.split()


def _head() -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip()


if __name__ == "__main__":
    main()
