"""Inbox -> ledger: take a request file, record its job, move the file out of the inbox;
reject what cannot run, with a `<name>.error.txt` beside it in inbox/rejected/."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

from daemon import requests
from daemon.config import Config
from daemon.joblog import JobLog
from daemon.ledger import Ledger, RequestTaken, new_job_id, request_key
from daemon.models import Job
from daemon.states import JobState
from daemon.watcher import InboxWatcher

log = logging.getLogger("dropmesh")


class Taken(StrEnum):
    """What became of one request file."""

    ACCEPTED = "accepted"  # a job runs it (new, or recorded before)
    REJECTED = "rejected"  # moved to inbox/rejected/ with the reason
    DUPLICATE = "duplicate"  # rejected: the same request ran already
    GONE = "gone"  # the file left the inbox before it could be read
    RETRY_LATER = "retry-later"  # not valid yet, and may still be being written


class Intake:
    def __init__(
        self,
        cfg: Config,
        ledger: Ledger,
        joblog: JobLog,
        *,
        stop: threading.Event,
        wake: Callable[[], None],
    ) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.joblog = joblog
        self._stop = stop
        self._wake = wake
        # Set while nothing in the inbox waits to be taken.
        self.idle = threading.Event()

    def run(self, watcher: InboxWatcher) -> None:
        """The intake thread: inbox -> ledger, apart from the main loop so that pickup
        never waits for stage work."""
        watcher.scan()
        last_scan = time.monotonic()
        deferred: dict[Path, float] = {}
        while not self._stop.is_set():
            ready = watcher.ready(wait_s=0.05)
            now = time.monotonic()
            for path in ready:
                if deferred.get(path, 0.0) > now:
                    continue
                try:
                    result = self.take(path)
                except Exception:
                    log.exception("could not take %s; will look again at the next scan", path)
                    result = Taken.RETRY_LATER
                if result is Taken.RETRY_LATER:
                    deferred[path] = now + max(self.cfg.settle_s, 1.0)
                else:
                    deferred.pop(path, None)
                    watcher.forget(path)
                    if result is Taken.ACCEPTED:
                        self._wake()
            if now - last_scan >= self.cfg.rescan_s:
                watcher.scan()
                last_scan = now
            if not watcher.pending and watcher.events.empty():
                if not self.idle.is_set():
                    self.idle.set()
                    self._wake()
            else:
                self.idle.clear()

    def take(self, path: Path) -> Taken:
        """Accept or reject one request file."""
        if not path.exists():
            return Taken.GONE
        try:
            accepted = requests.parse(
                path,
                allowed_roots=self.cfg.allowed_roots,
                max_bytes=self.cfg.max_request_bytes,
            )
        except requests.RequestError as exc:
            return self._refuse(path, exc)
        try:
            st = path.stat()
        except FileNotFoundError:
            return Taken.GONE
        key = request_key(
            accepted.content_hash, requests.display_name(path), st.st_mtime_ns, st.st_size
        )
        if self.ledger.shared and (taken := self.ledger.find_by_key(key)) is not None:
            # Another daemon watching the same inbox took it first (or we did, before a
            # crash): make sure it leaves the inbox; the job exists once.
            move(path, self._request_copy(taken.id, path))
            return Taken.ACCEPTED
        earlier = [
            j
            for j in self.ledger.find_by_hash(accepted.content_hash)
            if j.state != JobState.CANCELLED
        ]
        if earlier and not accepted.force:
            return self._seen_before(path, earlier[-1])
        return self._create(path, accepted, key)

    def _refuse(self, path: Path, exc: requests.RequestError) -> Taken:
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            return Taken.GONE
        if isinstance(exc, requests.UnparsableRequest) and age < max(2.0, self.cfg.settle_s * 2):
            return Taken.RETRY_LATER  # maybe still being written
        self.reject(path, str(exc))
        return Taken.REJECTED

    def _seen_before(self, path: Path, job: Job) -> Taken:
        """The same content ran (or runs) as `job`: a duplicate, unless this very file
        was accepted before a crash but not yet (or not wholly) moved out of the inbox."""
        copy = self._request_copy(job.id, path)
        if job.request_name == requests.display_name(path) and (
            not copy.exists() or copy.samefile(path)
        ):
            move(path, copy)
            return Taken.ACCEPTED
        self.reject(
            path,
            f"the same request was already submitted as job {job.id} ({job.state}); "
            "to run it again add `force = true` or use `dropmesh submit --force`",
            duplicate=True,
        )
        return Taken.DUPLICATE

    def _create(self, path: Path, accepted: requests.Accepted, key: str) -> Taken:
        # The workspace first: if it cannot be made (disk full), no job is recorded and
        # the request stays in the inbox for the next look.
        job_id = new_job_id()
        ws = self.cfg.workspace(job_id)
        ws.mkdir(parents=True, exist_ok=True)
        spec = accepted.spec
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
            # Another daemon recorded the same file a moment before us.
            with contextlib.suppress(OSError):
                ws.rmdir()
            taken = self.ledger.find_by_key(key)
            if taken is not None:
                move(path, self._request_copy(taken.id, path))
            return Taken.ACCEPTED
        move(path, self._request_copy(job.id, path))
        log.info(
            "job %s queued: project %s, %d images, %s quality -> %s",
            job.id,
            spec.project,
            accepted.image_count,
            spec.quality,
            ", ".join(spec.formats),
        )
        self.joblog.write(
            job.id, f"queued from {requests.display_name(path)}: {accepted.image_count} images"
        )
        return Taken.ACCEPTED

    def _request_copy(self, job_id: str, path: Path) -> Path:
        """Where a job keeps its request file: request.toml or request.json."""
        return self.cfg.workspace(job_id) / f"request{path.suffix.lower()}"

    def reject(self, path: Path, message: str, duplicate: bool = False) -> None:
        """Move the request to inbox/rejected/ with the reason beside it, and record the
        rejection (a notification too, unless it is a duplicate)."""
        rejected = self.cfg.rejected
        rejected.mkdir(parents=True, exist_ok=True)
        dst = rejected / path.name
        if dst.exists():
            stamp = time.strftime("%Y%m%d-%H%M%S")
            dst = requests.free_path(rejected, f"{path.stem}.{stamp}", path.suffix)
        # The reason first, complete (temporary name, then rename), so that whoever finds
        # the request gone from the inbox (the dashboard, a script) also finds why.
        reason = rejected / f"{dst.name}.error.txt"
        tmp = rejected / f".{reason.name}.tmp"
        tmp.write_text(
            f"{requests.display_name(path)} was not accepted:\n{message}\n\n"
            "Fix the request and drop it into the inbox again.\n",
            encoding="utf-8",
        )
        os.replace(tmp, reason)
        if not move(path, dst):
            reason.unlink(missing_ok=True)
            return  # another daemon watching this inbox handled it
        self.ledger.reject(requests.display_name(path), message, notify=not duplicate)
        log.warning("rejected %s: %s", requests.display_name(path), message)


def move(src: Path, dst: Path) -> bool:
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
