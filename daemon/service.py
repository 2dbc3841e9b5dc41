"""The daemon: inbox -> ledger -> one child process per stage -> exports -> notification."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_connections
from pathlib import Path
from typing import Any

from daemon import requests
from daemon.config import Config
from daemon.db import LedgerError
from daemon.ledger import ExportRecord, Fenced, Ledger, RequestTaken, new_job_id, request_key
from daemon.states import JobState, StageState
from daemon.worker import (
    Outcome,
    StageProcess,
    StageTask,
    classify,
    kill_tree,
    start_fork_server,
    wait_fork_server_ready,
)
from pipeline import STAGES
from pipeline.stages import GPU_STAGES, remove_stage_outputs

log = logging.getLogger("dropmesh")

CANCEL_POLL_S = 0.3
# The longest the main loop sleeps without a wake-up: a new job from the intake, a
# stage's message or exit, or a stop request wake it at once.
LOOP_WAIT_S = 0.1
# Daemons silent for this long are dropped from the workers table.
FORGET_WORKERS_S = 86400.0


class DaemonError(Exception):
    pass


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with +-25 % jitter: base * 2^(attempt-1), capped."""
    delay = min(max_s, base_s * (2 ** max(attempt - 1, 0)))
    return float(max(0.0, delay * rng.uniform(0.75, 1.25)))


@dataclass
class Running:
    job_id: str
    project: str
    spec: dict[str, Any]
    attempt: int
    token: int = 0  # the fencing token of our lease on the job
    stage: str = ""
    proc: StageProcess | None = None
    progress_written_at: float = 0.0
    holds_gpu: bool = False
    cancelling: bool = False


