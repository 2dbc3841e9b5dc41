"""A fast stand-in for the photogrammetry stages, for daemon tests only.

Behaviour comes from `fake.json` in the request's images folder, per stage:
  {"features": {"sleep": 2.0}, "stereo": {"fail": 2, "how": "segv"}, "mapping": {"hang": true}}
how: segv | kill | memory | transient | permanent | exit | enospc. `fail: N` fails the
first N attempts of that stage (counted in the workspace), `fail: -1` always.

Observation points for crash tests: `"pause_after_publish": S` writes
`<workspace>/.<stage>.published` once the stage's output is published and then waits S
seconds before returning its result; `"pause_mid_publish": S` (export) writes
`<workspace>/.export.midpublish` after the first format is published and waits S seconds
before publishing the next. `"real": true` runs the real stage instead, as does every
stage named in the environment variable DROPMESH_TEST_REAL_STAGES (comma-separated).

Each stage holds an exclusive lock on the job's workspace while it runs; a stage that
finds it taken (two stages of one job running at once, e.g. by two daemons) writes
`overlaps.log` into the workspace for the tests to find.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import signal
import subprocess
import time

import numpy as np

from pipeline import Export, StageContext, StageResult
from pipeline.errors import PermanentError, TransientError


def _behaviour(ctx: StageContext, stage: str) -> dict:
    f = ctx.spec.images / "fake.json"
    if not f.exists():
        return {}
    data = json.loads(f.read_text())
    return data.get(stage, {}) | {"_all": data.get("_all", {})}


def _fail(how: str, stage: str) -> None:
    if how == "segv":
        ctypes.string_at(0)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "memory":
        raise MemoryError()
    if how == "transient":
        raise TransientError(f"{stage} hit a transient fault")
    if how == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device")
    if how == "exit":
        os._exit(3)
    raise PermanentError(f"{stage} cannot go on with these images", hint="fake")


def run_stage(stage: str, ctx: StageContext) -> StageResult:
    lock = os.open(ctx.workspace / ".stage.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with open(ctx.workspace / "overlaps.log", "a") as f:
            f.write(f"{stage} {os.getpid()} {time.time()}\n")
    try:
        return _run_stage(stage, ctx)
    finally:
        os.close(lock)


def _run_stage(stage: str, ctx: StageContext) -> StageResult:
    beh = _behaviour(ctx, stage)
    if beh.get("real") or stage in os.environ.get("DROPMESH_TEST_REAL_STAGES", "").split(","):
        from pipeline.stages import run_stage as real_run_stage

        return real_run_stage(stage, ctx)
    out = ctx.workspace / stage
    counter = ctx.workspace / f".{stage}.attempts"
    # (empty when an earlier attempt was killed while writing it)
    tries = int(counter.read_text() or 0) + 1 if counter.exists() else 1
    counter.write_text(str(tries))
    started = time.time()
    with open(ctx.workspace / "stage_runs.log", "a") as f:
        f.write(f"{stage} {os.getpid()} {started}\n")
    if beh.get("child"):
        # A grandchild process, to check that whole process trees are stopped.
        subprocess.Popen(["sleep", "300"])
    fail = beh.get("fail", 0)
    if fail and (fail < 0 or tries <= fail):
        _fail(beh.get("how", "permanent"), stage)
    steps = int(beh.get("steps", 5))
    sleep = float(beh.get("sleep", beh.get("_all", {}).get("sleep", 0.05)))
    for i in range(steps):
        ctx.check_cancelled()
        time.sleep(sleep / steps)
        ctx.progress((i + 1) / steps, f"{stage} step {i + 1} of {steps}")
    while beh.get("hang"):
        time.sleep(1)
    tmp = ctx.workspace / f"{stage}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "done.txt").write_text(stage)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    with open(ctx.workspace / "stage_times.log", "a") as f:
        f.write(f"{stage} {started} {time.time()} {ctx.threads}\n")  # threads: the daemon's
    if stage != "export":
        result = StageResult(metrics={"stage": stage, "tries": tries})
    else:
        result = StageResult(metrics={"faces": 12}, exports=_export(ctx, beh))
    marker = ctx.workspace / f".{stage}.published"
    if beh.get("pause_after_publish") and not marker.exists():  # once per stage
        marker.write_text(str(tries))
        time.sleep(float(beh["pause_after_publish"]))
    return result


def _export(ctx: StageContext, beh: dict) -> list[Export]:
    import trimesh

    mesh = trimesh.creation.box(extents=(1, 1, 1))
    mesh.visual.vertex_colors = np.tile([200, 80, 40, 255], (len(mesh.vertices), 1))
    ctx.results_dir.mkdir(parents=True, exist_ok=True)
    exports = []
    for fmt in ctx.spec.formats:
        final = ctx.results_dir / f"{ctx.spec.job_id}_textured_mesh_poisson.{fmt}"
        tmp = final.with_name(f".{final.name}.tmp")
        mesh.export(str(tmp), file_type=fmt)
        os.replace(tmp, final)
        exports.append(Export(final, fmt))
        marker = ctx.workspace / ".export.midpublish"
        if beh.get("pause_mid_publish") and len(exports) == 1 and not marker.exists():
            marker.write_text(fmt)
            time.sleep(float(beh["pause_mid_publish"]))
    return exports
