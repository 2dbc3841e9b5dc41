"""Inbox watching: a watchdog observer (inotify, or polling where inotify cannot work),
a scan at start-up and a periodic rescan, and a settle check so that no request is
read half-written."""

from __future__ import annotations

import logging
import os
import queue
import time
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from daemon.requests import is_request_file

log = logging.getLogger("dropmesh.watcher")


@dataclass
class Seen:
    size: int
    mtime_ns: int
    checked_at: float
    complete: bool  # closed after write, or renamed in


class _Handler(FileSystemEventHandler):
    def __init__(self, inbox: Path, out: queue.Queue[tuple[Path, bool]]) -> None:
        self.inbox = inbox
        self.out = out

    def _push(self, path: str | bytes, complete: bool) -> None:
        p = Path(os.fsdecode(path))
        if p.parent == self.inbox and is_request_file(p):
            self.out.put((p, complete))

    def on_closed(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._push(event.src_path, True)

    def on_moved(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._push(event.dest_path, True)

    def on_created(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._push(event.src_path, False)

    def on_modified(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._push(event.src_path, False)


class InboxWatcher:
    """Collects candidate request files; `ready()` hands out the ones safe to read."""

    def __init__(self, inbox: Path, *, use_polling: bool = False, settle_s: float = 1.0) -> None:
        self.inbox = inbox
        self.settle_s = settle_s
        self.events: queue.Queue[tuple[Path, bool]] = queue.Queue()
        self.pending: dict[Path, Seen] = {}
        self.observer: BaseObserver | None = None
        self.mode = "polling" if use_polling else "inotify"
        self._use_polling = use_polling

    def start(self) -> None:
        handler = _Handler(self.inbox, self.events)
        if not self._use_polling:
            try:
                obs: BaseObserver = Observer()
                obs.schedule(handler, str(self.inbox), recursive=False)
                obs.start()
                self.observer = obs
                self.mode = "inotify" if "Inotify" in type(obs).__name__ else type(obs).__name__
                return
            except OSError as exc:
                log.warning(
                    "cannot watch %s with inotify (%s); falling back to polling",
                    self.inbox,
                    exc,
                )
        obs = PollingObserver(timeout=1.0)
        obs.schedule(handler, str(self.inbox), recursive=False)
        obs.start()
        self.observer = obs
        self.mode = "polling"

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=5)
            self.observer = None

    def scan(self) -> int:
        """Queue every request file in the inbox (start-up scan and periodic rescan)."""
        n = 0
        try:
            entries = list(os.scandir(self.inbox))
        except OSError as exc:
            log.error("cannot list the inbox %s: %s", self.inbox, exc)
            return 0
        for entry in entries:
            p = Path(entry.path)
            is_file = entry.is_file(follow_symlinks=False) or entry.is_symlink()
            if is_file and is_request_file(p):
                self.events.put((p, False))
                n += 1
        return n

    def forget(self, path: Path) -> None:
        self.pending.pop(path, None)

    def ready(self, wait_s: float = 0.0) -> list[Path]:
        """Paths whose content is complete: closed after write / renamed in, or
        unchanged for settle_s. Waits up to wait_s for the first event."""
        first = True
        while True:
            try:
                if first and wait_s > 0:
                    path, complete = self.events.get(timeout=wait_s)
                else:
                    path, complete = self.events.get_nowait()
            except queue.Empty:
                break
            first = False
            now = time.time()
            try:
                st = path.stat()
            except OSError:
                self.pending.pop(path, None)
                continue
            old = self.pending.get(path)
            if old is not None and (old.size, old.mtime_ns) == (st.st_size, st.st_mtime_ns):
                old.complete = old.complete or complete
            else:
                self.pending[path] = Seen(st.st_size, st.st_mtime_ns, now, complete)
        now = time.time()
        out: list[Path] = []
        for path, seen in list(self.pending.items()):
            try:
                st = path.stat()
            except OSError:
                del self.pending[path]
                continue
            if (st.st_size, st.st_mtime_ns) != (seen.size, seen.mtime_ns):
                self.pending[path] = Seen(st.st_size, st.st_mtime_ns, now, False)
                continue
            age = now - st.st_mtime_ns / 1e9
            if seen.complete or (now - seen.checked_at >= self.settle_s and age >= self.settle_s):
                out.append(path)
        return out
