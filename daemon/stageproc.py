"""One stage in one child process.

A crash, an abort inside COLMAP, a timeout or a cancel kills only the child. The child
reports progress and its result over a pipe; its stdout/stderr (COLMAP's own log
included) go to the job's log file.

Children come from a fork server: a fresh interpreter (spawned, so it shares nothing with
the daemon: no threads, no ledger connections) that imports the heavy libraries once and
forks one child per stage. Starting a stage then takes milliseconds instead of the
second or two that a spawned interpreter spends importing pycolmap, open3d and numpy.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib
import logging
import multiprocessing as mp
import multiprocessing.forkserver
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger("dropmesh.stageproc")

_CHILDREN = mp.get_context("forkserver")
# Imported once by the fork server. Only libraries that start no threads of their own at
# import belong here; the OpenBLAS pools that numpy, scipy and cv2 each bring are
# fork-aware.
PRELOAD = [
    "daemon.stageproc",
    "pipeline",
    "numpy",
    "scipy.spatial",
    "PIL.Image",
    "cv2",
    "pycolmap",
    "open3d",
    "trimesh",
]
_CHILDREN.set_forkserver_preload(PRELOAD)
PROGRESS_INTERVAL_S = 0.2


def start_fork_server() -> None:
    """Start the fork server now rather than at the first stage, so that it imports the
    heavy libraries while the daemon waits for work.

    Every child runs the daemon's main module again as `__mp_main__` before its stage
    (multiprocessing does so for each start method but fork). The server imports that
    module once too, so a child re-runs only the module's own body, without its imports
    (the CLI's typer, rich and SQLAlchemy)."""
    preload = list(PRELOAD)
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None:
        # `python -m daemon.cli`; a package's __main__ is never re-run in children.
        if name != "__main__" and not name.endswith(".__main__"):
            preload.append(name)
    elif getattr(main, "__file__", None):
        preload.insert(0, "__main__")  # the `dropmesh` console script
    _CHILDREN.set_forkserver_preload(preload)
    multiprocessing.forkserver.ensure_running()


def _ready() -> None:
    pass


def wait_fork_server_ready() -> float:
    """Start one empty child, which the fork server forks once it has imported
    everything; returns the seconds that took."""
    t0 = time.monotonic()
    proc = _CHILDREN.Process(target=_ready, name="dropmesh-warm-up", daemon=True)
    proc.start()
    proc.join()
    return time.monotonic() - t0


# The stage runner, as module:function taking (stage_name, StageContext): always the
# photogrammetry pipeline, except where a test names a stand-in in RUNNER_ENV. The
# daemon reads it once and hands it to each child in its StageTask (the fork server's
# environment is the daemon's at the server's start, not at the stage's).
DEFAULT_RUNNER = "pipeline.stages:run_stage"
RUNNER_ENV = "DROPMESH_TEST_PIPELINE"


def runner_from_env(env: dict[str, str] | None = None) -> str:
    """The runner for stage children: DEFAULT_RUNNER unless a test sets RUNNER_ENV."""
    return (os.environ if env is None else env).get(RUNNER_ENV) or DEFAULT_RUNNER


@dataclass
class StageTask:
    stage: str
    spec: dict[str, Any]
    workspace: str
    results_dir: str
    device: str
    threads: int
    log_path: str
    runner: str = DEFAULT_RUNNER
    daemon_pid: int = field(default_factory=os.getpid)


def load_runner(ref: str) -> Callable[..., Any]:
    module, _, attr = ref.partition(":")
    fn: Callable[..., Any] = getattr(importlib.import_module(module), attr or "run_stage")
    return fn


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this child when its parent (the fork server) dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


def _die_with_daemon(pid: int, interval_s: float = 0.25) -> None:
    """Kill this stage's whole process group once the daemon is gone (kill -9 included).

    The fork server outlives the daemon while any child it forked is alive, so the
    kernel's parent-death signal alone would leave a stage running without its daemon."""

    def watch() -> None:
        try:
            daemon = psutil.Process(pid)
        except psutil.Error:
            os.killpg(0, signal.SIGKILL)
            return
        while True:
            time.sleep(interval_s)
            try:
                gone = daemon.status() == psutil.STATUS_ZOMBIE
            except psutil.Error:
                gone = True
            if gone:
                os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="daemon-watch", daemon=True).start()


class ErrorKind(StrEnum):
    TRANSIENT = "transient"  # retrying may help
    PERMANENT = "permanent"  # retrying cannot help


# -- what a stage child sends the daemon over its pipe -----------------------------------


@dataclass(frozen=True)
class Progress:
    fraction: float
    message: str


@dataclass(frozen=True)
class Done:
    metrics: dict[str, Any] = field(default_factory=dict)
    # (path, format, size, sha256): what the export stage measured of each published file
    exports: list[tuple[str, str, int | None, str | None]] = field(default_factory=list)
    device: str | None = None
    peak_rss_mb: float | None = None


@dataclass(frozen=True)
class Cancelled:
    pass


@dataclass(frozen=True)
class Failure:
    """A classified error: what went wrong, whether a retry may help, and a hint."""

    kind: ErrorKind
    message: str
    hint: str | None = None

    @property
    def transient(self) -> bool:
        return self.kind is ErrorKind.TRANSIENT


Message = Progress | Done | Cancelled | Failure


