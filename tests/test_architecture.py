"""Imports go one way: daemon imports pipeline, never the reverse."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_pipeline_never_imports_daemon() -> None:
    files = sorted((ROOT / "pipeline").rglob("*.py"))
    assert files
    offenders = [
        f"{f.relative_to(ROOT)}: {m}"
        for f in files
        for m in imported_modules(f)
        if m == "daemon" or m.startswith("daemon.")
    ]
    assert offenders == []


def test_shipped_default_is_the_real_pipeline() -> None:
    import tomllib

    from daemon.stageproc import DEFAULT_RUNNER, load_runner, runner_from_env
    from pipeline.stages import run_stage

    # Only a test chooses another runner, through the environment; no setting offers one.
    assert runner_from_env({}) == DEFAULT_RUNNER
    assert load_runner(DEFAULT_RUNNER) is run_stage
    assert "pipeline" not in tomllib.loads((ROOT / "config.toml").read_text())
    assert not list((ROOT / "daemon").rglob("fake*.py"))


def test_every_cli_command_has_help_with_an_example() -> None:
    from typer.main import get_command

    from daemon.cli import app

    group = get_command(app)
    commands = group.commands  # type: ignore[attr-defined]
    assert {"run", "submit", "status", "cancel", "retry", "exports", "logs", "doctor"} <= set(
        commands
    )
    for name, cmd in commands.items():
        assert cmd.help and "Example" in cmd.help, name
