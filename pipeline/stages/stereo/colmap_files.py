"""COLMAP's dense-workspace files, as stereo writes them and fusion reads them: depth and
normal maps in COLMAP's array format, `patch-match.cfg` and `fusion.cfg`, and the layout
(`images` and `sparse` shared with undistort, the maps below `stereo/`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DEPTH_DIR = "depth_maps"
NORMAL_DIR = "normal_maps"


def write_colmap_array(path: Path, array: np.ndarray) -> None:
    """Write a (H, W) or (H, W, C) float32 array in COLMAP's mvs::Mat format:
    an ASCII header `width&height&channels&`, then the channels one after another,
    each row-major, little-endian float32."""
    a = np.asarray(array, dtype="<f4")
    if a.ndim == 2:
        a = a[:, :, None]
    h, w, c = a.shape
    with open(path, "wb") as fh:
        fh.write(f"{w}&{h}&{c}&".encode())
        fh.write(np.ascontiguousarray(a.transpose(2, 0, 1)).tobytes())


def read_colmap_array(path: Path) -> np.ndarray:
    """Read a COLMAP depth map (H, W) or normal map (H, W, 3)."""
    data = Path(path).read_bytes()
    fields, pos = [], 0
    for _ in range(3):
        end = data.index(b"&", pos)
        fields.append(int(data[pos:end]))
        pos = end + 1
    w, h, c = fields
    a = np.frombuffer(data, dtype="<f4", count=w * h * c, offset=pos).reshape(c, h, w)
    a = a.transpose(1, 2, 0)
    return a[:, :, 0].copy() if c == 1 else a.copy()


def to_colmap(depth: np.ndarray) -> np.ndarray:
    """A depth map with NaN where unknown, as COLMAP stores it (0 where unknown)."""
    out: np.ndarray = np.where(np.isfinite(depth), depth, 0.0).astype(np.float32)
    return out


def from_colmap(depth: np.ndarray) -> np.ndarray:
    """A COLMAP depth map with NaN where unknown."""
    out: np.ndarray = np.where(depth > 0, depth, np.nan).astype(np.float32)
    return out


def write_configs(out: Path, names: list[str], sources: list[list[str]] | None) -> None:
    """`patch-match.cfg` (each image and its source images; COLMAP picks 20 itself where
    `sources` names none) and `fusion.cfg` (the images to fuse)."""
    stereo = out / "stereo"
    lines = []
    for k, name in enumerate(names):
        lines.append(name)
        if sources is None or not sources[k]:
            lines.append("__auto__, 20")
        else:
            lines.append(", ".join(sources[k]))
    (stereo / "patch-match.cfg").write_text("\n".join(lines) + "\n")
    (stereo / "fusion.cfg").write_text("\n".join(names) + "\n")


def prepare_workspace(out: Path) -> None:
    """Make `out` a COLMAP dense workspace that shares undistort's images and model."""
    for name in ("images", "sparse"):
        os.symlink(os.path.join("..", "undistort", name), out / name)
    for sub in (DEPTH_DIR, NORMAL_DIR, "consistency_graphs"):
        (out / "stereo" / sub).mkdir(parents=True)
