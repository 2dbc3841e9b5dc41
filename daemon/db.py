"""Engine set-up and migrations.

SQLite: WAL, busy_timeout, BEGIN IMMEDIATE for writes. PostgreSQL: READ COMMITTED with
row locks (SELECT ... FOR UPDATE SKIP LOCKED for claims) and guarded updates.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.exc import DatabaseError, OperationalError, ProgrammingError

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
BUSY_TIMEOUT_MS = 60_000
# The newest migration in daemon/migrations/versions (a test keeps the two in step).
# Known here so that the CLI can check the schema without loading Alembic.
SCHEMA_HEAD = "0002"
# Key of the PostgreSQL advisory lock held while migrating, so that several daemons
# starting at once migrate the shared ledger exactly once.
_MIGRATION_LOCK = 0x64726F706D657368  # "dropmesh"
# File systems on which SQLite's locking cannot be trusted.
NETWORK_FS = (
    "nfs",
    "nfs4",
    "cifs",
    "smb",
    "smb2",
    "smbfs",
    "smb3",
    "ncpfs",
    "afs",
    "9p",
    "ceph",
    "glusterfs",
    "lustre",
    "gpfs",
    "beegfs",
    "fuse.sshfs",
    "fuse.glusterfs",
    "fuse.cephfs",
    "fuse.s3fs",
    "fuse.rclone",
    "davfs",
    "fuse.davfs2",
)


class LedgerError(Exception):
    """The ledger cannot be used; the message says why and what to do."""


def open_engine(url: str, *, create: bool = False) -> Engine:
    """An engine on the ledger at `url`, its schema checked. With create=True (the
    daemon) a missing ledger is created and an old one migrated; otherwise (the CLI)
    it must exist already, at the newest schema."""
    sqlite_path = sqlite_file(url)
    if sqlite_path is not None and not sqlite_path.exists():
        if not create:
            raise LedgerError(
                f"no ledger at {sqlite_path}: start the daemon there first "
                "(`dropmesh run`), or pass --home"
            )
        sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    if sqlite_path is not None:
        check_local_fs(sqlite_path)
    engine = make_engine(url)
    try:
        current = current_revision(engine)
        if current != SCHEMA_HEAD:
            if not create:
                raise LedgerError(
                    f"the ledger at {url} is at schema {current}, this dropmesh needs "
                    f"{SCHEMA_HEAD}: start the daemon once to migrate it"
                )
            upgrade(engine)
    except DatabaseError as exc:
        raise LedgerError(
            f"the ledger at {sqlite_path or url} cannot be read ({exc.orig}). "
            "It may be corrupt: stop the daemon, move the file aside, and restore it "
            "from a backup, or try `sqlite3 jobs.db .recover`; dropmesh will not "
            "start an empty ledger over it"
        ) from exc
    return engine


def sqlite_file(url: str) -> Path | None:
    """The database file of an SQLite URL (None for other databases and :memory:)."""
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[1] if "///" in url else ""
    return Path(path) if path and path != ":memory:" else None


def json_loads(text: str | bytes) -> Any:
    """The JSON columns as read back: orjson (about 4 times faster than json, which
    counts when a listing decodes the metrics of 100,000 stages), and json for what
    orjson refuses (NaN and Infinity, which json writes)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


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


def fs_type(path: Path, mounts: str | None = None) -> str:
    """The file system type of the mount holding `path` (from /proc/mounts)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return ""
    path = path.resolve()
    best, kind = "", ""
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (path == Path(point) or Path(point) in path.parents) and len(point) >= len(best):
            best, kind = point, parts[2]
    return kind


def check_local_fs(path: Path, mounts: str | None = None) -> None:
    """Refuse an SQLite ledger on a network file system: its locks do not hold there."""
    kind = fs_type(path, mounts)
    if kind in NETWORK_FS or kind.startswith(("nfs", "fuse.sshfs")):
        raise LedgerError(
            f"the SQLite ledger {path} would lie on a network file system ({kind}); "
            "SQLite's locking is not safe there. Keep jobs.db on a local disk, or, to share "
            "the work between machines, use PostgreSQL: ledger_url = "
            "\"postgresql+psycopg://user:pass@host/dropmesh\" (pip install 'dropmesh[postgres]')"
        )


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
