"""Request files are data only: paths stay inside allowed roots, names inside results/,
and the parser survives any input."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon import requests
from daemon.requests import RequestError

KEYS = ["project", "images", "quality", "method", "formats", "priority", "force", "options"]

# which pipeline the scenarios run (RELIABILITY.md says so per row)
PIPELINE = "none (request parsing, file modes, notification text)"


def _setup(tmp: Path) -> tuple[Path, Path]:
    root = tmp / "allowed"
    photos = root / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (photos / f"p{i}.jpg").write_bytes(b"\xff\xd8\xff")
    outside = tmp / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "x.jpg").write_bytes(b"\xff\xd8\xff")
    return root, outside


def _parse(path: Path, root: Path) -> requests.Accepted | None:
    try:
        return requests.parse(path, allowed_roots=[root])
    except RequestError:
        return None


def test_images_only_under_allowed_roots(tmp_path: Path) -> None:
    """A request naming images outside allowed_roots directly, through `..`, or through a
    symlink inside the allowed root pointing out, is rejected; a symlink staying inside
    is resolved and accepted."""
    root, outside = _setup(tmp_path)
    (root / "link-out").symlink_to(outside)
    (root / "link-in").symlink_to(root / "photos")
    inbox = root / "inbox"
    inbox.mkdir()
    for value in (str(outside), "../../outside", "../link-out", str(root / "link-out")):
        req = inbox / "r.toml"
        req.write_text(f"images = {json.dumps(value)}\n")
        with pytest.raises(RequestError, match="outside the allowed folders"):
            requests.parse(req, allowed_roots=[root])
    req = inbox / "r.toml"
    req.write_text('images = "../link-in"\n')
    assert requests.parse(req, allowed_roots=[root]).spec.images == (root / "photos").resolve()


@pytest.mark.parametrize(
    "project", ["../evil", "a/b", "..", ".hidden", "/abs", "a\\b", "A", "x" * 65, "a\x00b", ""]
)
def test_project_name_cannot_leave_results(tmp_path: Path, project: str) -> None:
    """A project name with path characters, dots, NUL, upper case or too long is rejected,
    so `results/<project>/` always lies directly inside results/."""
    root, _ = _setup(tmp_path)
    req = root / "r.toml"
    req.write_text(f"project = {json.dumps(project)}\nimages = 'photos'\n")
    with pytest.raises(RequestError, match="project"):
        requests.parse(req, allowed_roots=[root])


def test_project_from_hostile_file_name(tmp_path: Path) -> None:
    """With no project key, the name comes from the file name; file names full of dots,
    slashes-lookalikes and non-ASCII still give a plain name inside results/."""
    root, _ = _setup(tmp_path)
    for name in ("..toml", "...toml", "ÅÄÖ..toml", "a..b.toml", "-_-.toml", "中文.json"):
        req = root / name
        req.write_text('{"images": "photos"}' if name.endswith("json") else "images='photos'\n")
        acc = requests.parse(req, allowed_roots=[root])
        results = tmp_path / "results"
        target = (results / acc.spec.project).resolve()
        assert target.parent == results.resolve(), (name, acc.spec.project)
        assert requests.PROJECT_RE.match(acc.spec.project)


def test_files_created_honour_umask(tmp_path: Path) -> None:
    """The request writer used by `dropmesh submit` creates files the umask allows
    (umask 077: nothing for group or others)."""
    from daemon.requests import write_request

    old = os.umask(0o077)
    try:
        path = write_request(tmp_path / "inbox", "p", "images = 'x'\n")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o077 == 0, oct(path.stat().st_mode)


def test_notification_text_escaped(monkeypatch: pytest.MonkeyPatch) -> None:
    """dropmesh's Notifier escapes the body for a server that renders markup (and only
    then), and text starting with '-' cannot be read by notify-send as an option. The
    server's answer and notify-send are replaced here; tests/e2e/test_notify.py sends
    the same text through a real D-Bus notification server."""
    from daemon import notify

    sent: list[dict[str, str]] = []

    class Recorder:
        def notify(self, **kwargs: str) -> None:
            sent.append(kwargs)

    for markup in (True, False):
        info = notify.ServerInfo("unix:path=/nonexistent", "test", "1", markup)
        monkeypatch.setattr(notify, "probe", lambda info=info: info)
        notifier = notify.Notifier()
        monkeypatch.setattr(notifier, "_backend", Recorder())
        assert notifier.notify("--help", "<b>x</b> & y")
    assert [m["message"] for m in sent] == ["&lt;b&gt;x&lt;/b&gt; &amp; y", "<b>x</b> & y"]
    assert all(not m["title"].startswith("-") and m["title"].endswith("--help") for m in sent)
    assert not notify._argv_safe("--help").startswith("-")


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=8,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), _values, max_size=6),
    as_json=st.booleans(),
)
def test_parse_never_crashes_on_structured_input(
    tmp_path: Path, data: dict[str, object], as_json: bool
) -> None:
    """Property (hypothesis, 300 examples): any JSON object of known and unknown keys with
    arbitrary values either parses or raises RequestError, nothing else."""
    root, _ = _setup(tmp_path)
    path = root / ("r.json" if as_json else "r.toml")
    if as_json:
        path.write_text(json.dumps(data))
    else:
        lines = [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in data.items()]
        path.write_text("\n".join(lines))
    _parse(path, root)


def test_parse_fuzz_bytes(tmp_path: Path) -> None:
    """Bounded fuzz (seeded, 3000 inputs): random bytes and mutations of a valid request
    (flipped, inserted, deleted bytes; TOML and JSON) never crash the parser: only
    RequestError is raised."""
    root, _ = _setup(tmp_path)
    rng = random.Random(7)
    seeds = [
        b'project = "p"\nimages = "photos"\nquality = "high"\nformats = ["glb", "obj"]\n'
        b"[options]\nmax_image_size = 800\n",
        json.dumps(
            {"images": "photos", "priority": 3, "options": {"matcher": "sequential"}}
        ).encode(),
    ]
    for i in range(3000):
        suffix = ".json" if i % 2 else ".toml"
        if i % 10 == 0:
            data = rng.randbytes(rng.randrange(0, 200))
        else:
            data = bytearray(seeds[i % 2])
            for _ in range(rng.randrange(1, 6)):
                pos = rng.randrange(len(data) + 1)
                op = rng.randrange(3)
                if op == 0 and pos < len(data):
                    data[pos] = rng.randrange(256)
                elif op == 1:
                    data[pos:pos] = bytes([rng.randrange(256)])
                elif pos < len(data):
                    del data[pos]
            data = bytes(data)
        path = root / f"f{suffix}"
        path.write_bytes(data)
        _parse(path, root)
