"""Config keys `http` and `http_token`."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon import config
from daemon.web.server import Bind, parse_bind, token_for


def test_http_key(tmp_path: Path) -> None:
    cfg = config.load(tmp_path, env={})
    assert parse_bind(cfg.http) == Bind("127.0.0.1", 8750)  # the shipped default
    assert config.load(tmp_path, env={"DROPMESH_HTTP": ""}).http == ""
    assert parse_bind("") is None
    assert parse_bind("[::1]:9000") == Bind("::1", 9000)
    for bad in ("8750", "host:", "h:99999", "h:port"):
        with pytest.raises(config.ConfigError, match="'http' must be host:port"):
            config.load(tmp_path, env={"DROPMESH_HTTP": bad})


def test_a_token_only_off_loopback_unless_configured(tmp_path: Path) -> None:
    cfg = config.load(tmp_path, env={})
    assert token_for(cfg, "127.0.0.1") == (None, False)
    assert token_for(cfg, "::1") == (None, False)
    token, generated = token_for(cfg, "0.0.0.0")
    assert generated and token and len(token) >= 24
    cfg = config.load(tmp_path, env={"DROPMESH_HTTP_TOKEN": "mine"})
    assert token_for(cfg, "127.0.0.1") == ("mine", False)
    assert token_for(cfg, "192.168.1.5") == ("mine", False)
