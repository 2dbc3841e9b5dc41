"""Read-only listings of the ledger as plain SQL, without the ORM.

`dropmesh status` runs often (by hand, `--watch`, scripts polling it) and reads only
these. On an SQLite ledger it reads through the standard library's sqlite3 and never loads
SQLAlchemy, whose import alone takes longer than listing 10,000 jobs. On other databases,
and in the Ledger (which inherits these), the same SQL runs on the engine's DB-API
connection. Rows are named tuples (attribute access like Job and Stage), with the JSON
columns decoded.
"""

from __future__ import annotations

import sqlite3
from collections import namedtuple
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon import ledgerfile

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine

# what the jobs listings (daemon.cli.render.job_row and job_json, daemon.progress) read of
# a job row, and what daemon.progress.job_progress reads of a stage row
BRIEF_JOB_COLUMNS = (
    "id", "project", "state", "stage", "attempts", "max_attempts", "priority", "error",
    "cancel_requested", "worker", "host",
    "created_at", "started_at", "finished_at", "next_attempt_at",
)  # fmt: skip
BRIEF_STAGE_COLUMNS = ("job_id", "name", "state", "progress")
JSON_COLUMNS = frozenset({"spec", "metrics", "data"})
BOOL_COLUMNS = frozenset({"cancel_requested", "shown"})  # SQLite keeps 0 / 1


def _decode(name: str) -> Any:
    """How a column's value reads back as the ORM would give it (None: as it is)."""
    if name in JSON_COLUMNS:
        return lambda v: ledgerfile.json_loads(v) if isinstance(v, str | bytes) else v
    if name in BOOL_COLUMNS:
        return lambda v: v if v is None else bool(v)
    return None


@cache
def _row_type(names: tuple[str, ...]) -> Any:
    return namedtuple("Row", names)  # noqa: PYI024


def _in(column: str, values: Sequence[str]) -> tuple[str, list[str]]:
    return f"{column} IN ({', '.join('?' * len(values))})", list(values)


class Listing:
    def __init__(self, engine: Engine | None = None, *, sqlite_path: Path | None = None) -> None:
        self.engine = engine
        self._sqlite_path = sqlite_path
        self._sqlite: sqlite3.Connection | None = None

    @classmethod
    def open(cls, url: str) -> Listing:
        """The listings of an existing ledger, at the newest schema."""
        path = ledgerfile.sqlite_file(url)
        if path is None:
            from daemon import db

            return cls(db.open_engine(url))
        listing = cls(sqlite_path=path)
        listing._open_sqlite()
        return listing

    def _open_sqlite(self) -> sqlite3.Connection:
        """The SQLite file, checked as db.open_engine checks it: there, on a local disk,
        a database, at the newest schema."""
        if self._sqlite is not None:
            return self._sqlite
        path = self._sqlite_path
        assert path is not None
        if not path.exists():
            raise ledgerfile.missing(path)
        ledgerfile.check_local_fs(path)
        conn = sqlite3.connect(
            path,
            timeout=ledgerfile.BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            try:
                row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            except sqlite3.OperationalError:  # no such table: not a dropmesh ledger (yet)
                row = None
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise ledgerfile.unreadable(path, exc) from exc
        current = str(row[0]) if row else None
        if current != ledgerfile.SCHEMA_HEAD:
            conn.close()
            raise ledgerfile.wrong_schema(f"sqlite:///{path}", current)
        self._sqlite = conn
        return conn

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
            self._sqlite = None
        if self.engine is not None:
            self.engine.dispose()

    @contextmanager
    def read_rows(self) -> Iterator[Connection]:
        """A read transaction on the engine (SQLite: BEGIN DEFERRED, never waiting on a
        writer), for SQLAlchemy Core queries."""
        assert self.engine is not None, "an engine-backed listing"
        conn = self.engine.connect().execution_options(sqlite_begin="DEFERRED")
        with conn, conn.begin():
            yield conn

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of one SELECT (one statement: one consistent snapshot), `?` placeholders."""
        rows: Sequence[Any]
        if self.engine is None:
            cur = self._open_sqlite().execute(sql, params)
            names, rows = tuple(d[0] for d in cur.description), cur.fetchall()
        else:
            raw = self.engine.raw_connection()
            try:
                dbapi = raw.cursor()
                if self.engine.dialect.paramstyle != "qmark":
                    sql = sql.replace("?", "%s")
                dbapi.execute(sql, tuple(params))
                names, rows = tuple(d[0] for d in dbapi.description), dbapi.fetchall()
                raw.rollback()
            finally:
                raw.close()
        row_type = _row_type(names)
        decode = [(i, fn) for i, fn in enumerate(map(_decode, names)) if fn is not None]
        if not decode:
            return [row_type._make(r) for r in rows]
        out = []
        for r in rows:
            values = list(r)
            for i, fn in decode:
                values[i] = fn(values[i])
            out.append(row_type._make(values))
        return out

    def list_jobs(
        self, states: Sequence[str] | None = None, limit: int | None = None, brief: bool = False
    ) -> list[Any]:
        """Job rows (read-only, attribute access like Job), newest first; brief=True reads
        only what the jobs listing shows (BRIEF_JOB_COLUMNS: not the spec, whose decoding
        is a fifth of the cost of listing 10,000 jobs)."""
        columns = ", ".join(BRIEF_JOB_COLUMNS) if brief else "*"
        sql, params = f"SELECT {columns} FROM jobs", list[str]()
        if states:
            where, params = _in("state", states)
            sql += f" WHERE {where}"
        sql += " ORDER BY created_at DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return self._query(sql, params)

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
        columns = ", ".join(BRIEF_STAGE_COLUMNS) if brief else "*"
        sql, params = f"SELECT {columns} FROM stages", list[str]()
        if not every:
            where, params = _in("job_id", job_ids)
            sql += f" WHERE {where}"
        for row in self._query(sql + " ORDER BY job_id, seq", params):
            group = out.get(row.job_id)
            if group is not None:
                group.append(row)
        return out

    def export_paths(self, job_ids: Sequence[str], *, every: bool = False) -> dict[str, list[str]]:
        """Published export paths per job, newest first; with every=True all jobs'
        exports in one scan."""
        out: dict[str, list[str]] = {j: [] for j in job_ids}
        if not job_ids:
            return out
        sql, params = "SELECT job_id, path FROM exports", list[str]()
        if not every:
            where, params = _in("job_id", job_ids)
            sql += f" WHERE {where}"
        for job_id, path in self._query(sql + " ORDER BY created_at DESC, id", params):
            if job_id in out:
                out[job_id].append(path)
        return out
