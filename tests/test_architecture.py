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


def test_shipped_code_never_imports_tests_or_bench() -> None:
    files = sorted((ROOT / "daemon").rglob("*.py")) + sorted((ROOT / "pipeline").rglob("*.py"))
    offenders = [
        f"{f.relative_to(ROOT)}: {m}"
        for f in files
        for m in imported_modules(f)
        if m.split(".")[0] in {"tests", "bench"}
    ]
    assert offenders == []


def test_bench_imports_test_helpers_as_a_package_without_editing_sys_path() -> None:
    """bench/ may use the test suite's harness, named as `tests.<module>`; importing a
    test module by its bare name would need tests/ put on sys.path by hand."""
    helpers = {p.stem for p in (ROOT / "tests").glob("*.py")}
    files = sorted((ROOT / "bench").rglob("*.py"))
    assert files
    offenders = []
    for f in files:
        if "sys.path" in f.read_text(encoding="utf-8"):
            offenders.append(f"{f.relative_to(ROOT)}: edits sys.path")
        offenders += [
            f"{f.relative_to(ROOT)}: {m}" for m in imported_modules(f) if m.split(".")[0] in helpers
        ]
    assert offenders == []


def test_docs_link_only_to_files_inside_the_repository() -> None:
    import re

    for doc in (ROOT / "README.md", ROOT / "docs" / "ARCHITECTURE.md"):
        text = doc.read_text(encoding="utf-8")
        assert "../shared" not in text, doc.name
        for target in re.findall(r"\]\(([^)#\s]+)\)", text):
            if "://" in target:
                continue
            path = (doc.parent / target).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), f"{doc.name}: {target}"
