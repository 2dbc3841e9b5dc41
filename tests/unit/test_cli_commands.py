"""The commands that need no running daemon, through the typer app: submit, status of a
job, retry's checks, exports, logs."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from daemon.cli import app
from daemon.ledger import Ledger

runner = CliRunner()


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("DROPMESH_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "home"
    (root / "photos" / "fountain").mkdir(parents=True)
    (root / "photos" / "fountain" / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0")
    (root / "photos" / "empty").mkdir()
    ledger = Ledger.open(f"sqlite:///{root / 'jobs.db'}", create=True)
    ledger.create_job(
        project="alpha",
        spec={"project": "alpha"},
        request_hash="hash-alpha",
        request_name="alpha.toml",
    )
    return root


def test_submit_writes_a_request_the_daemon_reads(home: Path) -> None:
    images = home / "photos" / "fountain"
    res = runner.invoke(
        app, ["--home", str(home), "submit", str(images), "--quality", "high", "-f", "obj"]
    )
    assert res.exit_code == 0, res.output
    (path,) = (home / "inbox").glob("*.toml")
    body = tomllib.loads(path.read_text())
    assert body["project"] == "fountain" and body["images"] == str(images)
    assert body["quality"] == "high" and body["formats"] == ["obj"]
    assert not list((home / "inbox").glob(".*"))  # no temporary file left behind


def test_submit_twice_does_not_overwrite(home: Path) -> None:
    images = str(home / "photos" / "fountain")
    for _ in range(2):
        assert runner.invoke(app, ["submit", images, "--home", str(home)]).exit_code == 0
    assert sorted(p.name for p in (home / "inbox").glob("*.toml")) == [
        "fountain-2.toml",
        "fountain.toml",
    ]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--quality", "ultra"], 2, "--quality must be one of"),
        (["-f", "stl"], 2, "--format must be one of"),
    ],
)
def test_submit_refuses_bad_options(home: Path, args: list[str], code: int, message: str) -> None:
    res = runner.invoke(app, ["--home", str(home), "submit", str(home / "photos/fountain"), *args])
    assert res.exit_code == code
    assert message in res.output
    assert not (home / "inbox").exists() or not list((home / "inbox").iterdir())


def test_submit_names_what_is_wrong_with_the_folder(home: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["--home", str(home), "submit", str(home / "photos" / "empty")])
    assert res.exit_code == 1 and "is empty" in res.output


def test_status_of_an_unknown_job_says_so(home: Path) -> None:
    res = runner.invoke(app, ["--home", str(home), "status", "nosuchjob"])
    assert res.exit_code == 1 and "nosuchjob" in res.output


def test_status_of_one_job_shows_its_stages(home: Path) -> None:
    res = runner.invoke(app, ["--home", str(home), "status", "alpha"])
    assert res.exit_code == 0, res.output
    assert "alpha" in res.output and "ingest" in res.output and "export" in res.output


def test_retry_checks_its_options(home: Path) -> None:
    res = runner.invoke(app, ["--home", str(home), "retry", "alpha", "--from-stage", "nope"])
    assert res.exit_code == 2 and "--from-stage must be one of" in res.output
    res = runner.invoke(app, ["--home", str(home), "retry", "alpha", "-f", "stl"])
    assert res.exit_code == 2 and "--format must be one of" in res.output


def test_exports_when_there_are_none(home: Path) -> None:
    res = runner.invoke(app, ["--home", str(home), "exports", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == []
    res = runner.invoke(app, ["--home", str(home), "exports"])
    assert res.exit_code == 0 and "no exports yet" in res.output


def test_logs_without_a_job_log_prints_the_ledger_events(home: Path) -> None:
    res = runner.invoke(app, ["--home", str(home), "logs", "alpha"])
    assert res.exit_code == 0, res.output
    assert "queued: job" in res.stdout and "project alpha" in res.stdout


def test_a_listing_reads_stages_only_for_jobs_that_have_not_succeeded(home: Path) -> None:
    """A succeeded job is 100 % whatever its stage rows say: `status --all` and
    `status --json` read the stages of the other jobs only, and still show every job's
    progress; `status JOB --json` shows the job's stages with their metrics."""
    from daemon.cli.commands import read_jobs
    from daemon.listing import Listing
    from pipeline import STAGES

    url = f"sqlite:///{home / 'jobs.db'}"
    ledger = Ledger.open(url)
    done = ledger.create_job(
        project="beta", spec={"project": "beta"}, request_hash="b", request_name="b.toml"
    ).id
    (alpha,) = [j.id for j in ledger.list_jobs() if j.project == "alpha"]
    job = ledger.claim_next("host:1:x")
    assert job is not None and job.id == alpha  # the older job first
    ledger.stage_finished(
        alpha, STAGES[0], metrics={}, device="cpu", peak_rss_mb=None, token=job.lease_token
    )
    job = ledger.claim_next("host:1:y")
    assert job is not None and job.id == done
    for name in STAGES:
        ledger.stage_finished(
            done,
            name,
            metrics={},
            device="cpu",
            peak_rss_mb=None,
            last=name == STAGES[-1],
            token=job.lease_token,
        )
    ledger.close()
    listing = Listing.open(url)
    _, brief, _ = read_jobs(listing, None, None, every=True, brief=True)
    assert set(brief) == {alpha} and len(brief[alpha]) == len(STAGES)
    _, full, _ = read_jobs(listing, None, None, every=True)
    assert set(full) == {alpha, done}
    listing.close()
    res = runner.invoke(app, ["--home", str(home), "status", "--all"])
    assert res.exit_code == 0, res.output
    rows = {line.split()[1]: line for line in res.output.splitlines()[1:]}
    assert "100.0%" in rows["beta"] and "succeeded" in rows["beta"]
    assert "running" in rows["alpha"] and "100.0%" not in rows["alpha"]
    res = runner.invoke(app, ["--home", str(home), "status", "--json"])
    assert res.exit_code == 0, res.output
    listed = {j["project"]: j for j in json.loads(res.stdout)}
    assert listed["beta"]["progress"] == 1.0 and 0 < listed["alpha"]["progress"] < 1
    assert listed["alpha"]["attempts"] == 1 and listed["alpha"]["host"] == "host"
    assert not any("stages" in j for j in listed.values())
    res = runner.invoke(app, ["--home", str(home), "status", "beta", "--json"])
    assert res.exit_code == 0, res.output
    (detail,) = json.loads(res.stdout)
    assert [s["name"] for s in detail["stages"]] == list(STAGES)
    assert all(s["metrics"] == {} and s["device"] == "cpu" for s in detail["stages"])
    assert {k: v for k, v in detail.items() if k != "stages"} == listed["beta"]