def classify(exc: BaseException) -> Failure:
    """Whether retrying may help with `exc`, in words for the user."""
    from pipeline.errors import PermanentError, TransientError

    transient, permanent = ErrorKind.TRANSIENT, ErrorKind.PERMANENT
    if isinstance(exc, PermanentError):
        return Failure(permanent, exc.message, exc.hint)
    if isinstance(exc, TransientError):
        return Failure(transient, exc.message, exc.hint)
    if isinstance(exc, MemoryError):
        return Failure(transient, "out of memory", "close other programs or use a lower quality")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return Failure(transient, f"disk full: {exc}", "free some disk space")
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return Failure(permanent, f"cannot write: {exc}", "check the folder's permissions")
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    if "cuda" in low or "out of memory" in low or "bad_alloc" in low:
        return Failure(transient, text)
    return Failure(permanent, text, "see `dropmesh logs` for details")


def _become_stage_process(task: StageTask) -> None:
    """Its own process group, which dies with the daemon; output to the job's log."""
    _die_with_parent()
    os.setpgid(0, 0)
    _die_with_daemon(task.daemon_pid)
    fd = os.open(task.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {task.stage} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def child_main(task: StageTask, conn: Connection) -> None:
    """The stage child: run one stage, send its progress and then one Done, Cancelled
    or Failure. SIGTERM asks the stage to stop at its next cancellation check."""
    _become_stage_process(task)
    cancel_flag = {"set": False}

    def _on_term(_sig: int, _frame: Any) -> None:
        cancel_flag["set"] = True

    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from pipeline import JobSpec, StageContext, errors

    last = [0.0]

    def progress(fraction: float, message: str) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_INTERVAL_S or fraction >= 1.0:
            last[0] = now
            conn.send(Progress(float(fraction), str(message)))

    ctx = StageContext(
        spec=JobSpec.from_json(task.spec),
        workspace=Path(task.workspace),
        results_dir=Path(task.results_dir),
        progress=progress,
        cancelled=lambda: cancel_flag["set"],
        device=task.device,
        threads=task.threads,
        log=logging.getLogger(f"pipeline.{task.stage}"),
    )
    try:
        runner = load_runner(task.runner)
        result = runner(task.stage, ctx)
        done = Done(
            metrics=dict(result.metrics),
            exports=[(str(e.path), e.format, e.size, e.sha256) for e in result.exports],
            device=result.device,
            peak_rss_mb=_peak_rss_mb(),
        )
        conn.send(done)
    except errors.Cancelled:
        conn.send(Cancelled())
    except BaseException as exc:  # report everything; the daemon decides
        log.exception("stage %s failed", task.stage)
        with contextlib.suppress(Exception):
            conn.send(classify(exc))
    finally:
        conn.close()
        sys.stdout.flush()
        sys.stderr.flush()


def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0


class OutcomeKind(StrEnum):
    DONE = "done"
    ERROR = "error"  # the stage raised; `transient` says whether a retry may help
    CANCELLED = "cancelled"
    CRASHED = "crashed"  # the child died without a result, or ran past its time


@dataclass
class Outcome:
    """How a stage child ended."""

    kind: OutcomeKind
    done: Done | None = None  # the result, for DONE
    message: str = ""
    hint: str | None = None
    transient: bool = False

    @classmethod
    def failed(cls, failure: Failure, prefix: str = "") -> Outcome:
        return cls(
            OutcomeKind.ERROR,
            message=prefix + failure.message,
            hint=failure.hint,
            transient=failure.transient,
        )

    @classmethod
    def crashed(cls, message: str) -> Outcome:
        return cls(OutcomeKind.CRASHED, message=message, transient=True)


class StageProcess:
    """The daemon's handle on a running stage child."""

    def __init__(self, task: StageTask) -> None:
        self.conn, child_conn = _CHILDREN.Pipe(duplex=False)
        self.proc = _CHILDREN.Process(
            target=child_main,
            args=(task, child_conn),
            name=f"dropmesh-{task.stage}",
            daemon=False,
        )
        self.proc.start()
        child_conn.close()
        self.started = time.monotonic()
        self.outcome: Outcome | None = None
        self.progress: Progress | None = None  # the latest, until the daemon writes it
        self._eof = False

    def waitables(self) -> list[Any]:
        """What to wait on for this child's next message or its exit."""
        sentinel = self.proc.sentinel
        return [sentinel] if self._eof or self.conn.closed else [self.conn, sentinel]

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def poll(self) -> Outcome | None:
        """Drain messages; return the outcome once the child has exited."""
        try:
            while self.conn.poll():
                self._receive(self.conn.recv())
        except (EOFError, OSError):
            # The child closed its end: only its exit is left to wait for.
            self._eof = True
        if self.proc.is_alive():
            return None
        self.proc.join()
        if self.outcome is None:
            code = self.proc.exitcode or 0
            if code < 0:
                name = signal.Signals(-code).name
                why = "killed, probably out of memory" if -code == signal.SIGKILL else "crashed"
                msg = f"stage process {why} ({name})"
            else:
                msg = f"stage process exited with status {code} without a result"
            self.outcome = Outcome.crashed(msg)
        self.conn.close()
        return self.outcome

    def _receive(self, msg: Message) -> None:
        match msg:
            case Progress():
                self.progress = msg
            case Done():
                self.outcome = Outcome(OutcomeKind.DONE, done=msg)
            case Cancelled():
                self.outcome = Outcome(OutcomeKind.CANCELLED)
            case Failure():
                self.outcome = Outcome.failed(msg)

    def kill_tree(self, grace_s: float = 1.0) -> None:
        """SIGTERM the child and everything it started; SIGKILL what is left after
        grace_s."""
        kill_tree(self.pid, grace_s)
        self.proc.join(timeout=1)


def kill_tree(pid: int, grace_s: float = 1.0, *, expect_name: str | None = None) -> bool:
    try:
        root = psutil.Process(pid)
        if expect_name is not None and expect_name not in " ".join(root.cmdline()):
            return False
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return False
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _gone, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=2)
    return True
