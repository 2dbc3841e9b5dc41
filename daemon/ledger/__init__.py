"""The ledger: every read and write of job state goes through `Ledger`.

`Ledger` is a facade over a Store (one engine and its transactions, daemon/ledger/store.py).
The work is done by plain functions in five modules, each taking the store first:

- `jobs`: create jobs from requests, find them, cancel and retry them;
- `leases`: guarded transitions, claims, heartbeats, recovery and the other ends of a
  lease (release, retry later, fail), with fencing tokens;
- `stages`: the stage records (started, progress, finished, failed);
- `daemons`: the daemons sharing the ledger (table `workers`);
- `outbox`: events, exports and notifications (their wording lives in daemon/notify.py).

The facade binds them as methods under the names its callers use, so the table below is
the whole interface. The read-only listings (`list_jobs`, `stages_for`, `export_paths`)
come from daemon/listing.py, which `dropmesh status` uses without the ORM.
"""

from __future__ import annotations

from daemon import db
from daemon.ledger import daemons, jobs, leases, outbox
from daemon.ledger import stages as stage_records
from daemon.ledger.jobs import new_job_id, request_key
from daemon.ledger.outbox import ExportRecord
from daemon.ledger.store import DaemonId, Fenced, NotFound, RequestTaken, Store


class Ledger(Store):
    @classmethod
    def open(cls, url: str, *, create: bool = False) -> Ledger:
        """Open the ledger. With create=True (the daemon) a new one is created and
        migrated; otherwise (the CLI) it must exist already."""
        return cls(db.open_engine(url, create=create))

    # jobs
    create_job = jobs.create
    find_by_hash = jobs.find_by_hash
    find_by_key = jobs.find_by_key
    get = jobs.get
    resolve = jobs.resolve
    count_by_state = jobs.count_by_state
    request_cancel = jobs.request_cancel
    cancel_requested = jobs.cancel_requested
    retry = jobs.retry

    # leases
    transition = leases.transition
    claim_next = leases.claim_next
    heartbeat = leases.heartbeat
    running_workers = leases.running_workers
    recover = leases.recover
    release = leases.release
    schedule_retry = leases.schedule_retry
    fail = leases.fail

    # stages
    stages = stage_records.of_job
    running_stage_pids = stage_records.running_pids
    stage_started = stage_records.started
    stage_progress = stage_records.progress
    stage_finished = stage_records.finished
    stage_failed = stage_records.failed

    # the daemons sharing the ledger
    register_worker = daemons.register
    worker_heartbeat = daemons.heartbeat
    unregister_worker = daemons.unregister
    workers = daemons.listed
    gpu_worker_alive = daemons.gpu_alive
    prune_workers = daemons.prune

    # events, exports, notifications
    add_event = outbox.add_event
    events = outbox.events
    reject = outbox.reject
    exports = outbox.exports
    pending_notifications = outbox.pending_notifications
    deliver_notifications = outbox.deliver_notifications
    mark_notified = outbox.mark_notified


__all__ = [
    "DaemonId",
    "ExportRecord",
    "Fenced",
    "Ledger",
    "NotFound",
    "RequestTaken",
    "new_job_id",
    "request_key",
]
