"""CPU dense stereo: dropmesh's stereo stage against plain OpenCV semi-global matching on
the same rectified pairs, side by side in one run.

dropmesh's stage makes one filtered depth map (and normal map) per image, from one SGBM
per neighbour pair it chooses (up to 4 per image; each gives both views' depths), an
occlusion check, pair agreement and a multi-view consistency check. The baseline is one
`StereoSGBM.compute` per pair (same block size, penalties and mode, OpenCV's own
threading) on the pairs the stage chose, rectified beforehand (not timed): the raw
matcher's throughput. Both are given in
depth-map megapixels per second (each output map counted at the image's depth-map size).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import write_results
from bench.workload import load, scene

SIZE = (1024, 768)
SPARSE = ("ingest", "features", "matching", "mapping", "undistort")


def _context(ws: Path, images: Path, quality: str) -> Any:
    from pipeline import JobSpec, StageContext

    spec = JobSpec(project="bench", images=images, quality=quality, job_id="bench")
    return StageContext(spec=spec, workspace=ws, results_dir=ws / "results", device="cpu")


def prepared_pairs(ws: Path, max_size: int) -> tuple[list[tuple[Any, ...]], tuple[int, int]]:
    import cv2

    from pipeline.stages.stereo.cpu import load_image
    from pipeline.stages.stereo.rectify import rectify
    from pipeline.stages.stereo.views import covisibility, load_views, neighbours

    undistort = ws / "undistort"
    views = load_views(undistort / "sparse", max_size)
    co = covisibility(undistort / "sparse", views)
    stereo_nb, _ = neighbours(views, co)
    pairs = sorted({(min(i, j), max(i, j)) for i, nb in enumerate(stereo_nb) for j in nb})
    out = []
    for i, j in pairs:
        a, b = views[i], views[j]
        rect = rectify(a, b)
        if rect is None:
            continue
        ia = load_image(undistort / "images" / a.name, a)
        ib = load_image(undistort / "images" / b.name, b)
        left = cv2.warpPerspective(ia, rect.h_ref, rect.size, flags=cv2.INTER_LINEAR)
        right = cv2.warpPerspective(ib, rect.h_src, rect.size, flags=cv2.INTER_LINEAR)
        out.append((left, right, rect.min_disp, rect.num_disp))
    return out, (views[0].width, views[0].height)


def plain_sgbm(pairs: list[tuple[Any, ...]]) -> float:
    import cv2

    cv2.setNumThreads(-1)
    block = 5
    t0 = time.perf_counter()
    for left, right, min_disp, num_disp in pairs:
        sgbm = cv2.StereoSGBM.create(
            minDisparity=min_disp,
            numDisparities=num_disp,
            blockSize=block,
            P1=8 * 3 * block * block,
            P2=32 * 3 * block * block,
            mode=cv2.STEREO_SGBM_MODE_SGBM_3WAY,
        )
        sgbm.compute(left, right)
    return time.perf_counter() - t0


def dropmesh_stereo(ws: Path, images: Path, quality: str) -> tuple[float, dict[str, Any]]:
    from pipeline import run_stage

    shutil.rmtree(ws / "stereo", ignore_errors=True)
    t0 = time.perf_counter()
    result = run_stage("stereo", _context(ws, images, quality))
    return time.perf_counter() - t0, result.metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--quality", default="medium")
    args = ap.parse_args(argv)
    from pipeline import run_stage
    from pipeline.presets import preset

    n_images = 8 if args.quick else 16
    reps = 1 if args.quick else 3
    scene_dir = scene(n_images, SIZE)
    images = scene_dir / "images"
    before = load()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dropmesh-bench-") as tmp:
        ws = Path(tmp)
        for name in SPARSE:
            run_stage(name, _context(ws, images, args.quality))
        pairs, (w, h) = prepared_pairs(ws, preset(args.quality).stereo_max_size)
        mp = w * h / 1e6
        for rep in range(reps):
            first_dropmesh = rep % 2 == 0
            if first_dropmesh:
                t_d, metrics = dropmesh_stereo(ws, images, args.quality)
            t_p = plain_sgbm(pairs)
            if not first_dropmesh:
                t_d, metrics = dropmesh_stereo(ws, images, args.quality)
            maps = int(metrics["depth_maps"])
            row: dict[str, Any] = {
                "dropmesh_s": round(t_d, 3),
                "dropmesh_maps": maps,
                "dropmesh_mp_per_s": round(maps * mp / t_d, 3),
                "dropmesh_split_s": {
                    k: metrics.get(k)
                    for k in ("seconds_matching", "seconds_depth_maps", "seconds_consistency")
                },
                "sgbm_s": round(t_p, 3),
                "sgbm_maps": len(pairs),
                "sgbm_mp_per_s": round(len(pairs) * mp / t_p, 3),
            }
            row["ratio_mp_per_s"] = round(row["dropmesh_mp_per_s"] / row["sgbm_mp_per_s"], 3)
            rows.append(row)
            print(
                f"stereo rep {rep + 1}/{reps}: dropmesh {maps} maps in {t_d:.1f} s "
                f"({row['dropmesh_mp_per_s']:.2f} MP/s), plain SGBM {len(pairs)} pairs in "
                f"{t_p:.1f} s ({row['sgbm_mp_per_s']:.2f} MP/s)"
            )
    results = {
        "quick": args.quick,
        "quality": args.quality,
        "images": n_images,
        "size": list(SIZE),
        "depth_map_size": [w, h],
        "runs": rows,
        "median": {
            k: round(statistics.median(r[k] for r in rows), 3)
            for k in ("dropmesh_mp_per_s", "sgbm_mp_per_s", "ratio_mp_per_s")
        },
        "load_before": before,
        "load_after": load(),
    }
    path = write_results("stereo", results)
    m = results["median"]
    print(
        f"median: dropmesh {m['dropmesh_mp_per_s']:.2f} MP/s of depth maps, plain SGBM "
        f"{m['sgbm_mp_per_s']:.2f} MP/s, ratio {m['ratio_mp_per_s']:.2f}"
    )
    print(f"written to {path}")
    return results


if __name__ == "__main__":
    main()