class Daemon:
    def __init__(
        self,
        cfg: Config,
        *,
        notifier: Any | None = None,
        clock: Callable[[], float] = time.time,
        gpu_count: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.ledger: Ledger | None = None
        self.running: dict[str, Running] = {}
        self.stop_requested = threading.Event()
        self.intake_idle = threading.Event()
        self.rng = random.Random()
        self._lock_fd: int | None = None
        self._notifier = notifier
        self._gpu_count = gpu_count
        self.gpu_busy = False
        self._last_beat_ok = time.monotonic()
        self._gpu_peer: tuple[float, bool] | None = None
        # Wakes the main loop (a new job, a stop request); open while run() runs.
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None

    # -- lifecycle -------------------------------------------------------------------

    def _acquire_lock(self) -> None:
        path = self.cfg.home / ".dropmesh.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            holder = path.read_text().strip() if path.exists() else "?"
            raise DaemonError(
                f"another dropmesh daemon is already running on {self.cfg.home} ({holder})"
            ) from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
        self._lock_fd = fd

    def open(self) -> Ledger:
        self.cfg.ensure_dirs()
        if self.cfg.url.startswith("sqlite"):
            # One daemon per SQLite ledger. A server ledger (PostgreSQL) is shared by
            # any number of daemons, which coordinate through leases instead.
            self._acquire_lock()
        self._refuse_ledger_without_history()
        try:
            self.ledger = Ledger.open(self.cfg.url, create=True)
        except LedgerError as exc:
            raise DaemonError(str(exc)) from exc
        return self.ledger

    def _refuse_ledger_without_history(self) -> None:
        """A missing SQLite ledger next to job folders means the ledger was lost, not
        that this is a first start: starting an empty one would forget those jobs."""
        if self.cfg.ledger_url or self.cfg.db_path.exists():
            return
        try:
            jobs = [
                p
                for p in self.cfg.workspaces.iterdir()
                if p.is_dir() and ((p / "job.log").exists() or any(p.glob("request.*")))
            ]
        except OSError:
            return
        if jobs:
            raise DaemonError(
                f"no ledger at {self.cfg.db_path}, but {self.cfg.workspaces} holds "
                f"{len(jobs)} job folder(s) recorded in one: refusing to start an empty "
                "ledger that would forget them. Restore jobs.db (with jobs.db-wal if there "
                f"is one) from a backup, or, to start afresh, move {self.cfg.workspaces} "
                "aside and start again"
            )

    @property
    def host(self) -> str:
        return self.worker.split(":", 1)[0]

    def gpu_count(self) -> int:
        if self._gpu_count is None:
            from pipeline.devices import cuda_device_count

            self._gpu_count = cuda_device_count() if self.cfg.device != "cpu" else 0
        return self._gpu_count

    def run(self, *, once: bool = False) -> int:
        from daemon.notify import Notifier
        from daemon.watcher import InboxWatcher

        ledger = self.open()
        # The fork server imports the pipeline's libraries in the background while the
        # daemon starts up and waits for work, not when the first stage starts.
        start_fork_server()
        threading.Thread(target=self._warm_up, name="warm-up", daemon=True).start()
        self._install_signals()
        self._register(ledger)
        self._recover(ledger)
        notifier = self._notifier if self._notifier is not None else Notifier()
        notify_thread = threading.Thread(
            target=self._notify_loop, args=(notifier,), name="notify", daemon=True
        )
        if self.cfg.notify:
            notify_thread.start()
        watcher = InboxWatcher(
            self.cfg.inbox, use_polling=self.cfg.use_polling, settle_s=self.cfg.settle_s
        )
        watcher.start()
        log.info(
            "watching %s (%s); ledger %s; results in %s; %d job(s) at a time; GPU: %s",
            self.cfg.inbox,
            watcher.mode,
            self.cfg.url,
            self.cfg.results,
            self.cfg.max_jobs,
            f"{self.gpu_count()} CUDA device(s)" if self.gpu_count() else "none, CPU only",
        )
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        intake = threading.Thread(target=self._intake_loop, args=(watcher,), name="intake")
        intake.start()
        # The web dashboard: a separate, supervised child process (config key `http`).
        from daemon.web.supervisor import DashboardSupervisor

        dashboard = None if once else DashboardSupervisor.from_config(self.cfg)
        if dashboard is not None:
            dashboard.start()
        last_beat = 0.0
        last_cancel_poll = 0.0
        last_recover = time.monotonic()
        try:
            while not self.stop_requested.is_set():
                now = time.monotonic()
                self._poll_children()
                if now - last_cancel_poll >= CANCEL_POLL_S:
                    self._check_cancels()
                    last_cancel_poll = now
                if now - last_beat >= self.cfg.heartbeat_s:
                    self._heartbeat(ledger)
                    last_beat = now
                if ledger.shared and now - last_recover >= self.cfg.stale_after_s / 3:
                    self._recover_stale(ledger)
                    last_recover = now
                self._start_jobs()
                if dashboard is not None:
                    dashboard.poll()
                if once and not self.running and self.intake_idle.is_set() and self._idle():
                    log.info("queue drained; exiting (--once)")
                    break
                waitables: list[Any] = [self._wake_r]
                for r in self.running.values():
                    if r.proc is not None:
                        waitables.extend(r.proc.waitables())
                if not self.stop_requested.is_set():
                    wait_connections(waitables, timeout=LOOP_WAIT_S)
                self._drain_wake()
        finally:
            self.stop()
            if dashboard is not None:
                dashboard.stop()
            intake.join(timeout=5)
            self._shutdown()
            watcher.stop()
            if self.cfg.notify:
                notify_thread.join(timeout=3)
            with contextlib.suppress(Exception):
                ledger.unregister_worker(self.worker)
            wake_r, wake_w, self._wake_r, self._wake_w = self._wake_r, self._wake_w, None, None
            wake_r.close()
            wake_w.close()
        return 0

    def _warm_up(self) -> None:
        try:
            took = wait_fork_server_ready()
        except Exception:
            log.exception("the stage process server did not start; stages will start it")
            return
        log.info("stage processes ready (their libraries loaded in %.1f s)", took)

    def stop(self) -> None:
        """Ask the daemon to stop (any thread, or a signal handler)."""
        self.stop_requested.set()
        self.wake()

    def wake(self) -> None:
        """Wake the main loop now rather than at its next timeout."""
        w = self._wake_w
        if w is not None:
            with contextlib.suppress(OSError):  # full (a wake-up is pending) or closed
                w.send(b"\0")

    def _drain_wake(self) -> None:
        r = self._wake_r
        if r is not None:
            with contextlib.suppress(OSError):
                while r.recv(512):
                    pass

    # -- leases ----------------------------------------------------------------------

    def _register(self, ledger: Ledger) -> None:
        ledger.register_worker(
            self.worker,
            cuda_devices=self.gpu_count(),
            max_jobs=self.cfg.max_jobs,
            gpu_stages=self.cfg.gpu_stages,
        )

    def _heartbeat(self, ledger: Ledger) -> None:
        """Renew our leases and our row in the workers table; stop work on any job
        whose lease another daemon has taken over."""
        leases = {r.job_id: r.token for r in self.running.values()}
        try:
            lost = ledger.heartbeat(leases, self.worker, lease_s=self.cfg.stale_after_s)
        except Exception:
            # The ledger cannot be reached. Once our leases may have expired, another
            # daemon may be running these jobs: stop their stages rather than race it.
            silent = time.monotonic() - self._last_beat_ok
            log.exception("heartbeat failed (%.0f s without one)", silent)
            if silent > self.cfg.stale_after_s * 0.8:
                for stalled in list(self.running.values()):
                    self._abandon(stalled, "no heartbeat reached the ledger for too long")
            return
        self._last_beat_ok = time.monotonic()
        for job_id in lost:
            run = self.running.get(job_id)
            if run is not None:
                self._abandon(run, "its lease was lost")
        if not ledger.worker_heartbeat(self.worker):
            self._register(ledger)

    def _recover_stale(self, ledger: Ledger) -> None:
        """Shared ledger: requeue the jobs of daemons that stopped heartbeating."""
        try:
            for job_id in ledger.recover(stale_after_s=self.cfg.stale_after_s):
                log.warning("job %s: its daemon stopped heartbeating; requeued", job_id)
                self._job_log(job_id, "requeued: the daemon running it stopped heartbeating")
            ledger.prune_workers(FORGET_WORKERS_S)
        except Exception:
            log.exception("recovering stale jobs failed; will try again")

    def _abandon(self, run: Running, why: str) -> None:
        """Stop working on a job we no longer own, writing nothing more about it."""
        log.warning("job %s: %s; stopping stage %s here", run.job_id, why, run.stage or "-")
        if run.proc is not None and run.proc.proc.is_alive():
            run.proc.kill_tree(grace_s=0.5)
        self._release(run)

    def _intake_loop(self, watcher: Any) -> None:
        """Inbox -> ledger, in its own thread so pickup never waits for stage work."""
        watcher.scan()
        last_scan = time.monotonic()
        deferred: dict[Path, float] = {}
        while not self.stop_requested.is_set():
            ready = watcher.ready(wait_s=0.05)
            now = time.monotonic()
            for path in ready:
                if deferred.get(path, 0.0) > now:
                    continue
                try:
                    result = self.take_request(path)
                except Exception:
                    log.exception("could not take %s; will look again at the next scan", path)
                    result = "retry-later"
                if result == "retry-later":
                    deferred[path] = now + max(self.cfg.settle_s, 1.0)
                else:
                    deferred.pop(path, None)
                    watcher.forget(path)
                    if result == "accepted":
                        self.wake()
            if now - last_scan >= self.cfg.rescan_s:
                watcher.scan()
                last_scan = now
            if not watcher.pending and watcher.events.empty():
                if not self.intake_idle.is_set():
                    self.intake_idle.set()
                    self.wake()
            else:
                self.intake_idle.clear()

    def _install_signals(self) -> None:
        def _stop(signum: int, _frame: Any) -> None:
            log.info("received %s; stopping (jobs will resume)", signal.Signals(signum).name)
            self.stop()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _stop)
            signal.signal(signal.SIGINT, _stop)

    def _idle(self) -> bool:
        assert self.ledger is not None
        counts = self.ledger.count_by_state()
        if counts.get(JobState.QUEUED.value, 0) or counts.get(JobState.RUNNING.value, 0):
            return False
        # Waiting jobs count only when their retry is due soon enough to wait for.
        return not counts.get(JobState.WAITING.value, 0)

    def _recover(self, ledger: Ledger) -> None:
        """Alone on an SQLite ledger (we hold the home lock), every running job belongs
        to a daemon that died. On a shared ledger: those of dead daemons of this host
        (their pid is gone) at once, those of other hosts when their lease expires."""
        if ledger.shared:
            dead = [w for w in ledger.running_workers() if _dead_local_worker(w, self.host)]
            leftovers = ledger.running_stage_pids(dead) if dead else []
            requeue: dict[str, Any] = {"dead_workers": dead}
        else:
            leftovers = ledger.running_stage_pids()
            requeue = {"worker": self.worker}
        for job_id, stage, pid in leftovers:
            if kill_tree(pid, 0.5, expect_name="multiprocessing"):
                log.warning("stopped a leftover %s process (pid %d) of job %s", stage, pid, job_id)
        if ledger.shared:
            self._recover_stale(ledger)
            if not dead:
                return
        for job_id in ledger.recover(**requeue):
            log.info("job %s: resuming after the previous daemon stopped", job_id)
            self._job_log(job_id, "resuming after the previous daemon stopped")

    def _shutdown(self) -> None:
        if not self.running or self.ledger is None:
            return
        for run in list(self.running.values()):
            if run.proc is not None:
                run.proc.kill_tree(grace_s=1.0)
        for run in list(self.running.values()):
            try:
                if run.stage:
                    self.ledger.stage_failed(
                        run.job_id, run.stage, "interrupted", StageState.PENDING, token=run.token
                    )
                self.ledger.transition(
                    run.job_id,
                    JobState.RUNNING,
                    JobState.QUEUED,
                    event="daemon stopped; the job resumes at its next start",
                    token=run.token,
                    worker=None,
                    lease_expires_at=None,
                    attempts=max(run.attempt - 1, 0),
                )
            except Fenced:
                continue  # another daemon has it already
            self._job_log(run.job_id, f"daemon stopped during stage {run.stage}; will resume")
        self.running.clear()

    # -- requests --------------------------------------------------------------------

    def take_request(self, path: Path) -> str:
        """Accept or reject one request file. Returns accepted | rejected | duplicate |
        gone | retry-later."""
        assert self.ledger is not None
        if not path.exists():
            return "gone"
        try:
            accepted = requests.parse(
                path,
                allowed_roots=self.cfg.allowed_roots,
                max_bytes=self.cfg.max_request_bytes,
            )
        except requests.RequestError as exc:
            try:
                age = time.time() - path.stat().st_mtime
            except OSError:
                return "gone"
            if age < max(2.0, self.cfg.settle_s * 2) and "not valid" in str(exc):
                return "retry-later"  # maybe still being written
            self._reject(path, str(exc))
            return "rejected"
        spec = accepted.spec
        try:
            st = path.stat()
        except FileNotFoundError:
            return "gone"
        key = request_key(
            accepted.content_hash, requests.display_name(path), st.st_mtime_ns, st.st_size
        )
        if self.ledger.shared and (taken := self.ledger.find_by_key(key)) is not None:
            # Another daemon watching the same inbox took it first (or we did, before a
            # crash): make sure it leaves the inbox; the job exists once.
            self._move(path, self.cfg.workspace(taken.id) / f"request{path.suffix.lower()}")
            return "accepted"
        earlier = [
            j for j in self.ledger.find_by_hash(accepted.content_hash) if j.state != "cancelled"
        ]
        if earlier and not accepted.force:
            j = earlier[-1]
            ws_request = self.cfg.workspace(j.id) / f"request{path.suffix.lower()}"
            if j.request_name == requests.display_name(path) and (
                not ws_request.exists() or ws_request.samefile(path)
            ):
                # Accepted before a crash, but not yet (or not wholly) moved out of the inbox.
                self._move(path, ws_request)
                return "accepted"
            self._reject(
                path,
                f"the same request was already submitted as job {j.id} ({j.state}); "
                "to run it again add `force = true` or use `dropmesh submit --force`",
                duplicate=True,
            )
            return "duplicate"
        # The workspace first: if it cannot be made (disk full), no job is recorded and
        # the request stays in the inbox for the next look.
        job_id = new_job_id()
        ws = self.cfg.workspace(job_id)
        ws.mkdir(parents=True, exist_ok=True)
        try:
            job = self.ledger.create_job(
                job_id=job_id,
                project=spec.project,
                spec=spec.to_json(),
                request_hash=accepted.content_hash,
                request_name=requests.display_name(path),
                priority=accepted.priority,
                max_attempts=self.cfg.max_attempts,
                request_key=key,
            )
        except RequestTaken:
            with contextlib.suppress(OSError):
                ws.rmdir()
            taken = self.ledger.find_by_key(key)
            if taken is not None:
                self._move(path, self.cfg.workspace(taken.id) / f"request{path.suffix.lower()}")
            return "accepted"
        self._move(path, ws / f"request{path.suffix.lower()}")
        log.info(
            "job %s queued: project %s, %d images, %s quality -> %s",
            job.id,
            spec.project,
            accepted.image_count,
            spec.quality,
            ", ".join(spec.formats),
        )
        self._job_log(
            job.id, f"queued from {requests.display_name(path)}: {accepted.image_count} images"
        )
        return "accepted"

    def _move(self, src: Path, dst: Path) -> bool:
        """Move a request out of the inbox by hard link + unlink rather than rename:
        inotify reports a rename out of the watched folder as an unpaired move, which
        the observer holds back for half a second together with every later event.

        Several daemons may move the same file at once: dst is replaced atomically
        (link to a private temporary name, then rename), and a src that another daemon
        moved already is not an error. Returns False when src was gone."""
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            try:
                os.link(src, tmp)
            except FileNotFoundError:
                return False
            except OSError:
                shutil.copy2(src, tmp)
            os.replace(tmp, dst)
        except FileNotFoundError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        src.unlink(missing_ok=True)
        return True

    def _reject(self, path: Path, message: str, duplicate: bool = False) -> None:
        assert self.ledger is not None
        rejected = self.cfg.rejected
        rejected.mkdir(parents=True, exist_ok=True)
        dst = rejected / path.name
        if dst.exists():
            dst = rejected / f"{path.stem}.{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}"
            n = 1
            while dst.exists():
                n += 1
                dst = rejected / f"{path.stem}.{time.strftime('%Y%m%d-%H%M%S')}-{n}{path.suffix}"
        if not self._move(path, dst):
            return  # another daemon watching this inbox handled it
        (rejected / f"{dst.name}.error.txt").write_text(
            f"{requests.display_name(path)} was not accepted:\n{message}\n\n"
            "Fix the request and drop it into the inbox again.\n",
            encoding="utf-8",
        )
        self.ledger.reject(requests.display_name(path), message, notify=not duplicate)
        log.warning("rejected %s: %s", requests.display_name(path), message)

    # -- scheduling ------------------------------------------------------------------

    def _start_jobs(self) -> None:
        assert self.ledger is not None
        while len(self.running) < self.cfg.max_jobs and not self.stop_requested.is_set():
            job = self.ledger.claim_next(
                self.worker, lease_s=self.cfg.stale_after_s, skip_next=self._leave_to_gpu()
            )
            if job is None:
                return
            run = Running(
                job_id=job.id,
                project=job.project,
                spec=dict(job.spec),
                attempt=job.attempts,
                token=job.lease_token,
            )
            self.running[job.id] = run
            self._job_log(
                job.id,
                f"attempt {job.attempts} of {job.max_attempts} started on {self.host} "
                f"(lease {job.lease_token})",
            )
            self._guarded(run, self._next_stage, run)

    def _leave_to_gpu(self) -> frozenset[str]:
        """Stages a daemon without a GPU leaves to daemons with one (gpu_stages):
        `any` none; `require` all GPU stages; `prefer` all GPU stages while a live
        daemon with a CUDA device shares the ledger, none otherwise."""
        if self.gpu_count() > 0 or self.cfg.gpu_stages == "any" or self.ledger is None:
            return frozenset()
        if self.cfg.gpu_stages == "require":
            return GPU_STAGES
        now = time.monotonic()
        cached = self._gpu_peer
        if cached is None or now - cached[0] > self.cfg.heartbeat_s:
            cached = (now, self.ledger.gpu_worker_alive(self.cfg.stale_after_s))
            self._gpu_peer = cached
        return GPU_STAGES if cached[1] else frozenset()

    def _guarded(self, run: Running, fn: Callable[..., None], *args: Any) -> None:
        """Run one step of a job's work; a fenced write ends our work on the job."""
        try:
            fn(*args)
        except Fenced as exc:
            self._abandon(run, f"write refused ({exc})")

    def _next_stage(self, run: Running) -> None:
        assert self.ledger is not None
        stages = self.ledger.stages(run.job_id)
        todo = [s.name for s in stages if s.state != StageState.DONE.value]
        if not todo:
            self.ledger.transition(
                run.job_id,
                JobState.RUNNING,
                JobState.SUCCEEDED,
                token=run.token,
                finished_at=time.time(),
            )
            self.running.pop(run.job_id, None)
            return
        stage = todo[0]
        if stage in self._leave_to_gpu():
            if run.holds_gpu:
                self.gpu_busy = run.holds_gpu = False
            self.ledger.release(
                run.job_id, run.token, f"stage {stage} left to a daemon with a GPU ({self.host})"
            )
            self._job_log(run.job_id, f"stage {stage} left to a daemon with a GPU")
            log.info("job %s: stage %s left to a daemon with a GPU", run.job_id, stage)
            self.running.pop(run.job_id, None)
            return
        uses_gpu = stage in GPU_STAGES and self.gpu_count() > 0
        if uses_gpu and self.gpu_busy and not run.holds_gpu:
            run.stage = stage
            run.proc = None
            return  # waits for the GPU slot; retried from _poll_children
        if run.holds_gpu and not uses_gpu:
            self.gpu_busy = run.holds_gpu = False
        if uses_gpu and not run.holds_gpu:
            self.gpu_busy = run.holds_gpu = True
        ws = self.cfg.workspace(run.job_id)
        task = StageTask(
            pipeline=self.cfg.pipeline,
            stage=stage,
            spec=run.spec,
            workspace=str(ws),
            results_dir=str(self.cfg.results / run.project),
            device=self._stage_device(),
            threads=self.cfg.threads,
            log_path=str(ws / "job.log"),
        )
        run.stage = stage
        try:
            ws.mkdir(parents=True, exist_ok=True)
            run.proc = StageProcess(task)
        except OSError as exc:  # disk full, too many processes or open files
            kind, message, hint = classify(exc)
            run.proc = None
            self._finish_stage(
                run,
                Outcome(
                    "error",
                    message=f"cannot start the stage: {message}",
                    hint=hint,
                    transient=kind == "transient",
                ),
            )
            return
        run.progress_written_at = 0.0
        self.ledger.stage_started(run.job_id, stage, run.proc.pid, run.attempt, token=run.token)
        self._job_log(run.job_id, f"stage {stage} started (pid {run.proc.pid})")
        log.info("job %s: stage %s started", run.job_id, stage)

    def _stage_device(self) -> str:
        """The device for a stage child. `auto` on a daemon that found no CUDA device is
        `cpu`, so that no stage asks again (a probe in a subprocess, about a second)."""
        if self.cfg.device == "auto" and self.gpu_count() == 0:
            return "cpu"
        return self.cfg.device

    def _poll_children(self) -> None:
        assert self.ledger is not None
        for run in list(self.running.values()):
            self._guarded(run, self._poll_child, run)

    def _poll_child(self, run: Running) -> None:
        assert self.ledger is not None
        if run.proc is None:
            self._next_stage(run)  # waiting for the GPU slot
            return
        outcome = run.proc.poll()
        if run.proc.progress is not None:
            now = time.monotonic()
            if now - run.progress_written_at >= 0.25 or outcome is not None:
                frac, msg = run.proc.progress
                self.ledger.stage_progress(run.job_id, run.stage, frac, msg, token=run.token)
                run.progress_written_at = now
                run.proc.progress = None
        if outcome is None:
            if time.monotonic() - run.proc.started > self.cfg.stage_timeout_s:
                run.proc.kill_tree()
                outcome = Outcome(
                    "crashed",
                    message=f"stage took longer than stage_timeout_s "
                    f"({self.cfg.stage_timeout_s:.0f} s) and was stopped",
                    transient=True,
                )
            else:
                return
        self._finish_stage(run, outcome)

    def _finish_stage(self, run: Running, outcome: Outcome) -> None:
        assert self.ledger is not None
        stage = run.stage
        if run.cancelling or outcome.kind == "cancelled":
            self._cancelled(run)
            return
        if outcome.kind == "done":
            p = outcome.payload
            last = stage == STAGES[-1]
            exports = [
                ExportRecord(Path(path), fmt, size, sha256)
                for path, fmt, size, sha256 in p.get("exports", [])
            ]
            self.ledger.stage_finished(
                run.job_id,
                stage,
                metrics=p.get("metrics", {}),
                device=p.get("device"),
                peak_rss_mb=p.get("peak_rss_mb"),
                exports=exports,
                last=last,
                token=run.token,
            )
            self._job_log(run.job_id, f"stage {stage} done")
            if last:
                self._release(run)
                files = ", ".join(e.path.name for e in exports) or "no files"
                log.info("job %s succeeded: %s", run.job_id, files)
                self._job_log(run.job_id, f"job succeeded: {files}")
            else:
                self._next_stage(run)
            return
        message = outcome.message + (f" ({outcome.hint})" if outcome.hint else "")
        self._job_log(run.job_id, f"stage {stage} failed: {message}")
        self.ledger.stage_failed(run.job_id, stage, message, StageState.FAILED, token=run.token)
        job = self.ledger.get(run.job_id)
        self._release(run)
        if outcome.transient and job.attempts < job.max_attempts:
            delay = backoff_delay(
                job.attempts, self.cfg.retry_base_s, self.cfg.retry_max_s, self.rng
            )
            self.ledger.schedule_retry(run.job_id, stage, message, delay, token=run.token)
            log.warning(
                "job %s: stage %s failed (%s); retry %d of %d in %.0f s",
                run.job_id,
                stage,
                message,
                job.attempts + 1,
                job.max_attempts,
                delay,
            )
        else:
            if outcome.transient:
                message = f"{message}; gave up after {job.attempts} attempts"
            self.ledger.fail(run.job_id, stage, message, token=run.token)
            log.error("job %s failed at stage %s: %s", run.job_id, stage, message)

    def _release(self, run: Running) -> None:
        if run.holds_gpu:
            self.gpu_busy = run.holds_gpu = False
        self.running.pop(run.job_id, None)

    # -- cancel ----------------------------------------------------------------------

    def _check_cancels(self) -> None:
        assert self.ledger is not None
        for job_id in self.ledger.cancel_requested(list(self.running)):
            run = self.running.get(job_id)
            if run is None or run.cancelling:
                continue
            run.cancelling = True
            log.info("job %s: cancelling stage %s", job_id, run.stage)
            if run.proc is not None:
                run.proc.kill_tree(grace_s=0.5)
                run.proc.poll()
            self._guarded(run, self._cancelled, run)

    def _cancelled(self, run: Running) -> None:
        assert self.ledger is not None
        if run.stage:
            self.ledger.stage_failed(
                run.job_id, run.stage, "cancelled", StageState.CANCELLED, token=run.token
            )
            remove_stage_outputs(self.cfg.workspace(run.job_id), run.stage)
        self.ledger.transition(
            run.job_id,
            JobState.RUNNING,
            JobState.CANCELLED,
            event=f"cancelled during stage {run.stage}",
            token=run.token,
            finished_at=time.time(),
            worker=None,
            cancel_requested=False,
        )
        self._job_log(run.job_id, f"cancelled during stage {run.stage}")
        self._release(run)

    # -- notifications ---------------------------------------------------------------

    def _notify_loop(self, notifier: Any) -> None:
        assert self.ledger is not None
        while not self.stop_requested.wait(0.5):
            try:
                self.flush_notifications(notifier)
            except Exception:
                log.exception("sending notifications failed; will try again")
        try:
            self.flush_notifications(notifier)
        except Exception:
            log.exception("sending notifications failed")

    def flush_notifications(self, notifier: Any) -> int:
        assert self.ledger is not None
        return self.ledger.deliver_notifications(lambda n: bool(notifier.notify(n.title, n.body)))

    # -- helpers ---------------------------------------------------------------------

    def _job_log(self, job_id: str, message: str) -> None:
        ws = self.cfg.workspace(job_id)
        try:
            ws.mkdir(parents=True, exist_ok=True)
            with open(ws / "job.log", "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} dropmesh: {message}\n")
        except OSError as exc:
            log.warning("cannot write the log of job %s: %s", job_id, exc)


def _dead_local_worker(worker: str, host: str) -> bool:
    """Whether `worker` (host:pid:id) was a daemon on this host whose process is gone."""
    parts = worker.split(":")
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
