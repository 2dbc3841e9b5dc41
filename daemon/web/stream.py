"""Live updates for the browser, read from the ledger (never from the daemon).

One poller per server reads the ledger every POLL_S: the jobs that are active or changed
since its last look, and the events written since. Whatever changed goes to every
connected jobs page at once (one read, any number of clients). Each job page has its own
small poller that also follows the job's log file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio

from daemon.web.data import Reader

POLL_S = 0.5
PING_S = 15.0
LOG_TAIL_BYTES = 32768
LOG_CHUNK_BYTES = 65536


def sse(event: str, data: Any, event_id: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"event": event, "data": json.dumps(data)}
    if event_id is not None:
        out["id"] = str(event_id)
    return out


class Broadcaster:
    def __init__(self, reader: Reader, poll_s: float = POLL_S) -> None:
        self.reader = reader
        self.poll_s = poll_s
        self.clients: set[asyncio.Queue[dict[str, Any]]] = set()
        self._task: asyncio.Task[None] | None = None
        self._seen: dict[str, dict[str, Any]] = {}
        self._last_event = 0
        self.ticks = 0

    async def subscribe(self, after: int | None) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=100)
        if self._task is None or self._task.done():
            self._last_event = await anyio.to_thread.run_sync(self.reader.last_event_id)
            self._seen = {}
            self._task = asyncio.create_task(self._run())
        self.clients.add(queue)
        if after is not None and after < self._last_event:
            # Reconnected (Last-Event-ID): replay what it missed, within reason.
            missed = await anyio.to_thread.run_sync(
                lambda: self.reader.events(after=after, limit=200)
            )
            if missed:
                queue.put_nowait(sse("events", missed, missed[-1]["id"]))
        queue.put_nowait(sse("hello", {"last_event": self._last_event}, self._last_event))
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self.clients.discard(queue)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def _tick(self, since: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        changed = self.reader.changed_jobs(since)
        new_events = self.reader.events(after=self._last_event, limit=500)
        return changed, new_events

    async def _run(self) -> None:
        since = time.time() - 1.0
        while self.clients:
            started = time.time()
            try:
                changed, new_events = await anyio.to_thread.run_sync(self._tick, since)
            except Exception as exc:  # ledger unreachable for a moment: say so, go on
                self._broadcast(sse("error", {"detail": f"ledger: {exc}"}))
                await asyncio.sleep(self.poll_s * 4)
                continue
            since = started - self.poll_s  # overlap: a write may land mid-read
            updates = []
            for j in changed:
                key = json.dumps({k: v for k, v in j.items() if k not in ("elapsed_s", "eta_s")})
                if self._seen.get(j["id"], {}).get("key") != key:
                    updates.append(j)
                self._seen[j["id"]] = {"key": key}
            if len(self._seen) > 5000:
                self._seen = {j["id"]: self._seen[j["id"]] for j in changed}
            if new_events:
                self._last_event = new_events[-1]["id"]
                self._broadcast(sse("events", new_events, self._last_event))
            if updates:
                self._broadcast(sse("jobs", updates))
            self.ticks += 1
            await asyncio.sleep(self.poll_s)
        self._task = None

    def _broadcast(self, message: dict[str, Any]) -> None:
        for q in list(self.clients):
            try:
                q.put_nowait(message)
            except asyncio.QueueFull:
                # A client that stopped reading: it gets a "reload" and reconnects.
                with contextlib.suppress(asyncio.QueueEmpty):
                    while True:
                        q.get_nowait()
                q.put_nowait(sse("reload", {}))

    async def stream(
        self, queue: asyncio.Queue[dict[str, Any]], is_disconnected: Any
    ) -> AsyncIterator[dict[str, Any]]:
        try:
            while True:
                try:
                    yield await asyncio.wait_for(queue.get(), timeout=1.0)
                except TimeoutError:
                    if await is_disconnected():
                        return
        finally:
            self.unsubscribe(queue)


async def job_stream(
    reader: Reader, job_id: str, log_path: Path, is_disconnected: Any, poll_s: float = POLL_S
) -> AsyncIterator[dict[str, Any]]:
    """One job: its summary when it changes, its events and its log as it grows."""
    last_key = ""
    last_event = 0
    pos: int | None = None
    last_exports = ""
    while True:
        job, evs, ex = await anyio.to_thread.run_sync(_job_snapshot, reader, job_id, last_event)
        if job is None:
            yield sse("gone", {"id": job_id})
            return
        key = json.dumps({k: v for k, v in job.items() if k not in ("elapsed_s", "eta_s")})
        if key != last_key:
            last_key = key
            yield sse("job", job)
        if evs:
            last_event = evs[-1]["id"]
            yield sse("events", evs)
        ex_key = json.dumps(ex)
        if ex_key != last_exports:
            last_exports = ex_key
            yield sse("exports", ex)
        text, pos = await anyio.to_thread.run_sync(_read_log, log_path, pos)
        if text:
            yield sse("log", {"text": text})
        for _ in range(int(max(1, poll_s / 0.1))):
            if await is_disconnected():
                return
            await asyncio.sleep(0.1)


def _job_snapshot(
    reader: Reader, job_id: str, after: int
) -> tuple[dict[str, Any] | None, list[dict[str, Any]], list[dict[str, Any]]]:
    return (
        reader.job(job_id),
        reader.events(job_id=job_id, after=after),
        reader.exports(job_id=job_id),
    )


def _read_log(path: Path, pos: int | None) -> tuple[str, int | None]:
    """New text of the log since `pos` (None: its last LOG_TAIL_BYTES)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if pos is None:
                pos = max(0, size - LOG_TAIL_BYTES)
            if size < pos:  # truncated or replaced
                pos = 0
            f.seek(pos)
            data = f.read(LOG_CHUNK_BYTES)
            return data.decode("utf-8", "replace"), pos + len(data)
    except OSError:
        return "", pos
