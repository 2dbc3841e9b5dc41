"""Texture: the texture stage's share of a job's time and how much better the textured
export explains photos the job never saw than the vertex-coloured mesh and a flat mean
colour (PSNR after one gain per channel, SSIM, coverage).

The demo scene is rendered with every camera; HELD_OUT of them are left out of the job.
The texture stage's share is also taken on a whole job of the real castel photos.
Each stage runs in its own child process, as in the daemon (wall time and peak RSS).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import write_results
from bench.workload import load, run_pipeline_children, scene, spec_json

SIZE = (1024, 768)
HELD_OUT = 3  # every n_images // HELD_OUT-th photo, starting at 1


def held_out_figures(
    workspace: Path, scene_dir: Path, names: list[str], picture: bool = True
) -> dict[str, Any]:
    """Held-out scores per view and their mean; with `picture`, the first view's photo |
    vertex colours | texture strip goes to bench/results/texture.jpg."""
    from PIL import Image

    from pipeline.evaluate import align_to_truth
    from pipeline.stages.texture import held_out_scores

    truth_json = scene_dir / "ground_truth" / "cameras.json"
    truth = json.loads(truth_json.read_text())
    alignment = align_to_truth(workspace / "undistort" / "sparse", truth_json)
    per_view = {}
    strip: list[np.ndarray] = []
    for name in names:
        cam = truth["images"][name]
        with Image.open(scene_dir / "images" / name) as im:
            photo = np.asarray(im.convert("RGB"), np.float64) / 255.0
        renders: dict[str, np.ndarray] = {}
        per_view[name] = held_out_scores(
            workspace,
            photo,
            np.asarray(truth["K"]),
            np.asarray(cam["R"]),
            np.asarray(cam["t"]),
            alignment.apply,
            renders,
        )
        if picture and not strip:  # photo | vertex colours | texture, for BENCHMARKS.md
            strip = [photo, renders["vertex_colour"], renders["textured"]]
    if strip:
        from bench.report import RESULTS

        row = np.concatenate(strip, axis=1)
        Image.fromarray((np.clip(row, 0, 1) * 255 + 0.5).astype(np.uint8)).save(
            RESULTS / "texture.jpg", quality=88
        )
    mean = {
        kind: {
            key: round(float(np.mean([v[kind][key] for v in per_view.values()])), 4)
            for key in ("psnr_db", "ssim", "coverage")
        }
        for kind in ("textured", "vertex_colour", "flat")
    }
    return {"views": per_view, "mean": mean}


def budget_sweep(
    spec: dict[str, Any], workspace: Path, scene_dir: Path, held: list[str], budgets: list[int]
) -> list[dict[str, Any]]:
    """The same job meshed again at other face budgets (meshing, color and texture in
    their own processes, on the job's fused points): per budget the faces, the texture
    stage's time (its own clock, without the process start), the object's F-score (1 % of
    its box) and the held-out PSNR of the textured and of the vertex-coloured mesh. The
    job's own budget is the row of `workspace` itself."""
    from pipeline.evaluate import evaluate_object
    from pipeline.presets import preset

    own = preset(spec["quality"], spec.get("options")).face_budget
    redo = ("meshing", "color", "texture")
    rows = []
    for budget in sorted({*budgets, own}):
        ws = workspace
        if budget != own:
            ws = workspace.parent / f"{workspace.name}-faces-{budget}"
            ws.mkdir()
            for part in workspace.iterdir():
                if part.name not in (*redo, "export"):
                    (ws / part.name).symlink_to(part)
            options = {**spec.get("options", {}), "face_budget": budget}
            run_pipeline_children({**spec, "options": options}, ws, redo)
        metrics = json.loads((ws / "texture" / "metrics.json").read_text())["metrics"]
        figures = held_out_figures(ws, scene_dir, held, picture=False)["mean"]
        score = evaluate_object(
            ws / "color" / "mesh.ply", scene_dir / "ground_truth", ws / "mapping" / "sparse" / "0"
        )
        rows.append(
            {
                "face_budget": budget,
                "faces": metrics["faces"],
                "texture_s": metrics["seconds"],  # the stage's own clock, in every row
                "object_fscore": round(float(score.fscore), 4),
                "textured_psnr_db": figures["textured"]["psnr_db"],
                "vertex_colour_psnr_db": figures["vertex_colour"]["psnr_db"],
            }
        )
    return rows


def texture_share(stages: dict[str, Any]) -> dict[str, Any]:
    """A job's wall time (its stages', each process start to exit) and the texture
    stage's share of it."""
    total = sum(s["wall_s"] for s in stages.values())
    return {
        "job_wall_s": round(total, 2),
        "texture_wall_s": stages["texture"]["wall_s"],
        "texture_share": round(stages["texture"]["wall_s"] / total, 4),
    }


def castel_share(tmp: Path, quality: str) -> dict[str, Any]:
    """The whole job on the real castel photos (bench.sparse's), each stage in its own
    process: the texture stage's wall time against the job's."""
    from bench.sparse import castel_job

    images, spec = castel_job(tmp / "castel", quality)
    stages = run_pipeline_children(spec, tmp / "castel-ws")
    return {"images": len(list(images.iterdir())), **texture_share(stages), "stages": stages}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--quality", default=None, help="default: medium (low with --quick)")
    ap.add_argument(
        "--budgets",
        default="50000,100000,200000",
        help="face budgets to mesh the job again at, beside its preset's (comma-separated; "
        "empty: none)",
    )
    args = ap.parse_args(argv)
    quality = args.quality or ("low" if args.quick else "medium")
    n_images = 12 if args.quick else 24
    size = (640, 480) if args.quick else SIZE
    scene_dir = scene(n_images, size)
    photos = sorted((scene_dir / "images").glob("*.jpg"))
    step = max(2, n_images // HELD_OUT)
    held = [p.name for p in photos[1::step]][:HELD_OUT]
    before = load()
    with tempfile.TemporaryDirectory(prefix="dropmesh-bench-texture-") as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        for p in photos:
            if p.name not in held:
                shutil.copy(p, images / p.name)
        spec = spec_json(scene_dir, quality)
        spec["images"] = str(images)
        spec["formats"] = ["glb", "obj", "ply"]
        ws = Path(tmp) / "ws"
        stages = run_pipeline_children(spec, ws)
        figures = held_out_figures(ws, scene_dir, held, picture=quality == "medium")
        texture_metrics = json.loads((ws / "texture" / "metrics.json").read_text())["metrics"]
        budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
        sweep = budget_sweep(spec, ws, scene_dir, held, budgets)
        castel = castel_share(Path(tmp), quality) if not args.quick else None
    share = texture_share(stages)
    results = {
        "quick": args.quick,
        "load_before": before,
        "load_after": load(),
        "quality": quality,
        "images": n_images - len(held),
        "held_out": held,
        "size": list(size),
        **share,
        "stages": stages,
        "texture": texture_metrics,
        "held_out_scores": figures,
        "face_budgets": sweep,
    }
    if castel is not None:
        results["castel"] = castel
    m = figures["mean"]
    print(
        f"texture {share['texture_wall_s']:.1f} s of {share['job_wall_s']:.1f} s "
        f"({100 * share['texture_share']:.0f} %); "
        f"held-out PSNR textured {m['textured']['psnr_db']:.2f} dB, vertex colours "
        f"{m['vertex_colour']['psnr_db']:.2f} dB, flat {m['flat']['psnr_db']:.2f} dB"
    )
    # the default preset's figures are the suite's (its targets); others are kept beside
    write_results("texture" if quality == "medium" else f"texture-{quality}", results)
    return results
