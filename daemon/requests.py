"""Request files: parse, validate, and say exactly which key is wrong and why."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline import FORMATS, IMAGE_SUFFIXES, Format, JobSpec, Method, Quality
from pipeline.presets import OPTION_CHOICES, OPTION_KEYS

PROJECT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
REQUEST_SUFFIXES = {".toml", ".json"}
# Editors' and browsers' temporary files, and anything hidden.
_TEMP_RE = re.compile(r"(^\.|^#.*#$|~$|\.(swp|swx|swo|tmp|part|crdownload|partial|bak)$)", re.I)


class RequestError(Exception):
    """The request cannot be accepted; the message names the key and the reason."""


class UnparsableRequest(RequestError):
    """The file is not valid TOML or JSON. A request still being written looks the same,
    so a reader may look again a little later before rejecting it."""


def display_name(path: Path) -> str:
    """A file name as text for the ledger and messages: bytes that are not UTF-8 (the file
    system allows them) are shown as U+FFFD instead of failing every write of the name."""
    return os.fsencode(path.name).decode("utf-8", "replace")


def is_request_file(path: Path) -> bool:
    return path.suffix.lower() in REQUEST_SUFFIXES and not _TEMP_RE.search(path.name)


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    project: str | None = None
    images: str
    quality: Quality = "medium"
    method: Method = "poisson"
    formats: list[Format] = Field(default=["glb"])
    priority: int = Field(default=0, ge=-1000, le=1000)
    force: bool = False
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("project")
    @classmethod
    def _project(cls, v: str | None) -> str | None:
        if v is not None and not PROJECT_RE.match(v):
            raise ValueError(
                "must be 1-64 characters of a-z, 0-9, '_' or '-', starting with a letter or "
                "digit (no path characters)"
            )
        return v

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"must name at least one of {', '.join(FORMATS)}")
        return list(dict.fromkeys(v))

    @field_validator("options")
    @classmethod
    def _options(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key, value in v.items():
            if key not in OPTION_KEYS:
                raise ValueError(f"unknown option {key!r}; known: {', '.join(sorted(OPTION_KEYS))}")
            kind = OPTION_KEYS[key]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"option {key!r} must be {kind.__name__}, got {value!r}")
            if key in OPTION_CHOICES and value not in OPTION_CHOICES[key]:
                raise ValueError(f"option {key!r} must be one of {', '.join(OPTION_CHOICES[key])}")
            if isinstance(value, int) and value <= 0:
                raise ValueError(f"option {key!r} must be positive")
        return v


@dataclass
class Accepted:
    spec: JobSpec
    priority: int
    force: bool
    content_hash: str
    image_count: int


def _stem_project(path: Path) -> str:
    stem = re.sub(r"[^a-z0-9_-]+", "-", path.stem.lower()).strip("-_")[:64]
    return stem or "project"


def _format_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "request"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {loc!r}")
        elif err["type"] == "missing":
            parts.append(f"missing key {loc!r}")
        elif err["type"] == "literal_error":
            parts.append(f"key {loc!r}: {err['msg'].lower()}, got {err.get('input')!r}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"key {loc!r}: {msg}")
    return "; ".join(parts)


def parse(
    path: Path,
    *,
    allowed_roots: list[Path],
    max_bytes: int = 65536,
) -> Accepted:
    """Read and validate a request file. Raises RequestError with a clear message."""
    if path.is_symlink():
        raise RequestError(
            "the request file is a symbolic link; write (or copy) the request into the "
            "inbox itself: request files are read only as regular files"
        )
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise RequestError(f"cannot read the request file: {exc.strerror}") from exc
    if size == 0:
        raise RequestError("the request file is empty (0 bytes)")
    if size > max_bytes:
        raise RequestError(f"the request file is {size} bytes; the limit is {max_bytes} bytes")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(
            f"the request file is not UTF-8 text (byte {exc.start}); write it as TOML or JSON"
        ) from exc
    if "\x00" in text:
        raise RequestError("the request file contains NUL bytes; it is not a text file")
    data: Any
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UnparsableRequest(f"not valid JSON: {exc.msg} at line {exc.lineno}") from exc
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UnparsableRequest(f"not valid TOML: {exc}") from exc
    if not isinstance(data, dict):
        raise RequestError("the request must be a table of keys (TOML) or an object (JSON)")
    try:
        req = Request.model_validate(data)
    except ValidationError as exc:
        raise RequestError(_format_validation(exc)) from exc

    images = resolve_images(req.images, base=path.parent, allowed_roots=allowed_roots)
    count = count_images(images)
    project = req.project or _stem_project(path)
    spec = JobSpec(
        project=project,
        images=images,
        quality=req.quality,
        method=req.method,
        formats=tuple(req.formats),
        options=dict(req.options),
    )
    return Accepted(
        spec=spec,
        priority=req.priority,
        force=req.force,
        content_hash=content_hash(spec),
        image_count=count,
    )


def resolve_images(value: str, *, base: Path, allowed_roots: list[Path]) -> Path:
    if not value.strip():
        raise RequestError("key 'images': must name a folder of photos")
    p = Path(value).expanduser()
    folder = (p if p.is_absolute() else base / p).resolve()
    roots = [r.resolve() for r in allowed_roots]
    if not any(folder == r or folder.is_relative_to(r) for r in roots):
        raise RequestError(
            f"key 'images': {folder} is outside the allowed folders "
            f"({', '.join(str(r) for r in roots)}); add its parent to allowed_roots in "
            "config.toml"
        )
    if not folder.exists():
        raise RequestError(f"key 'images': the folder {folder} does not exist")
    if not folder.is_dir():
        raise RequestError(f"key 'images': {folder} is a file, not a folder of photos")
    return folder


def count_images(folder: Path) -> int:
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise RequestError(f"key 'images': cannot list {folder}: {exc.strerror}") from exc
    images = [e for e in entries if e.suffix.lower() in IMAGE_SUFFIXES and e.is_file()]
    if not entries:
        raise RequestError(f"key 'images': the folder {folder} is empty")
    if not images:
        others = ", ".join(sorted(e.name for e in entries)[:5])
        raise RequestError(f"key 'images': no JPEG or PNG photos in {folder} (found: {others})")
    return len(images)


def content_hash(spec: JobSpec) -> str:
    """Same request content -> same hash: used to refuse running it twice."""
    payload = spec.to_json()
    payload.pop("job_id", None)
    data = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def render_toml(values: dict[str, Any]) -> str:
    """A request file as TOML (for `dropmesh submit` and `dropmesh demo`)."""
    lines = []
    for key, value in values.items():
        if isinstance(value, dict):
            continue
        lines.append(f"{key} = {json.dumps(value)}")
    for key, value in values.items():
        if isinstance(value, dict) and value:
            lines.append(f"\n[{key}]")
            lines.extend(f"{k} = {json.dumps(v)}" for k, v in value.items())
    return "\n".join(lines) + "\n"


def free_path(folder: Path, stem: str, suffix: str) -> Path:
    """`folder/<stem><suffix>`, or the first of `<stem>-2<suffix>`, `<stem>-3<suffix>`, ...
    that does not exist yet."""
    path = folder / f"{stem}{suffix}"
    n = 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}{suffix}"
    return path


def write_request(inbox: Path, name: str, text: str, *, tag: str | None = None) -> Path:
    """Write a request file atomically: a hidden temporary name, then a rename into the
    inbox, so the daemon never reads half a file.

    The file is `<name>.toml` (characters other than letters, digits, '-' and '_'
    become '-'); with `tag`, `<name>-<tag>.toml`; without, an existing name gets
    `-2`, `-3`, ... appended.
    """
    inbox.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name) or "request"
    path = inbox / f"{safe}-{tag}.toml" if tag is not None else free_path(inbox, safe, ".toml")
    tmp = inbox / f".{path.name}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
