"""Engine set-up and migrations.

SQLite: WAL, busy_timeout, BEGIN IMMEDIATE for writes. PostgreSQL: READ COMMITTED with
row locks (SELECT ... FOR UPDATE SKIP LOCKED for claims) and guarded updates.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.exc import DatabaseError, OperationalError, ProgrammingError

from daemon.ledgerfile import (
    BUSY_TIMEOUT_MS,
    SCHEMA_HEAD,
    LedgerError,
    check_local_fs,
    json_loads,
    missing,
    sqlite_file,
    unreadable,
    wrong_schema,
)

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Key of the PostgreSQL advisory lock held while migrating, so that several daemons
# starting at once migrate the shared ledger exactly once.
_MIGRATION_LOCK = 0x64726F706D657368  # "dropmesh"


def open_engine(url: str, *, create: bool = False) -> Engine:
    """An engine on the ledger at `url`, its schema checked. With create=True (the
    daemon) a missing ledger is created and an old one migrated; otherwise (the CLI)
    it must exist already, at the newest schema."""
    sqlite_path = sqlite_file(url)
    if sqlite_path is not None and not sqlite_path.exists():
        if not create:
            raise missing(sqlite_path)
        sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    if sqlite_path is not None:
        check_local_fs(sqlite_path)
    engine = make_engine(url)
    try:
        current = current_revision(engine)
        if current != SCHEMA_HEAD:
            if not create:
                raise wrong_schema(url, current)
            upgrade(engine)
    except DatabaseError as exc:
        raise unreadable(sqlite_path or url, exc.orig) from exc
    return engine


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            json_deserializer=json_loads,
            connect_args={
                "timeout": BUSY_TIMEOUT_MS / 1000,
                "isolation_level": None,
                "check_same_thread": False,
            },
        )
        _sqlite_events(engine)
        return engine
    if url.startswith("postgresql"):
        try:
            return create_engine(
                url,
                pool_pre_ping=True,
                isolation_level="READ COMMITTED",
                json_deserializer=json_loads,
            )
        except ModuleNotFoundError as exc:
            raise LedgerError(
                f"a PostgreSQL ledger needs the psycopg driver ({exc}): "
                "pip install 'dropmesh[postgres]'"
            ) from exc
    return create_engine(url, pool_pre_ping=True, json_deserializer=json_loads)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def _sqlite_events(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        mode = cur.execute("PRAGMA journal_mode=WAL").fetchone()
        if mode and str(mode[0]).lower() != "wal":
            raise LedgerError(f"the ledger cannot use WAL mode (got {mode[0]})")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    # SQLite only: PostgreSQL keeps its default BEGIN at READ COMMITTED.
    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Writers take the lock up front, so two writers queue on busy_timeout instead
        # of failing with "database is locked" when a read transaction upgrades.
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")


def alembic_config() -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
        try:
            row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
        except (OperationalError, ProgrammingError):
            return None
        return str(row[0]) if row else None


def upgrade(engine: Engine) -> None:
    """Migrate to the newest schema. On PostgreSQL under an advisory lock, so that of
    several daemons starting at once one migrates and the others find it done."""
    from alembic import command

    cfg = alembic_config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
            if _revision(conn) == SCHEMA_HEAD:
                return
        if _revision(conn) is None and inspect(conn).get_table_names():
            raise LedgerError(
                f"{engine.url.render_as_string(hide_password=True)} holds tables that are "
                "not a dropmesh ledger; refusing to write over them"
            )
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def _revision(conn: Any) -> str | None:
    if "alembic_version" not in inspect(conn).get_table_names():
        return None
    row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
    return str(row[0]) if row else None
