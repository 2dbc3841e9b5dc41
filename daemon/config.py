"""Configuration: config.toml in the home folder, overridden by DROPMESH_<KEY>."""

from __future__ import annotations

import json
import logging
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config.toml"

log = logging.getLogger("dropmesh.config")

# Keys that were settings once -> (the one value they could usefully hold, why they went).
# The old value is ignored with a warning; any other is refused, since it would not be
# honoured any more.
_REMOVED = {
    "pipeline": (
        "pipeline.stages:run_stage",
        "stages always run the photogrammetry pipeline (pipeline.stages)",
    ),
}


class ConfigError(Exception):
    pass


@dataclass
class Config:
    home: Path
    inbox: Path = Path("inbox")
    results: Path = Path("results")
    workspaces: Path = Path("workspaces")
    ledger_url: str = ""
    shared_root: str = ""
    gpu_stages: str = "prefer"
    allowed_roots: list[Path] = field(default_factory=lambda: [Path("."), Path("~")])
    max_jobs: int = 1
    max_attempts: int = 3
    retry_base_s: float = 30.0
    retry_max_s: float = 900.0
    stage_timeout_s: float = 21600.0
    device: str = "auto"
    threads: int = 0
    use_polling: bool = False
    rescan_s: float = 30.0
    settle_s: float = 1.0
    max_request_bytes: int = 65536
    heartbeat_s: float = 2.0
    stale_after_s: float = 30.0
    notify: bool = True
    keep_workspaces_days: float = 14.0
    log_level: str = "INFO"
    http: str = ""
    http_token: str = ""

    @property
    def db_path(self) -> Path:
        return self.home / "jobs.db"

    @property
    def url(self) -> str:
        return self.ledger_url or f"sqlite:///{self.db_path}"

    @property
    def rejected(self) -> Path:
        return self.inbox / "rejected"

    def workspace(self, job_id: str) -> Path:
        return self.workspaces / job_id

    def ensure_dirs(self) -> None:
        for d in (self.inbox, self.rejected, self.results, self.workspaces):
            d.mkdir(parents=True, exist_ok=True)


_PATH_KEYS = {"inbox", "results", "workspaces"}


def _coerce(name: str, default: Any, value: Any, source: str) -> Any:
    """Convert `value` to the type of the default, or say which key is wrong."""
    kind = type(default)
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(default, list):
            if isinstance(value, str):
                value = json.loads(value) if value.strip().startswith("[") else value.split(",")
            if not isinstance(value, list):
                raise ValueError(value)
            return [Path(str(v).strip()) for v in value if str(v).strip()]
        if isinstance(default, Path):
            return Path(str(value))
        if isinstance(default, int | float) and isinstance(value, bool):
            raise ValueError(value)
        return kind(value)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: key {name!r} must be {kind.__name__}, got {value!r}") from exc


def load(home: Path | str | None = None, env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ if env is None else env)
    home_path = Path(home or env.get("DROPMESH_HOME") or ".").expanduser().resolve()
    cfg = Config(home=home_path)
    defaults = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "home"}

    cfg_file = home_path / "config.toml"
    values = _from_file(cfg_file if cfg_file.exists() else DEFAULT_CONFIG, defaults)
    for key in _REMOVED:
        env_key = f"DROPMESH_{key.upper()}"
        if env_key in env:
            _removed(key, env[env_key], env_key, "unset it")
    for key in defaults:
        env_key = f"DROPMESH_{key.upper()}"
        if env_key in env:
            values[key] = _coerce(key, defaults[key], env[env_key], env_key)
    for key, value in values.items():
        setattr(cfg, key, value)

    # With shared_root (a folder mounted at the same path on every host), the inbox,
    # workspaces and results of relative paths lie under it rather than the home folder.
    base = _under_home(home_path, Path(cfg.shared_root)) if cfg.shared_root else home_path
    for key in _PATH_KEYS:
        setattr(cfg, key, _under_home(base, getattr(cfg, key)))
    cfg.allowed_roots = [_under_home(home_path, p) for p in cfg.allowed_roots]
    if cfg.device not in ("auto", "cpu", "gpu"):
        raise ConfigError(f"key 'device' must be auto, cpu or gpu, got {cfg.device!r}")
    if cfg.gpu_stages not in ("require", "prefer", "any"):
        raise ConfigError(
            f"key 'gpu_stages' must be require, prefer or any, got {cfg.gpu_stages!r}"
        )
    if cfg.ledger_url and not cfg.ledger_url.startswith(("sqlite", "postgresql")):
        raise ConfigError(
            f"key 'ledger_url' must be an sqlite:/// or postgresql+psycopg:// URL, "
            f"got {cfg.ledger_url.split('://')[0]}://..."
        )
    if cfg.http:
        from daemon.web.server import parse_bind

        parse_bind(cfg.http)
    if cfg.max_jobs < 1 or cfg.max_attempts < 1:
        raise ConfigError("keys 'max_jobs' and 'max_attempts' must be at least 1")
    return cfg


def _from_file(source: Path, defaults: dict[str, Any]) -> dict[str, Any]:
    """The keys `source` sets, converted; unknown keys are refused by name."""
    if not source.exists():
        return {}
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in _REMOVED:
            _removed(key, value, f"{source}: key {key!r}", "delete the line")
        elif key not in defaults:
            raise ConfigError(f"{source}: unknown key {key!r}")
        else:
            values[key] = _coerce(key, defaults[key], value, str(source))
    return values


def _removed(key: str, value: Any, where: str, fix: str) -> None:
    """A key that is no longer a setting: warn about its old value, refuse any other."""
    old, why = _REMOVED[key]
    if value == old:
        log.warning("%s is no longer a setting and is ignored: %s; %s", where, why, fix)
        return
    raise ConfigError(
        f"{where} is no longer a setting: {why}, so {value!r} would not be used; {fix}"
    )


def _under_home(home: Path, p: Path) -> Path:
    p = p.expanduser()
    return (p if p.is_absolute() else home / p).resolve()
