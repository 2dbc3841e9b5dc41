"""Surviving crashes: the home lock, the daemon's row in the workers table and its
heartbeats, and putting back to the queue the jobs of daemons that died."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from daemon.config import Config
from daemon.joblog import JobLog
from daemon.ledger import Ledger
from daemon.ledgerfile import LedgerError
from daemon.scheduler import GpuCount
from daemon.stageproc import kill_tree

log = logging.getLogger("dropmesh")

# Daemons silent for this long are dropped from the workers table.
FORGET_WORKERS_S = 86400.0


class DaemonError(Exception):
    """The daemon cannot start; the message says why and what to do."""


def new_daemon_id() -> str:
    """host:pid:random, unique across restarts and hosts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def host_of(daemon_id: str) -> str:
    return daemon_id.split(":", 1)[0]


class HomeLock:
    """One daemon per home folder with an SQLite ledger: an exclusive flock on
    <home>/.dropmesh.lock, held while the daemon runs (the kernel drops it when the
    process dies, kill -9 included)."""

    def __init__(self, cfg: Config) -> None:
        path = cfg.home / ".dropmesh.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            holder = path.read_text().strip() if path.exists() else "?"
            raise DaemonError(
                f"another dropmesh daemon is already running on {cfg.home} ({holder})"
            ) from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def open_home(cfg: Config) -> tuple[HomeLock | None, Ledger]:
    """Make the home's folders, take its lock (SQLite ledger) and open the ledger,
    creating or migrating it. Raises DaemonError saying what is wrong."""
    cfg.ensure_dirs()
    # One daemon per SQLite ledger. A server ledger (PostgreSQL) is shared by any
    # number of daemons, which coordinate through leases instead.
    lock = HomeLock(cfg) if cfg.url.startswith("sqlite") else None
    try:
        refuse_ledger_without_history(cfg)
        try:
            return lock, Ledger.open(cfg.url, create=True)
        except LedgerError as exc:
            raise DaemonError(str(exc)) from exc
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def refuse_ledger_without_history(cfg: Config) -> None:
    """A missing SQLite ledger next to job folders means the ledger was lost, not
    that this is a first start: starting an empty one would forget those jobs."""
    if cfg.ledger_url or cfg.db_path.exists():
        return
    try:
        jobs = [
            p
            for p in cfg.workspaces.iterdir()
            if p.is_dir() and ((p / "job.log").exists() or any(p.glob("request.*")))
        ]
    except OSError:
        return
    if jobs:
        raise DaemonError(
            f"no ledger at {cfg.db_path}, but {cfg.workspaces} holds "
            f"{len(jobs)} job folder(s) recorded in one: refusing to start an empty "
            "ledger that would forget them. Restore jobs.db (with jobs.db-wal if there "
            f"is one) from a backup, or, to start afresh, move {cfg.workspaces} "
            "aside and start again"
        )


class Recovery:
    """This daemon's liveness in the ledger, and the jobs of daemons that died."""

    def __init__(
        self, cfg: Config, ledger: Ledger, joblog: JobLog, *, daemon_id: str, gpus: GpuCount
    ) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.joblog = joblog
        self.daemon_id = daemon_id
        self.host = host_of(daemon_id)
        self.gpus = gpus
        self._last_beat_ok = time.monotonic()

    def register(self) -> None:
        self.ledger.register_worker(
            self.daemon_id,
            cuda_devices=self.gpus(),
            max_jobs=self.cfg.max_jobs,
            gpu_stages=self.cfg.gpu_stages,
        )

    def unregister(self) -> None:
        self.ledger.unregister_worker(self.daemon_id)

    def heartbeat(self, leases: dict[str, int], abandon: Callable[[str, str], None]) -> None:
        """Renew our leases and our row in the workers table. Calls abandon(job_id, why)
        first for each job to stop work on: those whose lease another daemon has taken
        over, or all of them once the ledger has been unreachable for so long that our
        leases may have expired (another daemon may be running them: stop, not race it)."""
        try:
            lost = self.ledger.heartbeat(leases, self.daemon_id, lease_s=self.cfg.stale_after_s)
        except Exception:
            silent = time.monotonic() - self._last_beat_ok
            log.exception("heartbeat failed (%.0f s without one)", silent)
            if silent > self.cfg.stale_after_s * 0.8:
                for job_id in leases:
                    abandon(job_id, "no heartbeat reached the ledger for too long")
            return
        self._last_beat_ok = time.monotonic()
        for job_id in lost:
            abandon(job_id, "its lease was lost")
        if not self.ledger.worker_heartbeat(self.daemon_id):
            self.register()

    def recover_at_start(self) -> None:
        """Alone on an SQLite ledger (we hold the home lock), every running job belongs
        to a daemon that died. On a shared ledger: those of dead daemons of this host
        (their pid is gone) at once, those of other hosts when their lease expires."""
        ledger = self.ledger
        if ledger.shared:
            dead = [w for w in ledger.running_workers() if dead_local_daemon(w, self.host)]
            leftovers = ledger.running_stage_pids(dead) if dead else []
            requeue: dict[str, Any] = {"dead_workers": dead}
        else:
            leftovers = ledger.running_stage_pids()
            requeue = {"worker": self.daemon_id}
        for job_id, stage, pid in leftovers:
            if kill_tree(pid, 0.5, expect_name="multiprocessing"):
                log.warning("stopped a leftover %s process (pid %d) of job %s", stage, pid, job_id)
        if ledger.shared:
            self.recover_stale()
            if not dead:
                return
        for job_id in ledger.recover(**requeue):
            log.info("job %s: resuming after the previous daemon stopped", job_id)
            self.joblog.write(job_id, "resuming after the previous daemon stopped")

    def recover_stale(self) -> None:
        """Shared ledger: requeue the jobs of daemons that stopped heartbeating."""
        try:
            for job_id in self.ledger.recover(stale_after_s=self.cfg.stale_after_s):
                log.warning("job %s: its daemon stopped heartbeating; requeued", job_id)
                self.joblog.write(job_id, "requeued: the daemon running it stopped heartbeating")
            self.ledger.prune_workers(FORGET_WORKERS_S)
        except Exception:
            log.exception("recovering stale jobs failed; will try again")


def dead_local_daemon(daemon_id: str, host: str) -> bool:
    """Whether `daemon_id` (host:pid:id) was a daemon on this host whose process is gone."""
    parts = daemon_id.split(":")
    if len(parts) < 3 or parts[0] != host or not parts[1].isdigit():
        return False
    import psutil

    try:
        cmdline = " ".join(psutil.Process(int(parts[1])).cmdline())
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False
    return "daemon" not in cmdline and "dropmesh" not in cmdline
