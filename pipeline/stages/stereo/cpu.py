"""The CPU engine: OpenCV semi-global matching on pairs of neighbouring views, then the
consistency checks and normal maps, in three passes over parallel threads (OpenCV and
numpy release the GIL):

1. each pair is matched once and gives depths to both of its views (saved in a scratch
   folder);
2. each view's pair depths are combined into its photometric depth map;
3. each photometric map is checked against the neighbours' into the geometric map, which
   fusion reads, with its normal map.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np

from pipeline.context import StageContext
from pipeline.errors import Cancelled, PermanentError
from pipeline.stages._common import UNDISTORT_IMAGES, UNDISTORT_MODEL, Timer, thread_count
from pipeline.stages.stereo.colmap_files import (
    DEPTH_DIR,
    NORMAL_DIR,
    from_colmap,
    read_colmap_array,
    to_colmap,
    write_colmap_array,
    write_configs,
)
from pipeline.stages.stereo.consistency import combine_pairs, geometric_filter
from pipeline.stages.stereo.normals import normals_from_depth
from pipeline.stages.stereo.sgbm import pair_depths, texture_mask
from pipeline.stages.stereo.views import View, covisibility, load_views, neighbours

T = TypeVar("T")


def load_image(path: Path, view: View) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise PermanentError(f"cannot read image {path}")
    if img.shape[1] != view.width or img.shape[0] != view.height:
        img = cv2.resize(img, (view.width, view.height), interpolation=cv2.INTER_AREA)
    return img


class ImageCache:
    """Each view's image decoded and resized once, and its texture mask computed once;
    an image is dropped after the last pair that uses it, a mask once it is used."""

    def __init__(self, folder: Path, views: list[View], pairs: list[tuple[int, int]]) -> None:
        self.folder = folder
        self.views = views
        self._uses = {v.index: 0 for v in views}
        for i, j in pairs:
            self._uses[i] += 1
            self._uses[j] += 1
        self._lock = threading.Lock()
        self._view_locks = {v.index: threading.Lock() for v in views}
        self._images: dict[int, np.ndarray] = {}
        self._textures: dict[int, np.ndarray] = {}

    def image(self, i: int) -> np.ndarray:
        with self._view_locks[i]:
            img = self._images.get(i)
            if img is None:
                view = self.views[i]
                img = load_image(self.folder / view.name, view)
                self._images[i] = img
                self._textures[i] = texture_mask(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
            return img

    def release(self, i: int) -> None:
        with self._lock:
            self._uses[i] -= 1
            if self._uses[i] <= 0:
                self._images.pop(i, None)

    def texture(self, i: int) -> np.ndarray:
        mask = self._textures.pop(i, None)  # used once, by the view's depth map
        if mask is None:
            view = self.views[i]
            gray = cv2.cvtColor(load_image(self.folder / view.name, view), cv2.COLOR_BGR2GRAY)
            mask = texture_mask(gray)
        return mask


def parallel(
    ctx: StageContext,
    items: range,
    work: Callable[[int], T],
    workers: int,
    on_done: Callable[[int], None],
) -> dict[int, T]:
    """Run work(item) for every item on `workers` threads and return the results by item;
    check for a cancel between items (on this thread: ctx.cancelled may not be thread-safe).
    `on_done(count)` is called, on this thread, after each item."""
    stop = threading.Event()

    def guarded(item: int) -> T | None:
        if stop.is_set():
            return None
        return work(item)

    results: dict[int, T] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: dict[Future[Any], int] = {}
        queue = list(items)
        try:
            while queue or pending:
                while queue and len(pending) < workers * 2:
                    item = queue.pop(0)
                    pending[pool.submit(guarded, item)] = item
                finished_now, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in finished_now:
                    results[pending.pop(fut)] = fut.result()
                    on_done(len(results))
                if ctx.cancelled():
                    raise Cancelled()
        except BaseException:
            stop.set()
            for fut in pending:
                fut.cancel()
            raise
    return results


@dataclass(frozen=True)
class Plan:
    """The views, the pairs to match (each once, giving depths to both of its views) and
    the views each depth map is checked against."""

    views: list[View]
    stereo_nb: list[list[int]]  # per view: the views it is matched with
    check_nb: list[list[int]]  # per view: the views its depths must agree with
    pairs: list[tuple[int, int]]


def plan(sparse_dir: Path, max_size: int) -> Plan:
    views = load_views(sparse_dir, max_size)
    if not views:
        raise PermanentError("the sparse model has no registered images")
    stereo_nb, check_nb = neighbours(views, covisibility(sparse_dir, views))
    pairs = sorted({(min(i, j), max(i, j)) for i, nb in enumerate(stereo_nb) for j in nb})
    return Plan(views, stereo_nb, check_nb, pairs)


@dataclass(frozen=True)
class Folders:
    depth: Path  # depth maps, COLMAP's layout
    normal: Path  # normal maps
    scratch: Path  # pair depths, until the photometric maps are made


def match_pair(plan: Plan, images: ImageCache, folders: Folders, k: int) -> None:
    """Pass 1: depths for both views of pair k, saved as `<i>-<j>.<view>.npy`."""
    i, j = plan.pairs[k]
    try:
        depths = pair_depths(plan.views[i], plan.views[j], images.image(i), images.image(j))
    finally:
        images.release(i)
        images.release(j)
    if depths is not None:
        np.save(folders.scratch / f"{i}-{j}.{i}.npy", depths[0])
        np.save(folders.scratch / f"{i}-{j}.{j}.npy", depths[1])


def photometric_map(plan: Plan, images: ImageCache, folders: Folders, i: int) -> None:
    """Pass 2: view i's pair depths combined, blank pixels removed. Only the geometric
    step reads it; its normals are never used (fusion reads the geometric maps), so they
    are computed once, for the geometric map."""
    view = plan.views[i]
    candidates = [np.load(p) for p in sorted(folders.scratch.glob(f"*.{i}.npy"))]
    if candidates:
        depth = combine_pairs(candidates)
        depth[~images.texture(i)] = np.nan
    else:
        depth = np.full((view.height, view.width), np.nan, np.float32)
    write_colmap_array(folders.depth / f"{view.name}.photometric.bin", to_colmap(depth))


def load_photometric(folders: Folders, view: View) -> np.ndarray:
    return from_colmap(read_colmap_array(folders.depth / f"{view.name}.photometric.bin"))


def geometric_map(plan: Plan, folders: Folders, i: int) -> float:
    """Pass 3: view i's depths that its neighbours agree with, and their normals.
    Returns the share of pixels with a depth."""
    view = plan.views[i]
    others = [plan.views[j] for j in plan.check_nb[i]]
    load = partial(load_photometric, folders)
    depth = geometric_filter(view, load(view), others, load)
    name = f"{view.name}.geometric.bin"
    write_colmap_array(folders.depth / name, to_colmap(depth))
    write_colmap_array(folders.normal / name, normals_from_depth(depth, view.K))
    return float(np.isfinite(depth).mean())


def report(ctx: StageContext, start: float, span: float, what: str, total: int, done: int) -> None:
    """Progress of a pass that covers [start, start + span] of the stage."""
    ctx.progress(start + span * done / max(1, total), f"{what} {done}/{total}")


def run_cpu(ctx: StageContext, out: Path, max_size: int) -> dict[str, Any]:
    work = plan(ctx.workspace.joinpath(*UNDISTORT_MODEL), max_size)
    views, n, n_pairs = work.views, len(work.views), len(work.pairs)
    folders = Folders(out / "stereo" / DEPTH_DIR, out / "stereo" / NORMAL_DIR, out / ".pairs")
    folders.scratch.mkdir()
    images = ImageCache(ctx.workspace.joinpath(*UNDISTORT_IMAGES), views, work.pairs)
    workers = thread_count(ctx)
    cv2.setNumThreads(1 if workers > 1 else 0)

    ctx.progress(0.0, f"stereo pairs 0/{n_pairs}")
    timer = Timer()
    parallel(
        ctx,
        range(n_pairs),
        partial(match_pair, work, images, folders),
        workers,
        partial(report, ctx, 0.0, 0.75, "stereo pairs", n_pairs),
    )
    t_match = timer.seconds
    parallel(
        ctx,
        range(n),
        partial(photometric_map, work, images, folders),
        workers,
        partial(report, ctx, 0.75, 0.1, "depth maps", n),
    )
    shutil.rmtree(folders.scratch)
    t_photometric = timer.seconds
    valid = parallel(
        ctx,
        range(n),
        partial(geometric_map, work, folders),
        workers,
        partial(report, ctx, 0.85, 0.15, "consistency check", n),
    )
    write_configs(
        out, [v.name for v in views], [[views[j].name for j in nb] for nb in work.stereo_nb]
    )
    return {
        "engine": "opencv-sgbm",
        "depth_maps": n,
        "stereo_pairs": n_pairs,
        "depth_map_size": [views[0].width, views[0].height],
        "valid_fraction": round(float(np.mean([valid[i] for i in sorted(valid)])), 4)
        if valid
        else 0.0,
        "seconds_matching": t_match,
        "seconds_depth_maps": round(t_photometric - t_match, 3),
        "seconds_consistency": round(timer.seconds - t_photometric, 3),
        "threads": workers,
    }
