"""`dropmesh run` starts the dashboard as a child it restarts, and that cannot hurt it."""

from __future__ import annotations

import os
import signal
import socket

import httpx
import psutil
from conftest import free_port
from daemon_harness import Home, wait_for


def _dashboard_child(daemon: Home) -> psutil.Process | None:
    assert daemon.proc is not None
    for child in psutil.Process(daemon.proc.pid).children():
        if "serve" in child.cmdline():
            return child
    return None


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "api/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _healthy_static(base: str) -> bool:
    try:
        return httpx.get(base + "/static/app.css", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_run_starts_the_dashboard_and_restarts_it_when_it_dies(home: Home) -> None:
    port = free_port()
    home.start(DROPMESH_HTTP=f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}/"
    wait_for(lambda: f"dashboard on {url}" in home.log(), 20)
    wait_for(lambda: _healthy(url), 30, 0.2)
    first = _dashboard_child(home)
    assert first is not None
    os.kill(first.pid, signal.SIGKILL)
    wait_for(lambda: "dashboard exited (signal 9)" in home.log(), 20)
    wait_for(lambda: _healthy(url), 30, 0.2)
    second = _dashboard_child(home)
    assert second is not None and second.pid != first.pid
    # The daemon went on working all along.
    home.images("still")
    home.drop("still", project="still")
    home.wait_state("still", "succeeded")
    assert home.stop() == 0
    assert not second.is_running() or second.status() == psutil.STATUS_ZOMBIE


def test_the_dashboard_ends_with_a_daemon_killed_with_sigkill(home: Home) -> None:
    port = free_port()
    home.start(DROPMESH_HTTP=f"127.0.0.1:{port}")
    wait_for(lambda: _healthy(f"http://127.0.0.1:{port}/"), 30, 0.2)
    child = _dashboard_child(home)
    assert child is not None
    home.kill9()
    wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 15)


def test_a_dashboard_that_cannot_start_never_stops_the_daemon(home: Home) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        home.start(DROPMESH_HTTP=f"127.0.0.1:{port}")
        wait_for(lambda: "dashboard exited" in home.log(), 30)
        home.images("busy")
        home.drop("busy", project="busy")
        home.wait_state("busy", "succeeded")
        assert home.proc is not None and home.proc.poll() is None


def test_other_addresses_get_a_token_that_the_daemon_log_prints(home: Home) -> None:
    port = free_port()
    home.start(DROPMESH_HTTP=f"0.0.0.0:{port}")
    line = wait_for(
        lambda: next((ln for ln in home.log().splitlines() if "dashboard on" in ln), None), 20
    )
    token = line.split("?token=")[1].split()[0]
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: _healthy_static(base), 30, 0.2)
    assert httpx.get(base + "/api/jobs").status_code == 401
    ok = httpx.get(base + "/api/jobs", headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200
