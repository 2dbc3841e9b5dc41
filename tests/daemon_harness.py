"""Run the real daemon as a subprocess on a temporary home, with the fast test pipeline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

FAST_ENV = {
    # The stage runner of the daemon's stage children (daemon.stageproc.RUNNER_ENV).
    "DROPMESH_TEST_PIPELINE": "fakepipeline:run_stage",
    "DROPMESH_RETRY_BASE_S": "0.2",
    "DROPMESH_RETRY_MAX_S": "1",
    "DROPMESH_RESCAN_S": "1",
    "DROPMESH_SETTLE_S": "0.2",
    "DROPMESH_HEARTBEAT_S": "0.5",
    "DROPMESH_LOG_LEVEL": "INFO",
    "DROPMESH_DEVICE": "cpu",
    "DROPMESH_HTTP": "",  # no dashboard child (tests/web starts its own)
}


def wait_for(pred: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {pred}")
        time.sleep(interval)


class Home:
    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.results = root / "results"
        self.workspaces = root / "workspaces"
        self.env = dict(env or os.environ)
        self.env.update(FAST_ENV)
        self.env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS)])
        self.env["DROPMESH_HOME"] = str(root)
        self.env.pop("DBUS_SESSION_BUS_ADDRESS", None) if env is None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root / "daemon.log"
        self.log_offset = 0
        root.mkdir(parents=True, exist_ok=True)
        (root / "config.toml").write_text((REPO / "config.toml").read_text())

    # -- daemon --------------------------------------------------------------------

    def start(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        full_env = {**self.env, **env}
        # this start's part of the log begins here: an earlier start's "watching" line
        # must not satisfy the wait below
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "run", *args],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
        )
        log.close()
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited with {proc.returncode}:\n{self.log_since()}")
            return (self.root / "jobs.db").exists() and "watching" in self.log_since()

        wait_for(ready, 30)
        return self.proc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_since(self, offset: int | None = None) -> str:
        """The log written since `offset` (default: since the latest start)."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as fh:
            fh.seek(self.log_offset if offset is None else offset)
            return fh.read().decode(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    # -- inputs --------------------------------------------------------------------

    def images(self, name: str, behaviour: dict[str, Any] | None = None, n: int = 3) -> Path:
        folder = self.root / "photos" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (folder / f"img{i:02d}.jpg").write_bytes(b"\xff\xd8\xff\xe0fake")
        if behaviour is not None:
            (folder / "fake.json").write_text(json.dumps(behaviour))
        return folder

    def drop(self, name: str, text: str | None = None, **keys: Any) -> Path:
        """Write a request into the inbox (temp file, then rename in)."""
        if text is None:
            keys.setdefault("images", f"../photos/{name}")
            text = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
        self.inbox.mkdir(parents=True, exist_ok=True)
        tmp = self.inbox / f".{name}.toml.tmp"
        tmp.write_text(text)
        final = self.inbox / f"{name}.toml"
        os.replace(tmp, final)
        return final

    # -- CLI -----------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [sys.executable, "-m", "daemon.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            cwd=self.root,
            timeout=60,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"dropmesh {' '.join(args)} -> {res.returncode}\n{res.stderr}")
        return res

    def status(self) -> list[dict[str, Any]]:
        """The listing: every job, without its stages."""
        out: list[dict[str, Any]] = json.loads(self.cli("status", "--json").stdout)
        return out

    def _listed(self, project: str) -> dict[str, Any] | None:
        return next((j for j in self.status() if j["project"] == project), None)

    def detail(self, job_id: str) -> dict[str, Any]:
        """One job in full: its stages and their metrics too."""
        out: list[dict[str, Any]] = json.loads(self.cli("status", job_id, "--json").stdout)
        return out[0]

    def job(self, project: str) -> dict[str, Any] | None:
        """The newest job of `project`, in full (see detail), or None."""
        listed = self._listed(project)
        return self.detail(listed["id"]) if listed else None

    def wait_state(self, project: str, *states: str, timeout: float = 30.0) -> dict[str, Any]:
        """The newest job of `project` once the listing shows it in one of `states`: in
        full, unless it has left them by the time its detail is read (then as listed)."""

        def check() -> dict[str, Any] | None:
            j = self._listed(project)
            return j if j and j["state"] in states else None

        try:
            listed: dict[str, Any] = wait_for(check, timeout, 0.2)
        except AssertionError as exc:
            raise AssertionError(
                f"{project}: {self.job(project)}\n--- daemon log ---\n{self.log()}"
            ) from exc
        full = self.detail(listed["id"])
        return full if full["state"] in states else listed

    def stage_runs(self, job_id: str) -> list[str]:
        f = self.workspaces / job_id / "stage_runs.log"
        return [line.split()[0] for line in f.read_text().splitlines()] if f.exists() else []
