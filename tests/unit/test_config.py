from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import ConfigError, load


def test_defaults_from_repo_config(tmp_path: Path) -> None:
    cfg = load(tmp_path, env={})
    assert cfg.inbox == tmp_path / "inbox"
    assert cfg.url == f"sqlite:///{tmp_path / 'jobs.db'}"
    assert cfg.max_jobs == 1


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


def test_removed_pipeline_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The value every config.toml held: ignored, with a warning saying to delete it.
    (tmp_path / "config.toml").write_text('pipeline = "pipeline.stages:run_stage"\nmax_jobs = 2\n')
    with caplog.at_level("WARNING", logger="dropmesh.config"):
        cfg = load(tmp_path, env={})
    assert cfg.max_jobs == 2
    assert not hasattr(cfg, "pipeline")
    assert "key 'pipeline' is no longer a setting" in caplog.text
    assert "delete the line" in caplog.text
    # Any other runner would silently not run: refused.
    (tmp_path / "config.toml").write_text('pipeline = "mystages:run"\n')
    with pytest.raises(ConfigError, match="key 'pipeline' is no longer a setting.*'mystages:run'"):
        load(tmp_path, env={})
    (tmp_path / "config.toml").write_text("")
    with pytest.raises(ConfigError, match="DROPMESH_PIPELINE is no longer a setting.*unset it"):
        load(tmp_path, env={"DROPMESH_PIPELINE": "fakepipeline:run_stage"})
    # A typo is still an unknown key.
    (tmp_path / "config.toml").write_text('pipelines = "x"\n')
    with pytest.raises(ConfigError, match="unknown key 'pipelines'"):
        load(tmp_path, env={})


def test_shipped_config_sets_every_key_once(tmp_path: Path) -> None:
    import tomllib
    from dataclasses import fields

    from daemon.config import DEFAULT_CONFIG, Config

    keys = set(tomllib.loads(DEFAULT_CONFIG.read_text()))
    assert keys == {f.name for f in fields(Config)} - {"home"}
