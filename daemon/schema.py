"""Ledger tables as SQLAlchemy Core tables. Times are UNIX seconds (float).

The ORM classes in daemon/models.py are mapped onto these tables, and the dashboard's
reads (daemon/web/data.py) query them through Core; the listings of `dropmesh status`
(daemon/listing.py) are plain SQL on the same tables.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(16), primary_key=True),
    Column("project", String(64), nullable=False, index=True),
    Column("spec", JSON, nullable=False),
    Column("request_hash", String(64), nullable=False, index=True),
    Column("request_name", String(255), nullable=False),
    Column("state", String(16), nullable=False, index=True),
    Column("priority", Integer, nullable=False, default=0),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False, default=3),
    Column("next_attempt_at", Float, nullable=True),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("worker", String(128), nullable=True),
    Column("heartbeat_at", Float, nullable=True),
    Column("stage", String(32), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("updated_at", Float, nullable=False),
    Column("error", Text, nullable=True),
    # The lease of the daemon running the job: `worker` owns it until lease_expires_at
    # (pushed on by every heartbeat). lease_token grows by one with every claim; each write
    # a daemon makes about a running job is guarded by it, so a daemon whose lease was
    # taken over cannot write any more (fencing).
    Column("lease_token", Integer, nullable=False, default=0, server_default="0"),
    Column("lease_expires_at", Float, nullable=True),
    # Intake identity of the request file (content hash, name, mtime, size): one request
    # file becomes one job however many daemons watch the inbox.
    Column("request_key", String(64), nullable=True),
    # The host of the daemon that last ran the job (kept after it finishes).
    Column("host", String(128), nullable=True),
    UniqueConstraint("request_key", name="uq_jobs_request_key"),
)

Index("ix_jobs_runnable", jobs.c.state, jobs.c.priority, jobs.c.created_at)

stages = Table(
    "stages",
    metadata,
    Column("job_id", String(16), ForeignKey("jobs.id"), primary_key=True),
    Column("name", String(32), primary_key=True),
    Column("seq", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("progress", Float, nullable=False, default=0.0),
    Column("message", Text, nullable=False, default=""),
    Column("attempt", Integer, nullable=False, default=0),
    Column("pid", Integer, nullable=True),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("duration_s", Float, nullable=True),
    Column("peak_rss_mb", Float, nullable=True),
    Column("device", String(16), nullable=True),
    Column("metrics", JSON, nullable=False, default=dict),
)

exports = Table(
    "exports",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(16), ForeignKey("jobs.id"), nullable=False, index=True),
    Column("path", Text, nullable=False),
    Column("format", String(16), nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("notified_at", Float, nullable=True),
    UniqueConstraint("job_id", "path"),
)

# Append-only log: job lifecycle, rejected requests, warnings.
events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(16), nullable=True, index=True),
    Column("at", Float, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("message", Text, nullable=False),
    Column("data", JSON, nullable=False, default=dict),
)

# Outbox: written in the same transaction as what it announces, sent afterwards.
notifications = Table(
    "notifications",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(16), nullable=True, index=True),
    Column("kind", String(16), nullable=False),  # exported | failed | rejected
    Column("title", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("sent_at", Float, nullable=True, index=True),
    Column("shown", Boolean, nullable=True),
)

# The daemons sharing the ledger: registered at start, heartbeat while they run, removed
# at a clean stop. The table keeps the name `workers` of the first schema; `jobs.worker`
# holds the id of the daemon that owns a job's lease.
daemons = Table(
    "workers",
    metadata,
    Column("id", String(128), primary_key=True),  # host:pid:random
    Column("host", String(128), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False, index=True),
    Column("cuda_devices", Integer, nullable=False, default=0),
    Column("max_jobs", Integer, nullable=False, default=1),
    Column("gpu_stages", String(16), nullable=False, default="prefer"),
)
