"""Run the real pipeline on one demo variant and measure it against its ground truth.

Shared by tests/pipeline/test_variants.py and by anyone measuring the variants by hand:

    python tests/pipeline/variant_runs.py OUT VARIANT [VARIANT ...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import open3d as o3d
import pycolmap

from pipeline import JobSpec, StageContext, run_stage
from pipeline.demo import render_scene
from pipeline.evaluate import evaluate, evaluate_object

SPARSE = ("ingest", "features", "matching", "mapping", "undistort")
DENSE = ("stereo", "fusion", "meshing", "color")
IMAGES = 16


def run_variant(root: Path, variant: str, *, dense: bool = True) -> dict[str, Any]:
    """Render `variant` into root/scene, run the pipeline (quality low) in root/ws and
    return the figures: registration, camera error, focal and k1, scene and object F."""
    scene, workspace = root / "scene", root / "ws"
    info = render_scene(scene, n_images=IMAGES, seed=0, variant=variant)
    spec = JobSpec(project=variant, images=scene / "images", quality="low", job_id="v")
    seconds: dict[str, float] = {}
    results = {}
    stages = SPARSE + (DENSE if dense else ())
    for name in stages:
        t0 = time.perf_counter()
        ctx = StageContext(spec=spec, workspace=workspace, results_dir=root / "results")
        results[name] = run_stage(name, ctx)
        seconds[name] = round(time.perf_counter() - t0, 1)
    mapping = results["mapping"].metrics
    model = pycolmap.Reconstruction(workspace / "mapping" / "sparse" / "0")
    names = sorted(image.name for image in model.images.values())
    estimated = np.array([model.find_image_with_name(n).projection_center() for n in names])
    truth = np.array([info["images"][n]["centre"] for n in names])
    sim = pycolmap.estimate_sim3d(estimated, truth)
    matrix = np.asarray(sim.matrix())
    errors = np.linalg.norm(estimated @ matrix[:, :3].T + matrix[:, 3] - truth, axis=1)
    depth_error, constant_error = depth_errors(model, info, matrix, scene / "ground_truth")
    camera = model.cameras[next(iter(model.cameras))]
    focal = info["focal_px"] * camera.width / info["width"]
    with pycolmap.Database.open(str(workspace / "features" / "database.db")) as db:
        keypoints = [db.read_keypoints(im.image_id).shape[0] for im in db.read_all_images()]
    out: dict[str, Any] = {
        "variant": variant,
        "size": [info["width"], info["height"]],
        "registered": int(mapping["registered"]),
        "total": int(mapping["total"]),
        "models": int(mapping["models"]),
        "pairs": int(results["matching"].metrics["pairs"]),
        "still_background_pairs": int(results["matching"].metrics["still_background_pairs"]),
        "keypoints_median": int(np.median(keypoints)),
        "centre_error_max": float(errors.max() / info["scene_size"]),
        "centre_error_mean": float(errors.mean() / info["scene_size"]),
        # ingest may have resized the photos: the true focal length at the model's size
        "focal_error": float(abs(camera.params[0] / focal - 1.0)),
        "k1": float(camera.params[3]) if len(camera.params) > 3 else 0.0,
        "k1_truth": float(info["params"][3]),
        "depth_error": depth_error,
        "depth_error_constant": constant_error,
        "seconds": seconds,
    }
    if dense:
        args = (workspace / "color" / "mesh.ply", scene / "ground_truth")
        sparse = workspace / "undistort" / "sparse"
        # the median share of a photo fusion left out as still background (None: none)
        out["background_masked"] = results["fusion"].metrics["background_masked"]
        out["scene_fscore"] = evaluate(*args, sparse, samples=100_000).to_json()["fscore"]
        obj = evaluate_object(*args, sparse, samples=100_000).to_json()
        out["object"] = {k: obj[k] for k in ("precision", "recall", "fscore", "threshold")}
    return out


def depth_errors(
    model: pycolmap.Reconstruction, info: dict[str, Any], sim: np.ndarray, truth_dir: Path
) -> tuple[float, float]:
    """How far each photo's sparse points lie from the true surface along its own rays:
    the median of |distance / true distance - 1| over every observation, with the model
    aligned to the truth by its camera centres; beside it, the same for one constant
    distance per photo (the median true one), the error of a reconstruction with no depth."""
    surface = o3d.t.geometry.RaycastingScene()
    surface.add_triangles(o3d.t.io.read_triangle_mesh(str(truth_dir / "mesh.ply")))
    points = {i: p.xyz @ sim[:, :3].T + sim[:, 3] for i, p in model.points3D.items()}
    errors, constant = [], []
    for image in model.images.values():
        centre = np.array(info["images"][image.name]["centre"])
        seen = np.array([points[p.point3D_id] for p in image.points2D if p.has_point3D()])
        distance = np.linalg.norm(seen - centre, axis=1)
        rays = np.hstack([np.tile(centre, (len(seen), 1)), (seen - centre) / distance[:, None]])
        hit = surface.cast_rays(o3d.core.Tensor(rays.astype(np.float32)))["t_hit"].numpy()
        ok = np.isfinite(hit)
        errors.append(np.abs(distance[ok] / hit[ok] - 1.0))
        constant.append(np.abs(np.median(hit[ok]) / hit[ok] - 1.0))
    return float(np.median(np.concatenate(errors))), float(np.median(np.concatenate(constant)))


def main(argv: list[str]) -> int:
    root = Path(argv[0])
    for variant in argv[1:]:
        figures = run_variant(root / variant, variant)
        print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
