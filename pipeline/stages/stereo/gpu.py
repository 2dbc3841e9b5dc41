"""The GPU engine: COLMAP PatchMatch (`pycolmap.patch_match_stereo`, geometric
consistency) on CUDA. The CUDA build of pycolmap aborts the process if PatchMatch runs
without a GPU: the stage runs this engine only where `choose_device` found one."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pycolmap

from pipeline.context import StageContext
from pipeline.errors import Cancelled, TransientError
from pipeline.stages._common import UNDISTORT_MODEL, call_cancellable
from pipeline.stages.stereo.colmap_files import DEPTH_DIR, write_configs


def run_gpu(ctx: StageContext, out: Path, max_size: int) -> dict[str, Any]:
    rec = pycolmap.Reconstruction(str(ctx.workspace.joinpath(*UNDISTORT_MODEL)))
    names = [rec.images[i].name for i in sorted(rec.reg_image_ids())]
    write_configs(out, names, None)
    options = pycolmap.PatchMatchOptions()
    options.max_image_size = max_size
    options.geom_consistency = True
    options.filter = True
    depth_dir = out / "stereo" / DEPTH_DIR
    try:
        call_cancellable(
            ctx,
            partial(_patch_match, out, options),
            poll=partial(_report, ctx, depth_dir, max(1, len(names))),
            interval=1.0,
        )
    except Cancelled:
        raise
    except Exception as exc:
        raise TransientError(f"PatchMatch stereo failed: {exc}") from exc
    made = len(list(depth_dir.glob("*.geometric.bin")))
    if made == 0:
        raise TransientError("PatchMatch stereo wrote no depth maps")
    return {"engine": "colmap-patch-match", "depth_maps": made, "max_image_size": max_size}


def _patch_match(
    out: Path, options: pycolmap.PatchMatchOptions, token: pycolmap.CancellationToken
) -> None:
    pycolmap.patch_match_stereo(
        str(out), workspace_format="COLMAP", options=options, cancellation_token=token
    )


def _report(ctx: StageContext, depth_dir: Path, n: int) -> None:
    """Progress from the maps PatchMatch has written so far."""
    photometric = len(list(depth_dir.glob("*.photometric.bin")))
    geometric = len(list(depth_dir.glob("*.geometric.bin")))
    ctx.progress(
        min(1.0, (photometric + geometric) / (2 * n)),
        f"depth maps {photometric}/{n}, consistency {geometric}/{n}",
    )
