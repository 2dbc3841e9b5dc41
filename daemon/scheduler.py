"""Which job runs where and when: claims, the GPU slot, one stage child at a time per job,
finishing a stage (next stage, retry with backoff, or failure), and cancels."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.config import Config
from daemon.joblog import JobLog
from daemon.ledger import ExportRecord, Fenced, Ledger
from daemon.stageproc import Done, Outcome, OutcomeKind, StageProcess, StageTask, classify
from daemon.states import JobState, StageState
from pipeline import STAGES
from pipeline.devices import available_cores
from pipeline.stages import GPU_STAGES, remove_stage_outputs

log = logging.getLogger("dropmesh")

# Progress of a stage is written to the ledger at most this often.
PROGRESS_WRITE_S = 0.25


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with +-25 % jitter: base * 2^(attempt-1), capped."""
    delay = min(max_s, base_s * (2 ** max(attempt - 1, 0)))
    return float(max(0.0, delay * rng.uniform(0.75, 1.25)))


class GpuCount:
    """The CUDA devices this daemon uses: none with device = cpu, else probed once, on
    first use (in a subprocess, about a second)."""

    def __init__(self, device: str, known: int | None = None) -> None:
        self._device = device
        self._count = known

    def __call__(self) -> int:
        if self._count is None:
            from pipeline.devices import cuda_device_count

            self._count = cuda_device_count() if self._device != "cpu" else 0
        return self._count


@dataclass
class Running:
    """A job this daemon holds the lease on."""

    job_id: str
    project: str
    spec: dict[str, Any]
    attempt: int
    token: int = 0  # the fencing token of our lease on the job
    stage: str = ""
    proc: StageProcess | None = None  # None between stages, or waiting for the GPU slot
    progress_written_at: float = 0.0
    holds_gpu: bool = False
    cancelling: bool = False


