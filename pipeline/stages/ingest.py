"""ingest: check the photos, decode each once, resize, and read a focal-length prior.

Reads `spec.images` (a folder of JPEG/PNG files; hidden files and non-image files are
skipped). Publishes `<workspace>/ingest/`:

- `images/<name>`: every photo, upright (EXIF orientation applied), 8-bit RGB, its longest
  side at most `max_image_size`; an unchanged JPEG/PNG is copied byte for byte. Names keep
  the original file name, with characters other than letters, digits, `._-` replaced by
  `_` (COLMAP's text files are space separated).
- `images.json`: `{"images": [{name, source, width, height, original_width,
  original_height, scale, focal_px, focal_source, make, model}]}`; `focal_px` is the
  focal length in pixels of the ingested image, from EXIF, or null.
- `metrics.json`.

An unreadable, truncated or unsupported image is a PermanentError naming the file.
"""

from __future__ import annotations

import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.context import IMAGE_SUFFIXES, StageContext, StageResult
from pipeline.errors import PermanentError
from pipeline.stages._common import (
    INGEST_IMAGES,
    INGEST_LIST,
    Timer,
    stage_preset,
    thread_count,
)
from pipeline.stages._workspace import building, finished, record, write_json

NAME = "ingest"
MIN_IMAGES = 3
# Image formats we recognise but do not take; the user can convert them.
OTHER_IMAGE_SUFFIXES = {
    ".tif", ".tiff", ".webp", ".heic", ".heif", ".gif", ".bmp", ".dng", ".cr2", ".nef", ".arw",
}  # fmt: skip
ACCEPTED_FORMATS = {"JPEG", "PNG", "MPO"}  # MPO: multi-picture JPEG written by some cameras

# EXIF tags
_MAKE, _MODEL, _EXIF_IFD = 0x010F, 0x0110, 0x8769
_FOCAL_MM, _FOCAL_35MM = 0x920A, 0xA405
_FP_XRES, _FP_YRES, _FP_UNIT = 0xA20E, 0xA20F, 0xA210
_EXIF_WIDTH, _EXIF_HEIGHT = 0xA002, 0xA003
_UNIT_MM = {2: 25.4, 3: 10.0, 4: 1.0, 5: 0.001}  # FocalPlaneResolutionUnit -> mm per unit

Image.MAX_IMAGE_PIXELS = 400_000_000  # allow large panoramas; still guard decompression bombs


def run(ctx: StageContext) -> StageResult:
    done = finished(ctx, NAME)
    if done is not None:
        return done
    timer = Timer()
    max_size = stage_preset(ctx).max_image_size
    files, skipped = _list_images(ctx.spec.images)
    if len(files) < MIN_IMAGES:
        raise PermanentError(
            f"{ctx.spec.images} holds {len(files)} JPEG/PNG image(s); at least {MIN_IMAGES} "
            "are needed",
            hint="add more overlapping photos of the object (20 or more work best)",
        )

    with building(ctx, NAME) as tmp:
        out_images = tmp / INGEST_IMAGES[-1]
        out_images.mkdir()
        records = ingest_all(ctx, files, out_images, max_size)
        write_json(tmp / INGEST_LIST[-1], {"images": records})
        sizes = {(r["width"], r["height"]) for r in records}
        with_focal = sum(1 for r in records if r["focal_px"] is not None)
        result = StageResult(
            metrics={
                "images": len(records),
                "skipped_files": skipped[:50],
                "resized": sum(1 for r in records if r["scale"] != 1.0),
                "sizes": sorted(f"{w}x{h}" for w, h in sizes),
                "with_exif_focal": with_focal,
                "max_image_size": max_size,
                "seconds": timer.seconds,
            }
        )
        record(tmp, result)
    return result


def ingest_all(
    ctx: StageContext, files: list[Path], out_images: Path, max_size: int
) -> list[dict[str, Any]]:
    """Every photo into `out_images`, in parallel, and its record, in order;
    PermanentError naming the photos that cannot be used."""
    stop = threading.Event()  # set on cancel: images not yet started are skipped
    items = list(zip(files, _output_names(files), strict=True))
    records: list[dict[str, Any]] = []
    bad: list[str] = []
    # decoding, resizing and encoding release the GIL: one image per core at a time
    pool = ThreadPoolExecutor(max_workers=thread_count(ctx))
    try:
        outcomes = pool.map(partial(_try_one, stop, out_images, max_size), items)
        for i, (path, out) in enumerate(zip(files, outcomes, strict=True)):
            ctx.check_cancelled()
            if isinstance(out, str):
                bad.append(out)
                ctx.log.warning("ingest: %s: %s", path, out)
            elif out is not None:
                records.append(out)
            ctx.progress((i + 1) / len(files), f"checked {i + 1}/{len(files)} images")
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise PermanentError(
            f"{len(bad)} image(s) cannot be used: {shown}",
            hint="remove or re-export the named files (JPEG or PNG) and retry",
        )
    return records


def _try_one(
    stop: threading.Event, out_images: Path, max_size: int, item: tuple[Path, str]
) -> dict[str, Any] | str | None:
    """One photo's record, or what is wrong with it; None once the stage is stopping."""
    path, name = item
    if stop.is_set():
        return None
    try:
        return _ingest_one(path, out_images / name, max_size)
    except _BadImage as exc:
        return f"{path.name}: {exc}"


class _BadImage(Exception):
    pass


