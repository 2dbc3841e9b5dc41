"""The daemon: inbox -> ledger -> one child process per stage -> exports -> notification.

This module is the daemon's lifecycle and main loop. The work is done beside it:
intake.py (request files -> jobs), scheduler.py (claims, the GPU slot, stages, retries,
cancels), recovery.py (home lock, heartbeats, jobs of daemons that died), stageproc.py
(the stage child processes) and joblog.py (job.log).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterable
from multiprocessing.connection import wait as wait_connections
from typing import Any, Literal, Protocol

from daemon.config import Config
from daemon.intake import Intake
from daemon.joblog import JobLog
from daemon.recovery import DaemonError, Recovery, host_of, new_daemon_id, open_home
from daemon.scheduler import GpuCount, Scheduler
from daemon.stageproc import runner_from_env, start_fork_server, wait_fork_server_ready
from daemon.states import JobState
from daemon.watcher import InboxWatcher

__all__ = ["Companion", "Daemon", "DaemonError"]

log = logging.getLogger("dropmesh")

CANCEL_POLL_S = 0.3
# The longest the main loop sleeps without a wake-up: a new job from the intake, a
# stage's message or exit, or a stop request wake it at once.
LOOP_WAIT_S = 0.1
NOTIFY_POLL_S = 0.5


class Companion(Protocol):
    """Something the daemon supervises beside its own work, such as a child process
    serving the ledger to a browser. `start` runs once the daemon is ready to take
    requests, `poll` on every pass of the main loop (restart what died, say), `stop`
    when the daemon stops. A companion that raises is logged; the daemon goes on."""

    def start(self) -> None: ...

    def poll(self) -> None: ...

    def stop(self) -> None: ...


class _Every:
    """True from `due` at most once per interval."""

    def __init__(self, interval_s: float, *, last: float = 0.0) -> None:
        self.interval_s = interval_s
        self.last = last

    def due(self, now: float) -> bool:
        if now - self.last < self.interval_s:
            return False
        self.last = now
        return True


class Daemon:
    """A daemon on one home folder, built whole: home lock held (SQLite ledger), ledger
    open and migrated. `run()` then runs it until stopped and releases everything."""

    def __init__(
        self,
        cfg: Config,
        *,
        notifier: Any | None = None,
        gpu_count: int | None = None,
        runner: str | None = None,
        companions: Iterable[Companion] = (),
    ) -> None:
        """`runner` (module:function) runs the stages in place of the pipeline; tests
        name a stand-in here or in the environment (stageproc.RUNNER_ENV)."""
        from daemon.notify import Notifier

        self.cfg = cfg
        self.daemon_id = new_daemon_id()
        self.stop_requested = threading.Event()
        self._stages_ready = threading.Event()  # the stage process server has started
        self.companions = list(companions)
        self._companions_started = False
        self._notifier = notifier if notifier is not None else Notifier()
        self._lock, self.ledger = open_home(cfg)
        # Wakes the main loop (a new job, a stop request).
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

        self.gpus = GpuCount(cfg.device, gpu_count)
        joblog = JobLog(cfg.workspace)
        self.recovery = Recovery(cfg, self.ledger, joblog, daemon_id=self.daemon_id, gpus=self.gpus)
        self.scheduler = Scheduler(
            cfg,
            self.ledger,
            joblog,
            daemon_id=self.daemon_id,
            host=host_of(self.daemon_id),
            gpus=self.gpus,
            runner=runner or runner_from_env(),
            stop=self.stop_requested,
            ready=self._stages_ready,
        )
        self.intake = Intake(cfg, self.ledger, joblog, stop=self.stop_requested, wake=self.wake)
        self.watcher = InboxWatcher(cfg.inbox, use_polling=cfg.use_polling, settle_s=cfg.settle_s)
        self._intake_thread = threading.Thread(
            target=self.intake.run, args=(self.watcher,), name="intake"
        )
        self._notify_thread = threading.Thread(target=self._notify_loop, name="notify", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------

    def run(self, *, once: bool = False) -> int:
        """Run until stop() or SIGINT/SIGTERM, or with once=True until nothing is left
        to do; then stop the stage children, leaving their jobs to resume."""
        try:
            self._start()
            self._main_loop(once)
        finally:
            self._wind_down()
        return 0

    def stop(self) -> None:
        """Ask the daemon to stop (any thread, or a signal handler)."""
        self.stop_requested.set()
        self.wake()

    def wake(self) -> None:
        """Wake the main loop now rather than at its next timeout."""
        with contextlib.suppress(OSError):  # full (a wake-up is pending) or closed
            self._wake_w.send(b"\0")

    def _start(self) -> None:
        # The fork server imports the pipeline's libraries in the background while the
        # daemon starts up and waits for work, not when the first stage starts.
        start_fork_server()
        threading.Thread(target=self._warm_up, name="warm-up", daemon=True).start()
        self._install_signals()
        self.recovery.register()
        self.recovery.recover_at_start()
        if self.cfg.notify:
            self._notify_thread.start()
        self.watcher.start()
        gpus = self.gpus()
        log.info(
            "watching %s (%s); ledger %s; results in %s; %d job(s) at a time; GPU: %s",
            self.cfg.inbox,
            self.watcher.mode,
            self.cfg.url,
            self.cfg.results,
            self.cfg.max_jobs,
            f"{gpus} CUDA device(s)" if gpus else "none, CPU only",
        )
        self._intake_thread.start()
        self._companions_started = True
        self._each_companion("start")

    def _main_loop(self, once: bool) -> None:
        cancels = _Every(CANCEL_POLL_S)
        beats = _Every(self.cfg.heartbeat_s)
        stale = _Every(self.cfg.stale_after_s / 3, last=time.monotonic())
        while not self.stop_requested.is_set():
            now = time.monotonic()
            self.scheduler.poll()
            if cancels.due(now):
                self.scheduler.check_cancels()
            if beats.due(now):
                self.recovery.heartbeat(self.scheduler.leases(), self.scheduler.abandon)
            if self.ledger.shared and stale.due(now):
                self.recovery.recover_stale()
            self.scheduler.start_jobs()
            self._each_companion("poll")
            if once and self._drained():
                log.info("queue drained; exiting (--once)")
                break
            if not self.stop_requested.is_set():
                wait_connections([self._wake_r, *self.scheduler.waitables()], timeout=LOOP_WAIT_S)
            self._drain_wake()

    def _wind_down(self) -> None:
        self.stop()
        if self._intake_thread.ident is not None:
            self._intake_thread.join(timeout=5)
        self.scheduler.shutdown()
        self.watcher.stop()
        if self._notify_thread.ident is not None:
            self._notify_thread.join(timeout=3)
        if self._companions_started:
            self._each_companion("stop")
        with contextlib.suppress(Exception):
            self.recovery.unregister()
        self._wake_r.close()
        self._wake_w.close()
        self.ledger.close()
        if self._lock is not None:
            self._lock.release()

    def _warm_up(self) -> None:
        try:
            took = wait_fork_server_ready()
        except Exception:
            log.exception("the stage process server did not start; stages will start it")
            return
        finally:
            self._stages_ready.set()
            self.wake()
        log.info("stage processes ready (their libraries loaded in %.1f s)", took)

    def _install_signals(self) -> None:
        def _stop(signum: int, _frame: Any) -> None:
            log.info("received %s; stopping (jobs will resume)", signal.Signals(signum).name)
            self.stop()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _stop)
            signal.signal(signal.SIGINT, _stop)

    def _each_companion(self, hook: Literal["start", "poll", "stop"]) -> None:
        for companion in self.companions:
            try:
                getattr(companion, hook)()
            except Exception:
                log.exception("%s.%s failed", type(companion).__name__, hook)

    # -- the main loop's steps -----------------------------------------------------------

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(512):
                pass

    def _drained(self) -> bool:
        """Nothing running here, nothing in the inbox, nothing queued or waiting."""
        if self.scheduler.running or not self.intake.idle.is_set():
            return False
        counts = self.ledger.count_by_state()
        return not any(
            counts.get(s, 0) for s in (JobState.QUEUED, JobState.RUNNING, JobState.WAITING)
        )

    # -- notifications -------------------------------------------------------------------

    def _notify_loop(self) -> None:
        while not self.stop_requested.wait(NOTIFY_POLL_S):
            try:
                self.flush_notifications()
            except Exception:
                log.exception("sending notifications failed; will try again")
        try:
            self.flush_notifications()
        except Exception:
            log.exception("sending notifications failed")

    def flush_notifications(self) -> int:
        """Send what the outbox holds; returns how many were delivered."""
        notifier = self._notifier
        return self.ledger.deliver_notifications(lambda n: bool(notifier.notify(n.title, n.body)))
