"""ORM classes of the ledger (SQLAlchemy 2.0), mapped onto the tables of daemon/schema.py.
Times are UNIX seconds (float)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import DeclarativeBase, Mapped

from daemon import schema


class Base(DeclarativeBase):
    metadata = schema.metadata


class Job(Base):
    __table__ = schema.jobs

    id: Mapped[str]
    project: Mapped[str]
    spec: Mapped[dict[str, Any]]
    request_hash: Mapped[str]
    request_name: Mapped[str]
    state: Mapped[str]
    priority: Mapped[int]
    attempts: Mapped[int]
    max_attempts: Mapped[int]
    next_attempt_at: Mapped[float | None]
    cancel_requested: Mapped[bool]
    worker: Mapped[str | None]
    heartbeat_at: Mapped[float | None]
    stage: Mapped[str | None]
    created_at: Mapped[float]
    started_at: Mapped[float | None]
    finished_at: Mapped[float | None]
    updated_at: Mapped[float]
    error: Mapped[str | None]
    lease_token: Mapped[int]  # the lease and its fencing token: see daemon/schema.py
    lease_expires_at: Mapped[float | None]
    request_key: Mapped[str | None]
    host: Mapped[str | None]


class Stage(Base):
    __table__ = schema.stages

    job_id: Mapped[str]
    name: Mapped[str]
    seq: Mapped[int]
    state: Mapped[str]
    progress: Mapped[float]
    message: Mapped[str]
    attempt: Mapped[int]
    pid: Mapped[int | None]
    started_at: Mapped[float | None]
    finished_at: Mapped[float | None]
    duration_s: Mapped[float | None]
    peak_rss_mb: Mapped[float | None]
    device: Mapped[str | None]
    metrics: Mapped[dict[str, Any]]


class ExportFile(Base):
    __table__ = schema.exports

    id: Mapped[int]
    job_id: Mapped[str]
    path: Mapped[str]
    format: Mapped[str]
    bytes: Mapped[int]
    sha256: Mapped[str]
    created_at: Mapped[float]
    notified_at: Mapped[float | None]


class Event(Base):
    """Append-only log: job lifecycle, rejected requests, warnings."""

    __table__ = schema.events

    id: Mapped[int]
    job_id: Mapped[str | None]
    at: Mapped[float]
    kind: Mapped[str]
    message: Mapped[str]
    data: Mapped[dict[str, Any]]


class Notification(Base):
    """Outbox: written in the same transaction as what it announces, sent afterwards."""

    __table__ = schema.notifications

    id: Mapped[int]
    job_id: Mapped[str | None]
    kind: Mapped[str]  # exported | failed | rejected
    title: Mapped[str]
    body: Mapped[str]
    created_at: Mapped[float]
    sent_at: Mapped[float | None]
    shown: Mapped[bool | None]


class LiveDaemon(Base):
    """A daemon sharing the ledger: registered at start, heartbeat while it runs, removed
    at a clean stop. Its table is named `workers`; its id is the `jobs.worker` of the jobs
    whose leases it holds."""

    __table__ = schema.daemons

    id: Mapped[str]  # host:pid:random
    host: Mapped[str]
    pid: Mapped[int]
    started_at: Mapped[float]
    heartbeat_at: Mapped[float]
    cuda_devices: Mapped[int]
    max_jobs: Mapped[int]
    gpu_stages: Mapped[str]
