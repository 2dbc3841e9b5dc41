from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import ConfigError, load


def test_defaults_from_repo_config(tmp_path: Path) -> None:
    cfg = load(tmp_path, env={})
    assert cfg.inbox == tmp_path / "inbox"
    assert cfg.url == f"sqlite:///{tmp_path / 'jobs.db'}"
    assert cfg.max_jobs == 1
    assert cfg.pipeline == "pipeline.stages:run_stage"


def test_env_overrides(tmp_path: Path) -> None:
    env = {
        "DROPMESH_MAX_JOBS": "3",
        "DROPMESH_USE_POLLING": "yes",
        "DROPMESH_ALLOWED_ROOTS": "/data,/scans",
        "DROPMESH_INBOX": "drop",
    }
    cfg = load(tmp_path, env=env)
    assert cfg.max_jobs == 3
    assert cfg.use_polling is True
    assert cfg.allowed_roots == [Path("/data"), Path("/scans")]
    assert cfg.inbox == tmp_path / "drop"


def test_home_from_env(tmp_path: Path) -> None:
    assert load(env={"DROPMESH_HOME": str(tmp_path)}).home == tmp_path


def test_bad_values_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="DROPMESH_MAX_JOBS: key 'max_jobs' must be int"):
        load(tmp_path, env={"DROPMESH_MAX_JOBS": "many"})
    (tmp_path / "config.toml").write_text("max_job = 2\n")
    with pytest.raises(ConfigError, match="unknown key 'max_job'"):
        load(tmp_path, env={})
    (tmp_path / "config.toml").write_text('device = "tpu"\n')
    with pytest.raises(ConfigError, match="device"):
        load(tmp_path, env={})
