"""The daemons sharing the ledger: one row each in the table `workers` (the name the
schema has always used), keyed by DaemonId ("host:pid:random").

A daemon registers at start, beats while it runs and unregisters at a clean stop; one
killed without a clean stop falls silent and is pruned later. Daemons without a GPU read
this table to know whether to leave GPU stages to a daemon that has one.
"""

from __future__ import annotations

import time

from sqlalchemy import delete, func, select, update

from daemon.ledger.store import DaemonId, Store
from daemon.models import LiveDaemon


def register(
    store: Store, daemon_id: DaemonId, *, cuda_devices: int, max_jobs: int, gpu_stages: str
) -> None:
    host, pid = daemon_id.split(":")[:2]
    now = time.time()
    with store.write() as s:
        row = s.get(LiveDaemon, daemon_id)
        if row is None:
            row = LiveDaemon(id=daemon_id, host=host, pid=int(pid), started_at=now)
            s.add(row)
        row.heartbeat_at = now
        row.cuda_devices = cuda_devices
        row.max_jobs = max_jobs
        row.gpu_stages = gpu_stages


def heartbeat(store: Store, daemon_id: DaemonId) -> bool:
    """False when the daemon's row is gone (removed as dead): register again."""
    with store.write() as s:
        res = s.execute(
            update(LiveDaemon).where(LiveDaemon.id == daemon_id).values(heartbeat_at=time.time())
        )
        return bool(res.rowcount == 1)  # type: ignore[attr-defined]


def unregister(store: Store, daemon_id: DaemonId) -> None:
    with store.write() as s:
        s.execute(delete(LiveDaemon).where(LiveDaemon.id == daemon_id))


def listed(store: Store) -> list[LiveDaemon]:
    """Every registered daemon, by host and start."""
    with store.read() as s:
        rows = list(
            s.scalars(select(LiveDaemon).order_by(LiveDaemon.host, LiveDaemon.started_at)).all()
        )
        s.expunge_all()
        return rows


def gpu_alive(store: Store, stale_after_s: float, *, now: float | None = None) -> bool:
    """Whether a live daemon with a CUDA device shares this ledger."""
    now = time.time() if now is None else now
    with store.read() as s:
        n = s.scalar(
            select(func.count())
            .select_from(LiveDaemon)
            .where(LiveDaemon.cuda_devices > 0, LiveDaemon.heartbeat_at >= now - stale_after_s)
        )
        return bool(n)


def prune(store: Store, older_than_s: float) -> int:
    """Forget daemons silent for that long (killed without a clean stop)."""
    with store.write() as s:
        res = s.execute(
            delete(LiveDaemon).where(LiveDaemon.heartbeat_at < time.time() - older_than_s)
        )
        return int(res.rowcount or 0)  # type: ignore[attr-defined]
