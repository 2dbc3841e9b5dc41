"""Read-only listings of the ledger through SQLAlchemy Core, without the ORM.

`dropmesh status` runs often (by hand, `--watch`, scripts polling it) and reads only
these, so it loads neither the ORM nor the mapped classes. The Ledger, which writes
through the ORM, inherits them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, select

from daemon import db
from daemon.schema import exports, jobs, stages

# what daemon.progress.job_progress reads of a stage row
BRIEF_STAGE_COLUMNS = ("job_id", "name", "state", "progress")


class Listing:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, url: str) -> Listing:
        """The listings of an existing ledger, at the newest schema."""
        return cls(db.open_engine(url))

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def read_rows(self) -> Iterator[Connection]:
        """A read transaction (SQLite: BEGIN DEFERRED, never waiting on a writer)."""
        conn = self.engine.connect().execution_options(sqlite_begin="DEFERRED")
        with conn, conn.begin():
            yield conn

    def list_jobs(self, states: Sequence[str] | None = None, limit: int | None = None) -> list[Any]:
        """Job rows (read-only, attribute access like Job), newest first."""
        q = select(*jobs.c).order_by(jobs.c.created_at.desc())
        if states:
            q = q.where(jobs.c.state.in_(list(states)))
        if limit:
            q = q.limit(limit)
        with self.read_rows() as conn:
            return list(conn.execute(q).all())

    def stages_for(
        self, job_ids: Sequence[str], *, every: bool = False, brief: bool = False
    ) -> dict[str, list[Any]]:
        """Stage rows (read-only, attribute access like Stage) per job; with every=True
        all jobs' stages in one scan, for listings of the whole ledger. brief=True reads
        only what a job's progress needs (BRIEF_STAGE_COLUMNS), not the metrics: decoding
        those is most of the cost of listing a big ledger."""
        out: dict[str, list[Any]] = {j: [] for j in job_ids}
        if not job_ids:
            return out
        columns = [stages.c[c] for c in BRIEF_STAGE_COLUMNS] if brief else list(stages.c)
        q = select(*columns).order_by(stages.c.job_id, stages.c.seq)
        if not every:
            q = q.where(stages.c.job_id.in_(list(job_ids)))
        with self.read_rows() as conn:
            for row in conn.execute(q):
                if row.job_id in out:
                    out[row.job_id].append(row)
        return out

    def export_paths(self, job_ids: Sequence[str], *, every: bool = False) -> dict[str, list[str]]:
        """Published export paths per job, newest first; with every=True all jobs'
        exports in one scan."""
        out: dict[str, list[str]] = {j: [] for j in job_ids}
        if not job_ids:
            return out
        q = select(exports.c.job_id, exports.c.path).order_by(
            exports.c.created_at.desc(), exports.c.id
        )
        if not every:
            q = q.where(exports.c.job_id.in_(list(job_ids)))
        with self.read_rows() as conn:
            for job_id, path in conn.execute(q):
                if job_id in out:
                    out[job_id].append(path)
        return out
