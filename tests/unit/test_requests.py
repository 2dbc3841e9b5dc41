from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from daemon.requests import RequestError, UnparsableRequest, is_request_file, parse


@pytest.fixture
def root(tmp_path: Path) -> Path:
    photos = tmp_path / "photos" / "fountain"
    photos.mkdir(parents=True)
    for i in range(3):
        (photos / f"{i}.jpg").write_bytes(b"\xff\xd8")
    (tmp_path / "inbox").mkdir()
    return tmp_path


def write(root: Path, text: str, name: str = "fountain.toml") -> Path:
    p = root / "inbox" / name
    p.write_text(text)
    return p


def test_minimal_request_uses_defaults_and_file_stem(root: Path) -> None:
    acc = parse(write(root, 'images = "../photos/fountain"\n'), allowed_roots=[root])
    assert acc.spec.project == "fountain"
    assert acc.spec.quality == "medium"
    assert acc.spec.formats == ("glb",)
    assert acc.spec.images == root / "photos" / "fountain"
    assert acc.image_count == 3


def test_json_request(root: Path) -> None:
    text = json.dumps({"images": "../photos/fountain", "formats": ["ply", "obj"]})
    acc = parse(write(root, text, "f.json"), allowed_roots=[root])
    assert acc.spec.formats == ("ply", "obj")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('images = "../photos/fountain"\ncolour = 1\n', "unknown key 'colour'"),
        ('images = "../photos/fountain"\nquality = "ultra"\n', "key 'quality'"),
        ('images = "../photos/fountain"\nquality = 3\n', "key 'quality'"),
        ('images = "../photos/fountain"\nformats = ["stl"]\n', "key 'formats.0'"),
        ('images = "../photos/fountain"\nformats = []\n', "at least one"),
        ('images = "../photos/fountain"\nmethod = "delaunay"\n', "key 'method'"),
        ('images = "../photos/fountain"\nproject = "../etc"\n', "key 'project'"),
        ('images = "../photos/fountain"\npriority = "high"\n', "key 'priority'"),
        ('images = "../photos/fountain"\n[options]\nfoo = 1\n', "unknown option 'foo'"),
        ('images = "../photos/fountain"\n[options]\nmatcher = 1\n', "must be str"),
        ('images = "../photos/fountain"\n[options]\npoisson_depth = -1\n', "positive"),
        ("quality = 'low'\n", "missing key 'images'"),
        ('images = "../photos/nope"\n', "does not exist"),
        ('images = "/etc"\n', "outside the allowed folders"),
        ('images = "../../"\n', "outside the allowed folders"),
        ("images = [", "not valid TOML"),
        ("", "empty"),
    ],
)
def test_bad_requests_name_the_key(root: Path, text: str, message: str) -> None:
    with pytest.raises(RequestError, match=message.replace("[", r"\[").replace(".", r"\.")):
        parse(write(root, text), allowed_roots=[root])


def test_symlink_escaping_allowed_roots_is_refused(root: Path, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    outside = tmp_path_factory.mktemp("outside")
    (outside / "a.jpg").write_bytes(b"x")
    os.symlink(outside, root / "photos" / "link")
    with pytest.raises(RequestError, match="outside the allowed folders"):
        parse(write(root, 'images = "../photos/link"\n'), allowed_roots=[root])


def test_empty_and_imageless_folders(root: Path) -> None:
    (root / "photos" / "empty").mkdir()
    with pytest.raises(RequestError, match="is empty"):
        parse(write(root, 'images = "../photos/empty"\n'), allowed_roots=[root])
    (root / "photos" / "docs").mkdir()
    (root / "photos" / "docs" / "notes.txt").write_text("x")
    with pytest.raises(RequestError, match="no JPEG or PNG photos"):
        parse(write(root, 'images = "../photos/docs"\n'), allowed_roots=[root])


def test_size_and_binary_limits(root: Path) -> None:
    big = write(root, 'images = "../photos/fountain"\n' + "#" * 20000)
    with pytest.raises(RequestError, match="limit is 1000 bytes"):
        parse(big, allowed_roots=[root], max_bytes=1000)
    binary = root / "inbox" / "bin.toml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(RequestError, match="not UTF-8"):
        parse(binary, allowed_roots=[root])


def test_same_content_same_hash(root: Path) -> None:
    a = parse(write(root, 'images = "../photos/fountain"\n', "a.toml"), allowed_roots=[root])
    b = parse(
        write(root, 'project = "a"\nimages = "../photos/fountain"\n', "b.toml"),
        allowed_roots=[root],
    )
    c = parse(
        write(root, 'project = "a"\nimages = "../photos/fountain"\nquality="low"\n', "c.toml"),
        allowed_roots=[root],
    )
    assert a.content_hash == b.content_hash
    assert a.content_hash != c.content_hash


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("a.toml", True),
        ("a.JSON", True),
        (".hidden.toml", False),
        ("a.toml~", False),
        ("a.toml.swp", False),
        ("#a.toml#", False),
        ("a.txt", False),
        ("a.toml.part", False),
    ],
)
def test_request_file_filter(name: str, ok: bool) -> None:
    assert is_request_file(Path(name)) is ok


@pytest.mark.parametrize(
    ("name", "text"),
    [("half.toml", 'images = "../photos/fou'), ("half.json", '{"images": "../photos/fou')],
)
def test_unparsable_request_has_its_own_type(root: Path, name: str, text: str) -> None:
    # what a request still being written looks like: the daemon looks again before
    # rejecting it, so the type (not the wording) tells it apart from other errors
    with pytest.raises(UnparsableRequest, match="not valid"):
        parse(write(root, text, name), allowed_roots=[root])
    with pytest.raises(RequestError) as info:
        parse(write(root, 'images = "../photos/nope"\n'), allowed_roots=[root])
    assert not isinstance(info.value, UnparsableRequest)


def test_write_request_names_files_and_leaves_no_temporary(tmp_path: Path) -> None:
    from daemon.requests import write_request

    inbox = tmp_path / "inbox"  # created on demand
    first = write_request(inbox, "my fountain!", "images = 'a'\n")
    second = write_request(inbox, "my fountain!", "images = 'b'\n")
    tagged = write_request(inbox, "upload", "images = 'c'\n", tag="0a1b2c3d")
    assert [first.name, second.name] == ["my-fountain-.toml", "my-fountain--2.toml"]
    assert tagged.name == "upload-0a1b2c3d.toml"
    assert first.read_text() == "images = 'a'\n" and second.read_text() == "images = 'b'\n"
    assert sorted(p.name for p in inbox.iterdir()) == sorted([first.name, second.name, tagged.name])
    assert write_request(inbox, "", "x = 1\n").name == "request.toml"
