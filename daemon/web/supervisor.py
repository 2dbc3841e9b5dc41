"""The dashboard as a child process of the daemon: started with it, restarted if it dies.

The child is `python -m daemon.cli serve` in its own process group, with its output in
<home>/dashboard.log. The daemon only ever starts it, polls it without waiting, and stops
it: nothing it does (crash, hang, a port in use) can block or crash the daemon. A child
that keeps dying is restarted after a growing pause (1 s doubling to 60 s).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time

from daemon.config import Config
from daemon.web.server import PARENT_ENV, Bind, parse_bind, token_for

log = logging.getLogger("dropmesh")
RESTART_MIN_S = 1.0
RESTART_MAX_S = 60.0
HEALTHY_AFTER_S = 30.0


class DashboardSupervisor:
    def __init__(self, cfg: Config, bind: Bind) -> None:
        self.cfg = cfg
        self.bind = bind
        self.token, _ = token_for(cfg, bind.host)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.restart_at = 0.0
        self.delay = RESTART_MIN_S
        self.restarts = 0

    @classmethod
    def from_config(cls, cfg: Config) -> DashboardSupervisor | None:
        try:
            bind = parse_bind(cfg.http)
        except Exception as exc:
            log.warning("dashboard off: %s", exc)
            return None
        return cls(cfg, bind) if bind is not None else None

    @property
    def url(self) -> str:
        return self.bind.url(self.token)

    def start(self) -> None:
        env = dict(os.environ)
        env["DROPMESH_HOME"] = str(self.cfg.home)
        env[PARENT_ENV] = str(os.getpid())
        if self.token:
            env["DROPMESH_HTTP_TOKEN"] = self.token
        cmd = [sys.executable, "-m", "daemon.cli", "serve"]
        cmd += ["--host", self.bind.host, "--port", str(self.bind.port)]
        try:
            with open(self.cfg.home / "dashboard.log", "ab") as out:
                self.proc = subprocess.Popen(
                    cmd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.cfg.home,
                    start_new_session=True,
                )
        except OSError as exc:
            log.warning("dashboard could not start: %s", exc)
            self.proc = None
            self._schedule_restart()
            return
        self.started_at = time.monotonic()
        if self.restarts == 0:
            log.info("dashboard on %s (log: %s)", self.url, self.cfg.home / "dashboard.log")

    def _schedule_restart(self) -> None:
        self.restart_at = time.monotonic() + self.delay
        self.delay = min(RESTART_MAX_S, self.delay * 2)

    def poll(self) -> None:
        """Restart a child that exited; never waits."""
        try:
            now = time.monotonic()
            if self.proc is not None:
                code = self.proc.poll()
                if code is None:
                    if now - self.started_at > HEALTHY_AFTER_S:
                        self.delay = RESTART_MIN_S
                    return
                self.proc = None
                log.warning(
                    "dashboard exited (%s); restarting in %.0f s (see %s)",
                    f"code {code}" if code >= 0 else f"signal {-code}",
                    self.delay,
                    self.cfg.home / "dashboard.log",
                )
                self._schedule_restart()
                return
            if now >= self.restart_at:
                self.restarts += 1
                self.start()
        except Exception:  # the dashboard must never take the daemon down
            log.exception("dashboard supervision failed")

    def stop(self, timeout: float = 3.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
