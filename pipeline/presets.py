"""Quality presets. A request's [options] may override any field by name."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class Preset:
    max_image_size: int  # longest image side after ingest, px
    max_num_features: int
    matcher: str  # auto | exhaustive | sequential | vocabtree | spatial
    mapper: str  # auto | incremental | global (auto: see pipeline/stages/mapping.py)
    # the most the depth maps' longest side may be, px (0: no limit); they are made at half
    # the photos' size, at least 640 px (pipeline/stages/undistort.py: stereo_size)
    stereo_max_size: int
    # Poisson's octree depth for depth maps at stereo_max_size, one level less per halving
    # of them below it (pipeline/stages/meshing.py: octree_depth)
    poisson_depth: int
    face_budget: int  # decimate the mesh to at most this many faces
    # off | weak | on: guided matching (a second search along the verified geometry) finds
    # more matches on hard pairs, at ~20x the CPU time of plain matching. "weak" matches
    # every pair plainly, then again guided only the pairs verified with few inliers that
    # show a poorly connected photo (pipeline/stages/matching.py).
    guided_matching: str = "weak"
    texture_size: int = 4096  # longest side of the baked texture atlas, texels

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    "low": Preset(
        max_image_size=800,
        max_num_features=4096,
        matcher="auto",
        mapper="auto",
        stereo_max_size=400,
        poisson_depth=8,
        face_budget=50_000,
        guided_matching="off",
        texture_size=2048,
    ),
    "medium": Preset(
        max_image_size=1600,
        max_num_features=8192,
        matcher="auto",
        mapper="auto",
        stereo_max_size=800,
        poisson_depth=9,
        # the texture carries the detail: on the demo scene (bench texture) 100,000 faces
        # score the object's F-score and the held-out textured PSNR of 200,000, with the
        # texture stage a third faster
        face_budget=100_000,
    ),
    "high": Preset(
        max_image_size=3200,
        max_num_features=16384,
        matcher="auto",
        mapper="auto",
        stereo_max_size=1600,
        poisson_depth=10,
        # on the demo scene (bench texture --quality high, photos of 1024 px) 200,000 and
        # 500,000 faces score the object's F-score and held-out textured PSNR of
        # 1,000,000, with the texture stage 2.3 (500,000) to 5 times faster; high keeps
        # the larger, for photos of up to 3200 px
        face_budget=500_000,
        texture_size=8192,
    ),
}

# Option name -> accepted Python type, for request validation.
OPTION_KEYS: dict[str, type] = {f.name: int if f.type == "int" else str for f in fields(Preset)}
OPTION_CHOICES: dict[str, tuple[str, ...]] = {
    "matcher": ("auto", "exhaustive", "sequential", "vocabtree", "spatial"),
    "mapper": ("auto", "incremental", "global"),
    "guided_matching": ("off", "weak", "on"),
}


def preset(quality: str, options: dict[str, Any] | None = None) -> Preset:
    base = PRESETS[quality]
    return replace(base, **(options or {}))
