"""`dropmesh serve`: run the dashboard with uvicorn."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from daemon.config import Config, ConfigError
from daemon.web.security import is_loopback, new_token
from daemon.web.uploads import Limits

DEFAULT_HOST = "127.0.0.1"
# Set by the daemon for the dashboard it starts: the daemon's pid.
PARENT_ENV = "DROPMESH_DASHBOARD_PARENT"
DEFAULT_PORT = 8750
log = logging.getLogger("dropmesh.web")


@dataclass
class Bind:
    host: str
    port: int

    def url(self, token: str | None = None) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            import socket

            host = socket.gethostname()
        return f"http://{host}:{self.port}/" + (f"?token={token}" if token else "")


def parse_bind(value: str) -> Bind | None:
    """`host:port` (config key `http`); empty: the dashboard is off."""
    value = value.strip()
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"key 'http' must be host:port (e.g. 127.0.0.1:8750), got {value!r}")
    host = host.strip("[]") or DEFAULT_HOST
    return Bind(host, int(port))


def token_for(cfg: Config, host: str) -> tuple[str | None, bool]:
    """The token the dashboard needs (None on loopback without one configured), and
    whether it was generated now."""
    if cfg.http_token:
        return cfg.http_token, False
    if is_loopback(host):
        return None, False
    return new_token(), True


def _exit_with_parent(parent: int, server: Any) -> None:
    """A dashboard started by a daemon ends when that daemon is gone, even after kill -9."""
    while os.getppid() == parent:
        time.sleep(1.0)
    server.should_exit = True
    time.sleep(5.0)
    os._exit(0)


def upload_limits(env: Mapping[str, str]) -> Limits:
    """Upload limits: DROPMESH_UPLOAD_MAX_FILES, DROPMESH_UPLOAD_MAX_FILE_MB (per photo)
    and DROPMESH_UPLOAD_MAX_MB (per upload)."""
    limits = Limits()
    for key, attr, scale in (
        ("DROPMESH_UPLOAD_MAX_FILES", "max_files", 1),
        ("DROPMESH_UPLOAD_MAX_FILE_MB", "max_file_bytes", 2**20),
        ("DROPMESH_UPLOAD_MAX_MB", "max_total_bytes", 2**20),
    ):
        if key in env:
            try:
                value = float(env[key])
            except ValueError:
                value = -1
            if value <= 0:
                raise ConfigError(f"{key} must be a positive number, got {env[key]!r}")
            setattr(limits, attr, int(value * scale))
    return limits


def serve(cfg: Config, host: str, port: int, *, token: str | None = None) -> int:
    import uvicorn

    from daemon.ledgerfile import LedgerError
    from daemon.web.app import create_app

    generated = False
    if token is None:
        token, generated = token_for(cfg, host)
    try:
        limits = upload_limits(os.environ)
        app = create_app(cfg, token=token, loopback_only=is_loopback(host), limits=limits)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except LedgerError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    bind = Bind(host, port)
    sys.stdout.write(f"dropmesh dashboard on {bind.url(token)}\n")
    if generated:
        sys.stdout.write(
            "not on loopback: every request needs this token (set http_token in config.toml "
            "to keep one)\n"
        )
    sys.stdout.flush()
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    parent = os.environ.get(PARENT_ENV, "")
    if parent.isdigit():
        threading.Thread(
            target=_exit_with_parent, args=(int(parent), server), name="parent", daemon=True
        ).start()
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits 1 when it cannot bind
        return int(exc.code or 1)
    return 0 if server.started else 1
