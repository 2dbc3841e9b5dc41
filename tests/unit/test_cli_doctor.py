"""daemon/cli/doctor.py: the import-name check."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from daemon.cli.doctor import import_name_clashes


def test_daemon_and_pipeline_are_ours_here() -> None:
    assert import_name_clashes() == []


def test_a_name_resolving_elsewhere_is_reported() -> None:
    ours = Path(__file__).resolve().parents[2]
    (problem,) = import_name_clashes(("json",), ours=ours)
    assert "`json` is" in problem and str(Path(json.__file__).parent) in problem


def test_another_distribution_with_the_same_name_is_reported() -> None:
    # typer's folder is where it is, but it is not dropmesh that installs it.
    site = Path(typer.__file__).resolve().parents[1]
    (problem,) = import_name_clashes(("typer",), ours=site)
    assert problem.startswith("typer also install(s) `typer`")


def test_a_name_that_cannot_be_imported_is_reported() -> None:
    (problem,) = import_name_clashes(("no_such_module_dropmesh",))
    assert "cannot be imported" in problem


def test_doctor_on_a_home_that_does_not_exist_says_so(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from daemon.cli import app

    home = tmp_path / "not" / "yet"
    res = CliRunner().invoke(app, ["--home", str(home), "doctor"])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    assert f"home: {home} does not exist yet" in " ".join(res.output.split())
    assert "GB free at" in res.output
