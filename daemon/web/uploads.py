"""Photos uploaded from the browser, streamed to disk under <home>/uploads/<batch>/.

The multipart body is parsed as it arrives: the count of files, the size of each and of
the whole upload are checked on every chunk, so an upload over a limit stops there and
its partial files are removed; nothing is held in memory or spooled elsewhere first.
Each file must start like a JPEG or PNG and then open as one (Pillow), and its name is
reduced to a plain file name.
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header

MAX_FILES = 500
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_TOTAL_BYTES = 4 * 1024 * 1024 * 1024
MAX_FIELD_BYTES = 4096
MAGIC = {b"\xff\xd8\xff": ".jpg", b"\x89PNG\r\n\x1a\n": ".png"}
_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")


class UploadError(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass
class Limits:
    max_files: int = MAX_FILES
    max_file_bytes: int = MAX_FILE_BYTES
    max_total_bytes: int = MAX_TOTAL_BYTES


@dataclass
class Upload:
    folder: Path
    files: list[Path] = field(default_factory=list)
    fields: dict[str, list[str]] = field(default_factory=dict)
    total: int = 0


def safe_name(raw: str, index: int) -> str:
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = _NAME_RE.sub("-", name).strip(".-") or f"photo-{index:04d}"
    return name[:120]


class _Receiver:
    def __init__(self, upload: Upload, limits: Limits) -> None:
        self.upload = upload
        self.limits = limits
        self.headers: dict[str, str] = {}
        self._field = b""
        self._value = b""
        self.kind: str | None = None  # "file" | "field"
        self.name = ""
        self.filename = ""
        self.out: BinaryIO | None = None
        self.path: Path | None = None
        self.size = 0
        self.head = b""
        self.buf = bytearray()

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": lambda d, s, e: setattr(self, "_field", self._field + d[s:e]),
            "on_header_value": lambda d, s, e: setattr(self, "_value", self._value + d[s:e]),
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }

    def on_part_begin(self) -> None:
        self.headers = {}
        self.kind = None
        self.size = 0
        self.head = b""
        self.buf = bytearray()

    def on_header_end(self) -> None:
        self.headers[self._field.decode("latin-1").lower()] = self._value.decode("utf-8", "replace")
        self._field = b""
        self._value = b""

    def on_headers_finished(self) -> None:
        _, opts = parse_options_header(self.headers.get("content-disposition", ""))
        self.name = opts.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in opts:
            self.kind = "file"
            self.filename = opts[b"filename"].decode("utf-8", "replace")
            if len(self.upload.files) >= self.limits.max_files:
                raise UploadError(
                    f"too many files: at most {self.limits.max_files} per upload", 413
                )
            n = len(self.upload.files)
            name = safe_name(self.filename, n)
            path = self.upload.folder / name
            while path.exists():
                path = self.upload.folder / f"{n:04d}-{name}"
                n += 1
            self.path = path
            self.out = open(path, "xb")  # noqa: SIM115
            self.upload.files.append(path)
        else:
            self.kind = "field"

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        self.size += len(chunk)
        if self.kind == "field":
            if self.size > MAX_FIELD_BYTES:
                raise UploadError(f"form field {self.name!r} is over {MAX_FIELD_BYTES} bytes")
            self.buf.extend(chunk)
            return
        self.upload.total += len(chunk)
        if self.size > self.limits.max_file_bytes:
            raise UploadError(
                f"{self.filename}: over the limit of {self.limits.max_file_bytes // 2**20} MB "
                "per photo",
                413,
            )
        if self.upload.total > self.limits.max_total_bytes:
            raise UploadError(
                f"the upload is over the limit of {self.limits.max_total_bytes // 2**20} MB", 413
            )
        if len(self.head) < 8:
            self.head += chunk[: 8 - len(self.head)]
            if len(self.head) >= 8 and not any(self.head.startswith(m) for m in MAGIC):
                raise UploadError(f"{self.filename}: not a JPEG or PNG photo")
        assert self.out is not None
        self.out.write(chunk)

    def on_part_end(self) -> None:
        if self.kind == "field":
            self.upload.fields.setdefault(self.name, []).append(self.buf.decode("utf-8", "replace"))
            return
        if self.out is not None:
            self.out.close()
            self.out = None
            if not any(self.head.startswith(m) for m in MAGIC):
                raise UploadError(f"{self.filename}: not a JPEG or PNG photo")
            assert self.path is not None
            _check_image(self.path, self.filename)

    def abort(self) -> None:
        if self.out is not None:
            self.out.close()
            self.out = None


def _check_image(path: Path, shown: str) -> None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format not in ("JPEG", "PNG"):
                raise UploadError(f"{shown}: a {im.format} image; send JPEG or PNG photos")
            im.verify()
    except UploadError:
        raise
    except Exception as exc:
        raise UploadError(f"{shown}: not a readable image ({exc})") from exc


async def receive(
    content_type: str,
    content_length: str | None,
    chunks: AsyncIterator[bytes],
    uploads_root: Path,
    limits: Limits,
) -> Upload:
    """Stream a multipart/form-data body into a new folder under `uploads_root`."""
    kind, opts = parse_options_header(content_type)
    if kind != b"multipart/form-data" or b"boundary" not in opts:
        raise UploadError("send the photos as multipart/form-data (field 'photos')", 415)
    declared = int(content_length) if content_length and content_length.isdigit() else 0
    if declared > limits.max_total_bytes + 1024 * 1024:
        raise UploadError(
            f"the upload is over the limit of {limits.max_total_bytes // 2**20} MB", 413
        )
    uploads_root.mkdir(parents=True, exist_ok=True)
    folder = uploads_root / uuid.uuid4().hex[:12]
    folder.mkdir()
    upload = Upload(folder=folder)
    rx = _Receiver(upload, limits)
    parser = MultipartParser(opts[b"boundary"], rx.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
        if not upload.files:
            raise UploadError("no photos in the upload (field 'photos')")
    except BaseException as exc:
        rx.abort()
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(exc, UploadError):
            raise
        if isinstance(exc, Exception):
            raise UploadError(f"the upload could not be read: {exc}") from exc
        raise
    return upload
