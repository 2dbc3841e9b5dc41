"""What the CLI needs to know of the ledger without loading SQLAlchemy: its errors, where an
SQLite ledger's file is, the schema it must be at, how its JSON columns decode.

daemon/db.py (engines, migrations) and daemon/listing.py (`dropmesh status`, which on
SQLite reads through the standard library's sqlite3) both build on this.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson

BUSY_TIMEOUT_MS = 60_000
# The newest migration in daemon/migrations/versions (a test keeps the two in step).
# Known here so that the CLI can check the schema without loading Alembic.
SCHEMA_HEAD = "0002"
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


def missing(path: Path) -> LedgerError:
    return LedgerError(
        f"no ledger at {path}: start the daemon there first (`dropmesh run`), or pass --home"
    )


def wrong_schema(where: object, current: str | None) -> LedgerError:
    return LedgerError(
        f"the ledger at {where} is at schema {current}, this dropmesh needs "
        f"{SCHEMA_HEAD}: start the daemon once to migrate it"
    )


def unreadable(where: object, why: object) -> LedgerError:
    return LedgerError(
        f"the ledger at {where} cannot be read ({why}). "
        "It may be corrupt: stop the daemon, move the file aside, and restore it "
        "from a backup, or try `sqlite3 jobs.db .recover`; dropmesh will not "
        "start an empty ledger over it"
    )


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
