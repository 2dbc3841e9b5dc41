"""The store every ledger module works through: one engine, its read and write
transactions, and the errors the modules raise.

The modules (`jobs`, `leases`, `stages`, `daemons`, `outbox`) are plain functions whose
first argument is a Store; the `Ledger` facade is a Store that binds them as methods.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from daemon import db
from daemon.listing import Listing

# The id of one daemon process sharing the ledger: "host:pid:random". It owns the leases
# of the jobs it runs (column `jobs.worker`) and has one row in the table of daemons
# (table `workers`, see daemon/ledger/daemons.py).
DaemonId = str


class NotFound(Exception):
    pass


class Fenced(Exception):
    """A write about a running job came from a daemon that no longer holds its lease."""


class RequestTaken(Exception):
    """Another daemon already turned this request file into a job."""


class Store(Listing):
    """The engine and its transactions; the read-only listings come with it."""

    engine: Engine  # always one here (the CLI's Listing on SQLite has none)

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        # Several daemons may use this ledger at once (a server database, not a file).
        self.shared = not db.is_sqlite(engine)

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction (SQLite: BEGIN IMMEDIATE), committed on leaving."""
        with Session(self.engine) as s, s.begin():
            yield s

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read transaction (SQLite: BEGIN DEFERRED, never waiting on a writer)."""
        conn = self.engine.connect().execution_options(sqlite_begin="DEFERRED")
        try:
            with Session(bind=conn) as s, s.begin():
                yield s
        finally:
            conn.close()
