"""stereo: a depth map and a normal map for every undistorted image.

Reads the COLMAP dense workspace that `undistort` wrote (`<ws>/undistort/images`,
`sparse/`) and publishes `<ws>/stereo/` as a complete COLMAP dense workspace of its own:
`images` and `sparse` are relative links to undistort's, `stereo/` holds
`depth_maps/<image>.{photometric,geometric}.bin`, `normal_maps/<image>.geometric.bin`
(PatchMatch also writes photometric normal maps), `patch-match.cfg` and `fusion.cfg`:
exactly what `pycolmap.stereo_fusion` reads with input_type="geometric".

Two engines, chosen by `ctx.device` (auto | cpu | gpu):

- gpu (`gpu.py`): COLMAP PatchMatch with geometric consistency, on CUDA.
- cpu (`cpu.py`): OpenCV semi-global matching on rectified pairs of neighbouring views
  (`views.py` picks them from the sparse model by shared points and triangulation angle;
  `rectify.py`, `sgbm.py`), one matching per pair giving depths to both of its views, with
  an occlusion (left-right) check, agreement between the pairs of a view and a multi-view
  geometric consistency check against the neighbours' depth maps (`consistency.py`), and
  normals from local plane fits of the depth map (`normals.py`).

`colmap_files.py` reads and writes COLMAP's files.
"""

from __future__ import annotations

from pipeline.context import StageContext, StageResult
from pipeline.stages._common import (
    UNDISTORT_IMAGES,
    UNDISTORT_MODEL,
    Timer,
    choose_device,
    require,
    stage_preset,
)
from pipeline.stages._workspace import building, finished, record
from pipeline.stages.stereo.colmap_files import prepare_workspace
from pipeline.stages.stereo.cpu import run_cpu
from pipeline.stages.stereo.gpu import run_gpu

NAME = "stereo"


def run(ctx: StageContext) -> StageResult:
    done = finished(ctx, NAME)
    if done is not None:
        return done
    require(ctx, UNDISTORT_MODEL)
    require(ctx, UNDISTORT_IMAGES)
    timer = Timer()
    device = choose_device(ctx.device)
    max_size = stage_preset(ctx).stereo_max_size
    with building(ctx, NAME) as out:
        prepare_workspace(out)
        engine = run_gpu if device == "gpu" else run_cpu
        metrics = engine(ctx, out, max_size)
        metrics.update(device=device, stereo_max_size=max_size, seconds=timer.seconds)
        result = record(out, StageResult(metrics=metrics, device=device))
    ctx.progress(1.0, f"{metrics['depth_maps']} depth maps ({device})")
    return result


__all__ = ["NAME", "run"]
