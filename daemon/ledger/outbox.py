"""What the ledger records for people and for later: events, exports, notifications.

Events are an append-only log. Exports are the published files of a job. Notifications
are an outbox: written in the same transaction as what they announce (their wording comes
from daemon/notify.py), claimed and shown afterwards, so one survives a restart and is
never shown twice.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from daemon.ledger.store import Store
from daemon.models import Event, ExportFile, Job, Notification
from daemon.notify import NotificationText, rejected_text

# -- events -----------------------------------------------------------------------------


def event(
    job_id: str | None, kind: str, message: str, at: float, data: dict[str, Any] | None = None
) -> Event:
    return Event(job_id=job_id, at=at, kind=kind, message=message, data=data or {})


def add_event(
    store: Store,
    job_id: str | None,
    kind: str,
    message: str,
    data: dict[str, Any] | None = None,
) -> None:
    with store.write() as s:
        s.add(event(job_id, kind, message, time.time(), data))


def events(store: Store, job_id: str | None, after_id: int = 0, limit: int = 1000) -> list[Event]:
    with store.read() as s:
        q = select(Event).where(Event.id > after_id).order_by(Event.id).limit(limit)
        if job_id is not None:
            q = q.where(Event.job_id == job_id)
        rows = list(s.scalars(q).all())
        s.expunge_all()
        return rows


def reject(store: Store, request_name: str, message: str, notify: bool = True) -> None:
    """A request file that will not become a job: an event, and (unless `notify` is
    False) a notification."""
    now = time.time()
    with store.write() as s:
        s.add(event(None, "rejected", f"{request_name}: {message}", now))
        if notify:
            s.add(notification("rejected", rejected_text(request_name, message), now))


# -- exports ----------------------------------------------------------------------------


@dataclass
class ExportRecord:
    """A published export file. The export stage knows its size and sha256 already;
    when they are missing they are read from the file (see `measured`)."""

    path: Path
    format: str
    size: int | None = None
    sha256: str | None = None

    def measured(self) -> ExportRecord:
        """This record with size and sha256, read from the file when either is missing."""
        if self.size is not None and self.sha256 is not None:
            return self
        with open(self.path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            size = f.tell()
        return replace(self, size=size, sha256=digest)


def add_exports(s: Session, job_id: str, exports: Sequence[ExportRecord], now: float) -> None:
    """Record (or re-record, after a retry) measured exports; they count as not yet
    notified."""
    for e in exports:
        if e.size is None or e.sha256 is None:
            raise ValueError(f"export {e.path} is not measured (call ExportRecord.measured)")
        path = str(e.path)
        row = s.scalar(
            select(ExportFile).where(ExportFile.job_id == job_id, ExportFile.path == path)
        )
        if row is None:
            row = ExportFile(job_id=job_id, path=path, created_at=now)
            s.add(row)
        row.format = e.format
        row.bytes = e.size
        row.sha256 = e.sha256
        row.created_at = now
        row.notified_at = None


def exports(
    store: Store, project: str | None = None, job_ids: Sequence[str] | None = None
) -> list[tuple[ExportFile, str]]:
    """(export, project) pairs, newest first."""
    with store.read() as s:
        q = (
            select(ExportFile, Job.project)
            .join(Job, Job.id == ExportFile.job_id)
            .order_by(ExportFile.created_at.desc(), ExportFile.id)
        )
        if project:
            q = q.where(Job.project == project)
        if job_ids is not None:
            q = q.where(ExportFile.job_id.in_(list(job_ids)))
        rows = [(e, p) for e, p in s.execute(q).all()]
        s.expunge_all()
        return rows


# -- notifications ----------------------------------------------------------------------


def notification(
    kind: str, text: NotificationText, at: float, job_id: str | None = None
) -> Notification:
    """An outbox row; `kind` is exported, failed or rejected."""
    return Notification(job_id=job_id, kind=kind, title=text.title, body=text.body, created_at=at)


def pending_notifications(store: Store, limit: int = 50) -> list[Notification]:
    with store.read() as s:
        rows = list(
            s.scalars(
                select(Notification)
                .where(Notification.sent_at.is_(None))
                .order_by(Notification.id)
                .limit(limit)
            ).all()
        )
        s.expunge_all()
        return rows


def deliver_notifications(
    store: Store, send: Callable[[Notification], bool], limit: int = 50
) -> int:
    """Claim pending notifications (mark them sent), then show them and record whether
    they were shown. Claimed first, so a crash while one is being shown never shows it
    twice; on a shared ledger claims take FOR UPDATE SKIP LOCKED, so of several daemons
    exactly one shows each."""
    now = time.time()
    with store.write() as s:
        q = (
            select(Notification)
            .where(Notification.sent_at.is_(None))
            .order_by(Notification.id)
            .limit(limit)
        )
        if store.shared:
            q = q.with_for_update(skip_locked=True)
        claimed = list(s.scalars(q).all())
        for n in claimed:
            _mark_sent(s, n, None, now)
        s.flush()
        s.expunge_all()
    for n in claimed:
        record_shown(store, n.id, bool(send(n)))
    return len(claimed)


def mark_notified(store: Store, notification_id: int, shown: bool | None) -> bool:
    """Mark a notification sent; False if it already was."""
    now = time.time()
    with store.write() as s:
        n = s.get(Notification, notification_id)
        if n is None or n.sent_at is not None:
            return False
        _mark_sent(s, n, shown, now)
        return True


def record_shown(store: Store, notification_id: int, shown: bool) -> None:
    with store.write() as s:
        s.execute(
            update(Notification).where(Notification.id == notification_id).values(shown=shown)
        )


def _mark_sent(s: Session, n: Notification, shown: bool | None, now: float) -> None:
    """Sent; for an `exported` notification its job's exports count as notified."""
    n.sent_at = now
    n.shown = shown
    if n.kind == "exported" and n.job_id:
        s.execute(
            update(ExportFile)
            .where(ExportFile.job_id == n.job_id, ExportFile.notified_at.is_(None))
            .values(notified_at=now)
        )
