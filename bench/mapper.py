"""Incremental against global mapping on the hard demo variant (1600x1200, distortion, no
EXIF, changing exposure, hand-held path, photo textures), preset medium, at 32, 64 and
128 photos. Features and matching run once per size; then the mapping stage runs on that same
database with `mapper = incremental` and `mapper = global`, alternating which goes first,
each in its own process. Each run keeps its seconds, the photos it registered and its
camera error: the RMS distance of its camera centres from the true ones after a similarity
alignment, in units of the scene (the camera ring has radius ~3.3)."""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.common import write_results
from bench.workload import load, run_stage_child, scene, spec_json

SIZE = (1600, 1200)
MAPPERS = ("incremental", "global")


def _camera_error(workspace: Path, scene_dir: Path) -> float | None:
    from pipeline.evaluate import align_to_truth

    model = workspace / "mapping" / "sparse" / "0"
    if not model.is_dir():
        return None
    return round(align_to_truth(model, scene_dir / "ground_truth" / "cameras.json").rms, 5)


def measure(n_images: int, rounds: int, root: Path) -> dict[str, Any]:
    scene_dir = scene(n_images, SIZE, variant="hard")
    workspace = root / f"hard-{n_images}"
    shutil.rmtree(workspace, ignore_errors=True)
    spec = spec_json(scene_dir, "medium")
    upstream = {s: run_stage_child(s, spec, workspace) for s in ("ingest", "features", "matching")}
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MAPPERS}
    for r in range(rounds):
        order = MAPPERS if r % 2 == 0 else MAPPERS[::-1]
        for mapper in order:
            shutil.rmtree(workspace / "mapping", ignore_errors=True)
            out = run_stage_child(
                "mapping", spec_json(scene_dir, "medium", mapper=mapper), workspace
            )
            m = out["metrics"]
            runs[mapper].append(
                {
                    "seconds": out["seconds"],
                    "peak_rss_mb": out["peak_rss_mb"],
                    "cores_used": out.get("cores_used"),
                    "registered": m.get("registered"),
                    "points": m.get("points"),
                    "mean_reprojection_error": m.get("mean_reprojection_error"),
                    "camera_rms": _camera_error(workspace, scene_dir),
                }
            )
            print(
                f"mapper {n_images} {mapper:11s}: {out['seconds']:7.1f} s, registered "
                f"{m.get('registered')}/{n_images}, camera rms {runs[mapper][-1]['camera_rms']}",
                flush=True,
            )
    shutil.rmtree(workspace, ignore_errors=True)
    summary = {
        mapper: {
            "seconds_median": statistics.median(x["seconds"] for x in rs),
            "seconds_min": min(x["seconds"] for x in rs),
            "seconds_max": max(x["seconds"] for x in rs),
            "registered_min": min(x["registered"] or 0 for x in rs),
            "camera_rms_max": max((x["camera_rms"] or float("inf")) for x in rs),
        }
        for mapper, rs in runs.items()
    }
    return {
        "images": n_images,
        "size": list(SIZE),
        "variant": "hard",
        "quality": "medium",
        "upstream": {
            s: {"seconds": v["seconds"], "peak_rss_mb": v["peak_rss_mb"], "metrics": v["metrics"]}
            for s, v in upstream.items()
        },
        "runs": runs,
        "summary": summary,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="32 photos, one round")
    ap.add_argument("--sizes", default="32,64,128", help="photo counts (default 32,64,128)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each mapper (default 2)")
    args = ap.parse_args(argv)
    sizes = [32] if args.quick else [int(x) for x in args.sizes.split(",")]
    rounds = 1 if args.quick else args.rounds
    before = load()
    with tempfile.TemporaryDirectory(prefix="dropmesh-bench-") as tmp:
        results = [measure(n, rounds, Path(tmp)) for n in sizes]
    out = {
        "quick": args.quick,
        "rounds": rounds,
        "sizes": results,
        "load_before": before,
        "load_after": load(),
    }
    print(f"written to {write_results('mapper', out)}")
    return out


if __name__ == "__main__":
    main()
