"""daemon/cli/app.py: --home before or after the command, DROPMESH_HOME, help text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from daemon.cli import app
from daemon.ledger import Ledger

runner = CliRunner()


def make_home(root: Path, project: str) -> Path:
    """A home with a ledger holding one job for `project`."""
    root.mkdir(parents=True)
    ledger = Ledger.open(f"sqlite:///{root / 'jobs.db'}", create=True)
    ledger.create_job(
        project=project,
        spec={"project": project, "images": str(root)},
        request_hash=f"hash-{project}",
        request_name=f"{project}.toml",
    )
    return root


@pytest.fixture()
def homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.delenv("DROPMESH_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    return make_home(tmp_path / "a", "alpha"), make_home(tmp_path / "b", "beta")


def projects(*args: str, env: dict[str, str] | None = None) -> list[str]:
    res = runner.invoke(app, [*args], env=env)
    assert res.exit_code == 0, res.output
    return [j["project"] for j in json.loads(res.stdout)]


def test_home_before_the_command(homes: tuple[Path, Path]) -> None:
    a, _ = homes
    assert projects("--home", str(a), "status", "--json") == ["alpha"]


def test_home_after_the_command(homes: tuple[Path, Path]) -> None:
    a, _ = homes
    assert projects("status", "--json", "--home", str(a)) == ["alpha"]


def test_home_from_the_environment(homes: tuple[Path, Path]) -> None:
    _, b = homes
    assert projects("status", "--json", env={"DROPMESH_HOME": str(b)}) == ["beta"]


def test_explicit_home_beats_the_environment(homes: tuple[Path, Path]) -> None:
    a, b = homes
    env = {"DROPMESH_HOME": str(b)}
    assert projects("--home", str(a), "status", "--json", env=env) == ["alpha"]
    assert projects("status", "--json", "--home", str(a), env=env) == ["alpha"]


def test_home_after_the_command_is_the_nearer_one(homes: tuple[Path, Path]) -> None:
    a, b = homes
    assert projects("--home", str(b), "status", "--json", "--home", str(a)) == ["alpha"]


def test_a_missing_ledger_names_the_folder(homes: tuple[Path, Path], tmp_path: Path) -> None:
    res = runner.invoke(app, ["--home", str(tmp_path / "nowhere"), "status"])
    assert res.exit_code == 1
    assert "nowhere" in res.output and "no ledger" in res.output


def test_flags_show_no_value_type_in_help() -> None:
    group = get_command(app)
    for name in [None, *group.commands]:  # type: ignore[attr-defined]
        res = runner.invoke(app, [name, "--help"] if name else ["--help"])
        assert res.exit_code == 0, res.output
        assert "<bool>" not in res.output, name
    # Options that take a value still say which.
    res = runner.invoke(app, ["submit", "--help"])
    assert "<int>" in res.output and "<path>" in res.output


def test_shell_completion_is_offered() -> None:
    res = runner.invoke(app, ["--help"])
    assert "--install-completion" in res.output


def test_the_cli_starts_without_the_orm_or_the_pipeline_libraries() -> None:
    """`dropmesh status` must start fast: importing the CLI loads neither the ORM nor
    the photogrammetry stack (commands import those when they run)."""
    import subprocess
    import sys

    heavy = ["sqlalchemy.orm", "daemon.ledger", "daemon.models", "daemon.service"]
    heavy += ["numpy", "pycolmap", "cv2", "open3d", "trimesh", "watchdog", "plyer"]
    code = f"import sys, daemon.cli\nprint([m for m in {heavy!r} if m in sys.modules])\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def complete(words: str, env: dict[str, str] | None = None) -> list[str]:
    """What bash completion offers for the last word of `words`."""
    parts = words.split(" ")
    res = runner.invoke(
        app,
        [],
        prog_name="dropmesh",
        env={
            "_DROPMESH_COMPLETE": "complete_bash",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(parts) - 1),
            **(env or {}),
        },
    )
    assert res.exit_code == 0, res.output
    return res.stdout.split()


def test_job_arguments_complete_from_the_ledger(homes: tuple[Path, Path]) -> None:
    a, b = homes
    assert complete(f"dropmesh --home {a} status al") == ["alpha"]
    assert complete(f"dropmesh cancel --home {b} ") == ["beta", *job_ids(b)]
    assert complete("dropmesh logs be", env={"DROPMESH_HOME": str(b)}) == ["beta"]
    assert complete(f"dropmesh exports --home {a} ") == ["alpha"]  # projects only


def test_completion_without_a_ledger_offers_nothing(tmp_path: Path) -> None:
    assert complete(f"dropmesh --home {tmp_path / 'nowhere'} status ") == []


def job_ids(home: Path) -> list[str]:
    res = runner.invoke(app, ["--home", str(home), "status", "--json"])
    return [j["id"] for j in json.loads(res.stdout)]