class Scheduler:
    def __init__(
        self,
        cfg: Config,
        ledger: Ledger,
        joblog: JobLog,
        *,
        daemon_id: str,
        host: str,
        gpus: GpuCount,
        runner: str,
        stop: threading.Event,
        ready: threading.Event,
    ) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.joblog = joblog
        self.daemon_id = daemon_id
        self.host = host
        self.gpus = gpus
        self.runner = runner
        self._stop = stop
        # Set once stage processes can start. Until then starting one blocks the main
        # loop (no heartbeats): a claimed job's lease could expire and the job run twice.
        self._ready = ready
        self.running: dict[str, Running] = {}
        self.gpu_busy = False
        self.rng = random.Random()
        self._gpu_peer: tuple[float, bool] | None = None  # (checked at, a GPU daemon lives)

    # -- what the main loop asks -------------------------------------------------------

    def leases(self) -> dict[str, int]:
        """Our jobs and the fencing tokens of their leases."""
        return {r.job_id: r.token for r in self.running.values()}

    def waitables(self) -> list[Any]:
        """What to wait on for the next message or exit of one of our stage children."""
        out: list[Any] = []
        for r in self.running.values():
            if r.proc is not None:
                out.extend(r.proc.waitables())
        return out

    def start_jobs(self) -> None:
        """Claim jobs while there is room (max_jobs) and start their next stage."""
        if not self._ready.is_set():
            return
        while len(self.running) < self.cfg.max_jobs and not self._stop.is_set():
            job = self.ledger.claim_next(
                self.daemon_id, lease_s=self.cfg.stale_after_s, skip_next=self._leave_to_gpu()
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
            self.joblog.write(
                job.id,
                f"attempt {job.attempts} of {job.max_attempts} started on {self.host} "
                f"(lease {job.lease_token})",
            )
            self._guarded(run, self._next_stage, run)

    def poll(self) -> None:
        """Write progress, and finish the stages whose children have ended."""
        for run in list(self.running.values()):
            self._guarded(run, self._poll_child, run)

    def check_cancels(self) -> None:
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

    def abandon(self, job_id: str, why: str) -> None:
        """Stop working on a job we no longer own, writing nothing more about it."""
        run = self.running.get(job_id)
        if run is not None:
            self._abandon(run, why)

    def _abandon(self, run: Running, why: str) -> None:
        log.warning("job %s: %s; stopping stage %s here", run.job_id, why, run.stage or "-")
        if run.proc is not None and run.proc.proc.is_alive():
            run.proc.kill_tree(grace_s=0.5)
        self._release(run)

    def shutdown(self) -> None:
        """The daemon stops: stop every stage child and queue its job again, to resume
        at its unfinished stage (the interrupted attempt is not counted)."""
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
            self.joblog.write(run.job_id, f"daemon stopped during stage {run.stage}; will resume")
        self.running.clear()

    def stage_device(self) -> str:
        """The device for a stage child. `auto` on a daemon that found no CUDA device is
        `cpu`, so that no stage asks again (a probe in a subprocess, about a second)."""
        if self.cfg.device == "auto" and self.gpus() == 0:
            return "cpu"
        return self.cfg.device

    # -- one job's stages --------------------------------------------------------------

    def _guarded(self, run: Running, fn: Callable[..., None], *args: Any) -> None:
        """Run one step of a job's work; a fenced write ends our work on the job."""
        try:
            fn(*args)
        except Fenced as exc:
            self._abandon(run, f"write refused ({exc})")

    def _leave_to_gpu(self) -> frozenset[str]:
        """Stages a daemon without a GPU leaves to daemons with one (gpu_stages):
        `any` none; `require` all GPU stages; `prefer` all GPU stages while a live
        daemon with a CUDA device shares the ledger, none otherwise."""
        if self.gpus() > 0 or self.cfg.gpu_stages == "any":
            return frozenset()
        if self.cfg.gpu_stages == "require":
            return GPU_STAGES
        now = time.monotonic()
        cached = self._gpu_peer
        if cached is None or now - cached[0] > self.cfg.heartbeat_s:
            cached = (now, self.ledger.gpu_worker_alive(self.cfg.stale_after_s))
            self._gpu_peer = cached
        return GPU_STAGES if cached[1] else frozenset()

    def _next_stage(self, run: Running) -> None:
        todo = [s.name for s in self.ledger.stages(run.job_id) if s.state != StageState.DONE]
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
            self._hand_over(run, stage)
            return
        if not self._take_gpu_slot(run, stage):
            run.stage = stage
            run.proc = None
            return  # waits for the GPU slot; tried again at the next poll
        self._start_stage(run, stage)

    def _hand_over(self, run: Running, stage: str) -> None:
        """Give the job back to the queue for a daemon with a GPU to run `stage`."""
        if run.holds_gpu:
            self.gpu_busy = run.holds_gpu = False
        self.ledger.release(
            run.job_id, run.token, f"stage {stage} left to a daemon with a GPU ({self.host})"
        )
        self.joblog.write(run.job_id, f"stage {stage} left to a daemon with a GPU")
        log.info("job %s: stage %s left to a daemon with a GPU", run.job_id, stage)
        self.running.pop(run.job_id, None)

    def _take_gpu_slot(self, run: Running, stage: str) -> bool:
        """Take (or keep, or give back) the one GPU slot for `stage`; False while the
        stage needs it and another job holds it."""
        uses_gpu = stage in GPU_STAGES and self.gpus() > 0
        if uses_gpu and self.gpu_busy and not run.holds_gpu:
            return False
        if run.holds_gpu and not uses_gpu:
            self.gpu_busy = run.holds_gpu = False
        if uses_gpu and not run.holds_gpu:
            self.gpu_busy = run.holds_gpu = True
        return True

    def _start_stage(self, run: Running, stage: str) -> None:
        ws = self.cfg.workspace(run.job_id)
        task = StageTask(
            stage=stage,
            spec=run.spec,
            workspace=str(ws),
            results_dir=str(self.cfg.results / run.project),
            device=self.stage_device(),
            threads=self.stage_threads(),
            log_path=str(self.joblog.path(run.job_id)),
            runner=self.runner,
        )
        run.stage = stage
        try:
            ws.mkdir(parents=True, exist_ok=True)
            run.proc = StageProcess(task)
        except OSError as exc:  # disk full, too many processes or open files
            run.proc = None
            self._finish_stage(run, Outcome.failed(classify(exc), "cannot start the stage: "))
            return
        run.progress_written_at = 0.0
        self.ledger.stage_started(run.job_id, stage, run.proc.pid, run.attempt, token=run.token)
        self.joblog.write(
            run.job_id, f"stage {stage} started (pid {run.proc.pid}, {task.threads} threads)"
        )
        log.info("job %s: stage %s started", run.job_id, stage)

    def stage_threads(self) -> int:
        """Threads for each stage: the configured `threads`, or else this machine's cores
        shared evenly among the `max_jobs` jobs that may run at once, so that they never
        oversubscribe it (with max_jobs = 1, every core)."""
        if self.cfg.threads > 0:
            return self.cfg.threads
        return max(1, available_cores() // self.cfg.max_jobs)

    def _poll_child(self, run: Running) -> None:
        if run.proc is None:
            self._next_stage(run)  # waiting for the GPU slot
            return
        outcome = run.proc.poll()
        if run.proc.progress is not None:
            now = time.monotonic()
            if now - run.progress_written_at >= PROGRESS_WRITE_S or outcome is not None:
                p = run.proc.progress
                self.ledger.stage_progress(
                    run.job_id, run.stage, p.fraction, p.message, token=run.token
                )
                run.progress_written_at = now
                run.proc.progress = None
        if outcome is None:
            if time.monotonic() - run.proc.started <= self.cfg.stage_timeout_s:
                return
            run.proc.kill_tree()
            outcome = Outcome.crashed(
                f"stage took longer than stage_timeout_s "
                f"({self.cfg.stage_timeout_s:.0f} s) and was stopped"
            )
        self._finish_stage(run, outcome)

    def _finish_stage(self, run: Running, outcome: Outcome) -> None:
        if run.cancelling or outcome.kind is OutcomeKind.CANCELLED:
            self._cancelled(run)
        elif outcome.kind is OutcomeKind.DONE:
            self._stage_done(run, outcome.done or Done())
        else:
            self._stage_failed(run, outcome)

    def _stage_done(self, run: Running, done: Done) -> None:
        stage = run.stage
        last = stage == STAGES[-1]
        exports = [
            ExportRecord(Path(path), fmt, size, sha256) for path, fmt, size, sha256 in done.exports
        ]
        self.ledger.stage_finished(
            run.job_id,
            stage,
            metrics=done.metrics,
            device=done.device,
            peak_rss_mb=done.peak_rss_mb,
            exports=exports,
            last=last,
            token=run.token,
        )
        self.joblog.write(run.job_id, f"stage {stage} done")
        if not last:
            self._next_stage(run)
            return
        self._release(run)
        files = ", ".join(e.path.name for e in exports) or "no files"
        log.info("job %s succeeded: %s", run.job_id, files)
        self.joblog.write(run.job_id, f"job succeeded: {files}")

    def _stage_failed(self, run: Running, outcome: Outcome) -> None:
        """Retry a transient failure after a backoff while attempts are left; fail the
        job otherwise."""
        stage = run.stage
        message = outcome.message + (f" ({outcome.hint})" if outcome.hint else "")
        self.joblog.write(run.job_id, f"stage {stage} failed: {message}")
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
            return
        if outcome.transient:
            message = f"{message}; gave up after {job.attempts} attempts"
        self.ledger.fail(run.job_id, stage, message, token=run.token)
        log.error("job %s failed at stage %s: %s", run.job_id, stage, message)

    def _cancelled(self, run: Running) -> None:
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
            worker=None,
            finished_at=time.time(),
            cancel_requested=False,
        )
        self.joblog.write(run.job_id, f"cancelled during stage {run.stage}")
        self._release(run)

    def _release(self, run: Running) -> None:
        if run.holds_gpu:
            self.gpu_busy = run.holds_gpu = False
        self.running.pop(run.job_id, None)
