"""Several daemons: network file systems, shared_root, gpu_stages."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon import ledgerfile
from daemon.config import ConfigError, load
from daemon.ledger import request_key

MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
server:/export/scans /mnt/scans nfs4 rw,relatime 0 0
//nas/share /mnt/nas cifs rw 0 0
me@host:/data /mnt/my\\040data fuse.sshfs rw 0 0
tmpfs /mnt/scans/local tmpfs rw 0 0
"""


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/home/me/jobs.db", "ext4"),
        ("/mnt/scans/jobs.db", "nfs4"),
        ("/mnt/scans/local/jobs.db", "tmpfs"),
        ("/mnt/nas/x/jobs.db", "cifs"),
        ("/mnt/my data/jobs.db", "fuse.sshfs"),
    ],
)
def test_fs_type_from_mounts(path: str, kind: str) -> None:
    assert ledgerfile.fs_type(Path(path), MOUNTS) == kind


@pytest.mark.parametrize("path", ["/mnt/scans/jobs.db", "/mnt/nas/jobs.db", "/mnt/my data/j.db"])
def test_sqlite_ledger_refused_on_network_fs(path: str) -> None:
    with pytest.raises(ledgerfile.LedgerError, match="network file system.*PostgreSQL"):
        ledgerfile.check_local_fs(Path(path), MOUNTS)


def test_sqlite_ledger_allowed_on_local_disk(tmp_path: Path) -> None:
    ledgerfile.check_local_fs(tmp_path / "jobs.db", MOUNTS)
    ledgerfile.check_local_fs(tmp_path / "jobs.db")  # this machine's own /proc/mounts


def test_shared_root_holds_inbox_workspaces_results(tmp_path: Path) -> None:
    cfg = load(tmp_path / "home", env={"DROPMESH_SHARED_ROOT": str(tmp_path / "shared")})
    assert cfg.inbox == tmp_path / "shared" / "inbox"
    assert cfg.workspaces == tmp_path / "shared" / "workspaces"
    assert cfg.results == tmp_path / "shared" / "results"
    assert cfg.db_path == tmp_path / "home" / "jobs.db"


def test_gpu_stages_and_ledger_url_are_checked(tmp_path: Path) -> None:
    assert load(tmp_path, env={}).gpu_stages == "prefer"
    with pytest.raises(ConfigError, match="gpu_stages"):
        load(tmp_path, env={"DROPMESH_GPU_STAGES": "always"})
    with pytest.raises(ConfigError, match="ledger_url"):
        load(tmp_path, env={"DROPMESH_LEDGER_URL": "mysql://x/y"})


def test_request_key_is_the_file_as_dropped() -> None:
    a = request_key("h", "a.toml", 1, 10)
    assert a == request_key("h", "a.toml", 1, 10)
    assert a != request_key("h", "a.toml", 2, 10) != request_key("h", "b.toml", 1, 10)


def test_json_columns_read_back_what_json_wrote() -> None:
    """The ledger's JSON columns are read with orjson, and with json for the NaN and
    Infinity json writes and orjson refuses."""
    import json
    import math

    metrics = {"psnr": 29.9, "cameras": [{"params": [575.6, 320.0]}], "name": "é"}
    assert ledgerfile.json_loads(json.dumps(metrics)) == metrics
    odd = ledgerfile.json_loads(json.dumps({"ratio": float("nan"), "gain": float("inf")}))
    assert math.isnan(odd["ratio"]) and odd["gain"] == math.inf
