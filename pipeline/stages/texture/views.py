"""The photos the texture stage bakes from: their pinhole cameras (`View`), loading them
from a COLMAP dense workspace, undistorting them again at full size, and the two image
helpers every step shares (bilinear sampling, gradient magnitude)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipeline.context import StageContext
from pipeline.errors import PermanentError
from pipeline.stages._common import INGEST_IMAGES, thread_count


@dataclass
class View:
    name: str
    path: Path
    K: np.ndarray  # 3x3
    R: np.ndarray  # 3x3 world -> camera
    t: np.ndarray  # 3
    width: int
    height: int

    @property
    def centre(self) -> np.ndarray:
        return np.asarray(-self.R.T @ self.t)

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates (COLMAP: the first pixel's centre is at 0.5) and depths."""
        cam = points @ self.R.T + self.t
        z = cam[:, 2]
        safe = np.where(np.abs(z) < 1e-12, 1e-12, z)
        x = self.K[0, 0] * cam[:, 0] / safe + self.K[0, 2]
        y = self.K[1, 1] * cam[:, 1] / safe + self.K[1, 2]
        return np.stack([x, y], axis=1), z

    def load(self) -> np.ndarray:
        """The photo as (h, w, 3) float32 in [0, 1]."""
        return np.asarray(self.pixels(), np.float32) / 255.0

    def pixels(self) -> np.ndarray:
        """The photo as (h, w, 3) uint8: a quarter of the memory of load(), for photos
        kept while the texture is baked (128 photos of 1600x1200: 0.7 GB, not 2.9)."""
        with Image.open(self.path) as im:
            rgb = np.asarray(im.convert("RGB"))
        if rgb.shape[:2] != (self.height, self.width):
            raise PermanentError(
                f"photo {self.name} is {rgb.shape[1]}x{rgb.shape[0]} px, its camera says "
                f"{self.width}x{self.height}",
                hint="run the undistort stage again",
            )
        return rgb


def load_views(folder: Path) -> list[View]:
    """The registered photos of a COLMAP dense workspace (`<ws>/undistort/`: `sparse/`,
    `images/`) with their pinhole cameras."""
    import pycolmap

    rec = pycolmap.Reconstruction(str(folder / "sparse"))
    views = []
    for image_id in sorted(rec.reg_image_ids(), key=lambda i: rec.images[i].name):
        image = rec.images[image_id]
        camera = rec.cameras[image.camera_id]
        path = folder / "images" / image.name
        if not path.is_file():
            raise PermanentError(
                f"photo {image.name} is missing from the workspace ({path})",
                hint="run the undistort stage again (remove its folder) so it rewrites the photos",
            )
        pose = np.asarray(image.cam_from_world().matrix(), np.float64)
        views.append(
            View(
                name=image.name,
                path=path,
                K=np.asarray(camera.calibration_matrix(), np.float64),
                R=pose[:, :3],
                t=pose[:, 3],
                width=int(camera.width),
                height=int(camera.height),
            )
        )
    return views


REMAP_WIDTH = 4096  # cv2.remap takes maps of at most 32,767 columns: points go in rows of this


def bilinear(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Sample image (h, w[, c]) at pixel coordinates xy (n, 2), pixel centres at +0.5, the
    border repeated outside; a uint8 image is sampled as values in [0, 1]. (cv2.remap, on
    float32 pixels so that no sample is rounded to 8 bits: a tenth of numpy's time.)"""
    n = len(xy)
    rows = max(1, -(-n // REMAP_WIDTH))
    maps = np.zeros((rows * REMAP_WIDTH, 2), np.float32)
    maps[:n] = xy - 0.5
    pixels = image if image.dtype == np.float32 else image.astype(np.float32)
    out = cv2.remap(
        pixels,
        maps.reshape(rows, REMAP_WIDTH, 2),
        None,
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    samples = out.reshape(rows * REMAP_WIDTH, *image.shape[2:])[:n].astype(np.float64)
    return samples / 255.0 if image.dtype == np.uint8 else samples


def gradient_magnitude(rgb: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
    return np.asarray(cv2.GaussianBlur(np.sqrt(gx * gx + gy * gy), (5, 5), 1.0))


def full_resolution_views(ctx: StageContext, views: list[View], folder: Path) -> list[View]:
    """The same photos undistorted at the size ingest left them (undistort shrinks them
    to the depth maps' size), into `folder`; `views` if they are that size already."""
    import pycolmap

    model = ctx.workspace / "mapping" / "sparse" / "0"
    images = ctx.workspace.joinpath(*INGEST_IMAGES)
    if not model.is_dir() or not images.is_dir():
        return views
    rec = pycolmap.Reconstruction(str(model))
    biggest = max((max(c.width, c.height) for c in rec.cameras.values()), default=0)
    if biggest <= max(max(v.width, v.height) for v in views):
        return views
    options = pycolmap.UndistortCameraOptions()
    options.max_image_size = -1
    ctx.check_cancelled()
    pycolmap.undistort_images(
        folder,
        model,
        images,
        output_type="COLMAP",
        undistort_options=options,
        jpeg_quality=95,
        num_threads=thread_count(ctx),
    )
    ctx.check_cancelled()
    full = load_views(folder)
    if [v.name for v in full] != [v.name for v in views]:
        return views  # another model than undistort's: keep to undistort's photos
    return full
