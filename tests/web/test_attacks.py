"""Attacks on the dashboard: each must fail."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Dashboard
from daemon_harness import Home
from PIL import Image
from sqlalchemy import insert, update

from daemon.ledger import Ledger
from daemon.schema import exports, jobs

EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'
POST = {"X-Dropmesh-Token": "local"}


def _export(ledger: Ledger, job_id: str, path: Path, fmt: str) -> int:
    data = path.read_bytes() if path.is_file() else b""
    with ledger.engine.begin() as conn:
        res = conn.execute(
            insert(exports).values(
                job_id=job_id,
                path=str(path),
                format=fmt,
                bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                created_at=time.time(),
            )
        )
        return int(res.inserted_primary_key[0])


@pytest.fixture
def seeded(home: Home) -> Iterator[tuple[Home, Ledger, dict[str, object]]]:
    ledger = Ledger.open(f"sqlite:///{home.root / 'jobs.db'}", create=True)
    a = ledger.create_job(project="alpha", spec={}, request_hash="a", request_name="a.toml")
    b = ledger.create_job(project="beta", spec={}, request_hash="b", request_name=EVIL)
    with ledger.engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == b.id).values(error=EVIL))
    results = home.results
    (results / "alpha").mkdir(parents=True)
    (results / "beta").mkdir(parents=True)
    good = results / "alpha" / f"{a.id}_textured_mesh_poisson.glb"
    good.write_bytes(b"glTF" + b"\0" * 60)
    secret = home.root / "secret.txt"
    secret.write_text("secret")
    link = results / "alpha" / "link.glb"
    os.symlink(secret, link)
    beta_file = results / "beta" / "beta.glb"
    beta_file.write_bytes(b"glTF-beta")
    ids = {
        "good": _export(ledger, a.id, good, "glb"),
        "dotdot": _export(ledger, a.id, results / "alpha" / ".." / ".." / "secret.txt", "glb"),
        "abs": _export(ledger, a.id, secret, "glb"),
        "link": _export(ledger, a.id, link, "glb"),
        # a row that claims another project's file for alpha
        "other": _export(ledger, a.id, beta_file, "glb"),
        "a": a.id,
        "b": b.id,
    }
    (home.workspaces / b.id).mkdir(parents=True)
    (home.workspaces / b.id / "job.log").write_text(EVIL + "\n")
    yield home, ledger, ids
    ledger.close()


def test_files_outside_results_or_of_other_projects_are_404(
    seeded: tuple[Home, Ledger, dict[str, object]],
) -> None:
    home, _, ids = seeded
    d = Dashboard(home)
    try:
        with d.client() as c:
            assert c.get(f"/api/exports/{ids['good']}").status_code == 200
            for key in ("dotdot", "abs", "link", "other"):
                r = c.get(f"/api/exports/{ids[key]}")
                assert r.status_code == 404, key
                assert b"secret" not in r.content
            assert c.get("/api/exports/99999").status_code == 404
            base = "/api/project/alpha/download_mesh/"
            assert c.get(base + f"{ids['a']}_textured_mesh_poisson.glb").status_code == 200
            for name in (
                "link.glb",
                "secret.txt",
                "..%2F..%2Fsecret.txt",
                "%2Fetc%2Fpasswd",
                "beta.glb",
                "../../secret.txt",
            ):
                r = c.get(base + name)
                assert r.status_code == 404, name
                assert b"secret" not in r.content and b"root:" not in r.content
            # another project's export is not reachable through this project's path
            assert c.get("/api/project/gamma/download_mesh/beta.glb").status_code == 404
            # the file list never lists what it would not serve
            listed = c.get("/api/project/alpha/available_exports").json()["exports"]
            assert [e["filename"] for e in listed] == [f"{ids['a']}_textured_mesh_poisson.glb"]
    finally:
        d.stop()


def test_user_text_is_escaped(seeded: tuple[Home, Ledger, dict[str, object]]) -> None:
    home, _, ids = seeded
    d = Dashboard(home)
    try:
        with d.client() as c:
            for path in ("/", f"/jobs/{ids['b']}", "/?project=%3Cscript%3E"):
                page = c.get(path).text
                assert "<script>alert" not in page and "onerror=alert(1)>" not in page, path
            assert "&lt;script&gt;alert" in c.get(f"/jobs/{ids['b']}").text
            # JSON carries the text as text; the pages' scripts set it with textContent.
            assert c.get(f"/api/jobs/{ids['b']}").json()["error"] == EVIL
        static = Path(__file__).resolve().parents[2] / "daemon" / "web" / "static"
        for js in static.glob("*.js"):
            assert ".innerHTML" not in js.read_text() and "insertAdjacentHTML" not in js.read_text()
    finally:
        d.stop()


def test_loopback_refuses_cross_site_requests_and_foreign_hosts(
    seeded: tuple[Home, Ledger, dict[str, object]],
) -> None:
    home, ledger, ids = seeded
    d = Dashboard(home)
    cancel = f"/api/jobs/{ids['a']}/cancel"
    try:
        with d.client() as c:
            # DNS rebinding: a page served under another name reaching 127.0.0.1
            assert c.get("/api/jobs", headers={"Host": "evil.example:8750"}).status_code == 403
            # CSRF: a plain form post from another site carries no custom header
            assert c.post(cancel).status_code == 403
            bad = [
                {**POST, "Origin": "http://evil.example"},
                {**POST, "Origin": "null"},
                {**POST, "Referer": "http://evil.example/page"},
                {**POST, "Sec-Fetch-Site": "cross-site"},
            ]
            for headers in bad:
                assert c.post(cancel, headers=headers).status_code == 403, headers
            assert ledger.get(str(ids["a"])).state == "queued"
            same = {**POST, "Origin": d.url, "Sec-Fetch-Site": "same-origin"}
            r = c.post(cancel, headers=same)
            assert r.status_code == 200 and r.json()["state"] == "cancelled"
    finally:
        d.stop()


def test_token_is_required_everywhere_off_loopback(
    seeded: tuple[Home, Ledger, dict[str, object]],
) -> None:
    home, ledger, ids = seeded
    d = Dashboard(home, host="0.0.0.0", DROPMESH_HTTP_TOKEN="s3cret-token")
    assert "?token=s3cret-token" in d.log()
    try:
        with d.client() as c:
            for path in (
                "/api/jobs",
                f"/api/jobs/{ids['a']}",
                f"/api/exports/{ids['good']}",
                "/api/project/alpha/available_exports",
                "/api/stream",
                "/openapi.json",
            ):
                assert c.get(path).status_code == 401, path
                assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            page = c.get("/")
            assert page.status_code == 401 and "token" in page.text and ids["a"] not in page.text
            auth = {"Authorization": "Bearer s3cret-token"}
            assert c.get("/api/jobs", headers=auth).status_code == 200
            assert c.get(f"/api/exports/{ids['good']}", headers=auth).status_code == 200
            # ?token= on a page sets a strict cookie and drops it from the address
            r = c.get("/?token=s3cret-token")
            assert r.status_code == 303 and r.headers["location"] == "/"
            cookie = r.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
            assert c.get("/api/jobs").status_code == 200  # the cookie, now held
            cancel = f"/api/jobs/{ids['a']}/cancel"
            # the cookie alone never changes anything (CSRF rides on cookies)
            assert c.post(cancel, headers={"X-Dropmesh-Token": "local"}).status_code == 401
            assert c.post(cancel).status_code == 403
            assert ledger.get(str(ids["a"])).state == "queued"
            ok = c.post(cancel, headers={"X-Dropmesh-Token": "s3cret-token"})
            assert ok.status_code == 200
    finally:
        d.stop()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def test_uploads_are_limited_while_streaming_and_checked_to_be_images(home: Home) -> None:
    Ledger.open(f"sqlite:///{home.root / 'jobs.db'}", create=True).close()
    d = Dashboard(
        home,
        DROPMESH_UPLOAD_MAX_FILES="3",
        DROPMESH_UPLOAD_MAX_FILE_MB="1",
        DROPMESH_UPLOAD_MAX_MB="2",
    )
    uploads = home.root / "uploads"

    def leftovers() -> list[Path]:
        return [p for p in uploads.rglob("*") if p.is_file()] if uploads.exists() else []

    try:
        with d.client(headers=POST) as c:
            png = _png()
            many = [("photos", (f"p{i}.png", png, "image/png")) for i in range(4)]
            r = c.post("/api/uploads", files=many)
            assert r.status_code == 413 and "at most 3" in r.json()["detail"]
            fake = [("photos", ("x.jpg", b"<html>not a photo</html>", "image/jpeg"))]
            r = c.post("/api/uploads", files=fake)
            assert r.status_code == 400 and "not a JPEG or PNG" in r.json()["detail"]
            truncated = [("photos", ("t.png", png[:20], "image/png"))]
            r = c.post("/api/uploads", files=truncated)
            assert r.status_code == 400 and "t.png" in r.json()["detail"]
            big = [("photos", ("big.png", png + b"\0" * (2 * 2**20), "image/png"))]
            r = c.post("/api/uploads", files=big)
            assert r.status_code == 413 and "per photo" in r.json()["detail"]
            assert leftovers() == []

            # A body with no length, over the limit, of which the rest never comes: the
            # answer comes once the limit is passed, not after reading the whole body.
            boundary = "b0undary"
            head = (
                (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="photos"; '
                    'filename="huge.png"\r\nContent-Type: image/png\r\n\r\n'
                ).encode()
                + png
                + b"\0" * (1536 * 1024)
            )
            with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
                s.sendall(
                    b"POST /api/uploads HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"X-Dropmesh-Token: local\r\nTransfer-Encoding: chunked\r\n"
                    + f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode()
                    + f"{len(head):x}\r\n".encode()
                    + head
                    + b"\r\n"
                )
                reply = s.recv(65536)
            assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
            assert leftovers() == []

            ok = c.post(
                "/api/uploads",
                files=[("photos", ("../../evil name.png", png, "image/png"))],
                data={"project": "upl", "formats": ["glb", "obj"]},
            )
            assert ok.status_code == 202, ok.text
            saved = leftovers()
            assert [p.name for p in saved] == ["evil-name.png"]
            assert saved[0].parent.parent == uploads
            req = home.inbox / ok.json()["request"]
            text = req.read_text()
            assert 'project = "upl"' in text and '["glb", "obj"]' in text
            bad = c.post(
                "/api/uploads",
                files=[("photos", ("a.png", png, "image/png"))],
                data={"project": "../etc"},
            )
            assert bad.status_code == 400
    finally:
        d.stop()