def _list_images(folder: Path) -> tuple[list[Path], list[str]]:
    if not folder.is_dir():
        raise PermanentError(
            f"image folder {folder} does not exist or is not a folder",
            hint="check the request's images path",
        )
    files, skipped, unsupported = [], [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            files.append(path)
        elif suffix in OTHER_IMAGE_SUFFIXES:
            unsupported.append(path.name)
        else:
            skipped.append(path.name)
    if unsupported:
        raise PermanentError(
            f"unsupported image format: {', '.join(unsupported[:5])}"
            + (f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else ""),
            hint="convert these files to JPEG or PNG, or move them out of the folder",
        )
    return files, skipped


def _output_names(files: list[Path]) -> list[str]:
    names: list[str] = []
    taken: set[str] = set()
    for path in files:
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem) or "image"
        suffix = path.suffix.lower()
        name, k = f"{stem}{suffix}", 1
        while name.lower() in taken:
            name, k = f"{stem}_{k}{suffix}", k + 1
        taken.add(name.lower())
        names.append(name)
    return names


def _ingest_one(path: Path, dest: Path, max_size: int) -> dict[str, Any]:
    try:
        with Image.open(path) as im:
            fmt = im.format or "?"
            if fmt not in ACCEPTED_FORMATS:
                raise _BadImage(f"not a JPEG or PNG file ({fmt})")
            im.load()  # full decode: catches truncated and corrupt files
            exif = im.getexif()
            orientation = int(exif.get(0x0112, 1) or 1)
            raw_w, raw_h = im.size
            focal_px, focal_source = _exif_focal(exif, raw_w, raw_h)
            make = _text(exif.get(_MAKE))
            model = _text(exif.get(_MODEL))
            upright = ImageOps.exif_transpose(im) if orientation != 1 else im
            orig_w, orig_h = upright.size
            scale = 1.0
            if max_size > 0 and max(orig_w, orig_h) > max_size:
                scale = max_size / max(orig_w, orig_h)
            new_size = (max(1, round(orig_w * scale)), max(1, round(orig_h * scale)))
            need_mode = upright.mode != "RGB"
            target_fmt = IMAGE_SUFFIXES[dest.suffix]
            same_format = fmt == target_fmt or (fmt == "MPO" and target_fmt == "JPEG")
            if scale == 1.0 and orientation == 1 and not need_mode and same_format:
                shutil.copyfile(path, dest)
            else:
                out = _to_rgb8(upright)
                if scale != 1.0:
                    out = out.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
                if target_fmt == "JPEG":
                    out.save(dest, format="JPEG", quality=95)
                else:
                    out.save(dest, format="PNG", compress_level=1)
            width, height = new_size if scale != 1.0 else (orig_w, orig_h)
    except _BadImage:
        raise
    except UnidentifiedImageError:
        raise _BadImage("not a readable image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _BadImage(f"cannot be decoded ({exc})") from None
    if focal_px is not None:
        # focal in px scales with the longest side; orientation does not change it
        focal_px = focal_px * max(width, height) / max(raw_w, raw_h)
    return {
        "name": dest.name,
        "source": str(path),
        "width": width,
        "height": height,
        "original_width": orig_w,
        "original_height": orig_h,
        "scale": round(scale, 6),
        "focal_px": None if focal_px is None else round(focal_px, 3),
        "focal_source": focal_source,
        "make": make,
        "model": model,
    }


def _to_rgb8(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = float(a.max()) or 1.0
        im = Image.fromarray((a / hi * 255.0).clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (128, 128, 128, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = str(value).strip("\x00 ").strip()
    return text or None


def _ratio(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def _exif_focal(exif: Image.Exif, width: int, height: int) -> tuple[float | None, str | None]:
    """Focal length in pixels of the stored (not yet rotated) image, from EXIF."""
    try:
        sub = exif.get_ifd(_EXIF_IFD)
    except Exception:  # a malformed EXIF block is no reason to reject the photo
        return None, None
    longest = max(width, height)

    def plausible(focal: float) -> bool:
        return 0.1 * longest < focal < 20 * longest

    # 35 mm equivalent focal (36 mm film width over the longest side): independent of the
    # image's resolution, so it survives resizing, but rounded to whole millimetres
    f35 = _ratio(sub.get(_FOCAL_35MM))
    from_35mm = f35 / 36.0 * longest if f35 else None
    # focal in mm times the focal plane resolution: exact, but only for the resolution the
    # camera wrote (ExifImageWidth/Height), which editors often leave stale
    from_plane = None
    focal_mm = _ratio(sub.get(_FOCAL_MM))
    xres, unit = _ratio(sub.get(_FP_XRES)), sub.get(_FP_UNIT, 2)
    if focal_mm and xres and unit in _UNIT_MM:
        exif_longest = max(
            _ratio(sub.get(_EXIF_WIDTH)) or 0.0, _ratio(sub.get(_EXIF_HEIGHT)) or 0.0
        )
        rescale = longest / exif_longest if exif_longest else 1.0
        from_plane = focal_mm * xres / _UNIT_MM[unit] * rescale
    agrees = from_35mm is None or (
        from_plane is not None and abs(from_plane - from_35mm) < 0.05 * from_35mm
    )
    if from_plane and plausible(from_plane) and agrees:
        return from_plane, "exif_focal_plane"
    if from_35mm and plausible(from_35mm):
        return from_35mm, "exif_35mm"
    return None, None
