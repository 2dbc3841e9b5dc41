"""The dashboard as a real server on 127.0.0.1 (a `dropmesh serve` subprocess), beside the
real daemon running the fast test pipeline (tests/daemon_harness.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from daemon_harness import REPO, Home, wait_for

ARTEFACTS = REPO / "tests" / "artefacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Dashboard:
    def __init__(self, home: Home, *args: str, host: str = "127.0.0.1", **env: str) -> None:
        self.home = home
        self.host = host
        self.port = free_port()
        self.log_path = home.root / "dashboard.log"
        out = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "serve", "--host", host, "--port", str(self.port)]
            + list(args),
            env={**home.env, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=home.root,
        )
        out.close()
        self.url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{self.port}"

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"dashboard exited:\n{self.log()}")
            try:
                return httpx.get(self.url + "/static/app.css", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 30, 0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10, **kw)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    h = Home(tmp_path / "home")
    h.env["DROPMESH_HTTP"] = ""  # the daemon's own dashboard child stays off here
    yield h
    h.stop()


@pytest.fixture
def daemon(home: Home) -> Home:
    home.start()
    return home


@pytest.fixture
def dashboard(daemon: Home) -> Iterator[Dashboard]:
    d = Dashboard(daemon)
    yield d
    d.stop()


@pytest.fixture
def api(dashboard: Dashboard) -> Iterator[httpx.Client]:
    with dashboard.client(headers={"X-Dropmesh-Token": "local"}) as c:
        yield c


def wait_job(api: httpx.Client, project: str, *states: str, timeout: float = 30) -> dict:
    def find() -> dict | None:
        for j in api.get("/api/jobs", params={"project": project}).json()["jobs"]:
            if not states or j["state"] in states:
                return j
        return None

    result: dict = wait_for(find, timeout, 0.2)
    return result


def sse_events(
    client: httpx.Client, path: str, until: object, timeout: float = 30
) -> list[tuple[str, str]]:
    """Read a Server-Sent Events stream until `until(events)` is true."""
    events: list[tuple[str, str]] = []
    deadline = time.monotonic() + timeout
    with client.stream("GET", path, timeout=httpx.Timeout(timeout, read=5)) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        name, data = "message", []
        for line in r.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
            elif line == "" and data:
                events.append((name, "\n".join(data)))
                name, data = "message", []
                if until(events):  # type: ignore[operator]
                    return events
            if time.monotonic() > deadline:
                break
    raise AssertionError(f"stream ended or timed out; got {[e[0] for e in events]}")


os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
