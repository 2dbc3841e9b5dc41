"""daemon/cli/render.py: overall progress, ETA and bars from ledger rows."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from daemon.cli import render
from daemon.cli.render import bar, eta, job_json, job_progress
from pipeline.stages import STAGE_WEIGHTS, STAGES


def job(state: str = "running", **kw: Any) -> SimpleNamespace:
    fields: dict[str, Any] = {
        "id": "j1",
        "project": "p",
        "state": state,
        "stage": None,
        "attempts": 1,
        "max_attempts": 3,
        "priority": 0,
        "error": None,
        "cancel_requested": False,
        "worker": None,
        "host": None,
        "created_at": 1.0,
        "started_at": None,
        "finished_at": None,
        "next_attempt_at": None,
    }
    fields.update(kw)
    return SimpleNamespace(**fields)


def stage(name: str, state: str = "pending", progress: float = 0.0) -> SimpleNamespace:
    return SimpleNamespace(
        name=name,
        state=state,
        progress=progress,
        message=None,
        attempt=1,
        duration_s=None,
        peak_rss_mb=None,
        device=None,
        metrics=None,
        started_at=None,
    )


def all_stages(done: int = 0, running: float | None = None) -> list[SimpleNamespace]:
    """The first `done` stages done, the next one running at `running` (if given)."""
    rows = []
    for i, name in enumerate(STAGES):
        if i < done:
            rows.append(stage(name, "done", 1.0))
        elif i == done and running is not None:
            rows.append(stage(name, "running", running))
        else:
            rows.append(stage(name))
    return rows


TOTAL = sum(STAGE_WEIGHTS.values())


def test_nothing_started_is_zero() -> None:
    assert job_progress(job("queued"), all_stages()) == 0.0


def test_done_stages_count_by_their_weight() -> None:
    first, second = STAGES[0], STAGES[1]
    expected = (STAGE_WEIGHTS[first] + STAGE_WEIGHTS[second]) / TOTAL
    assert job_progress(job(), all_stages(done=2)) == pytest.approx(expected)


def test_a_running_stage_counts_by_its_own_progress() -> None:
    i = STAGES.index("stereo")
    before = sum(STAGE_WEIGHTS[n] for n in STAGES[:i])
    expected = (before + 0.5 * STAGE_WEIGHTS["stereo"]) / TOTAL
    assert job_progress(job(), all_stages(done=i, running=0.5)) == pytest.approx(expected)


def test_weights_not_stage_counts_decide() -> None:
    # stereo alone outweighs ingest + undistort: equal counts would say 1/3 each.
    rows = [stage("ingest", "done", 1.0), stage("undistort"), stage("stereo", "done", 1.0)]
    w = STAGE_WEIGHTS
    expected = (w["ingest"] + w["stereo"]) / (w["ingest"] + w["undistort"] + w["stereo"])
    assert job_progress(job(), rows) == pytest.approx(expected)
    assert expected != pytest.approx(2 / 3)


def test_failed_and_pending_stages_add_nothing() -> None:
    rows = [stage("ingest", "failed", 0.7), stage("features", "pending", 0.9)]
    assert job_progress(job("failed"), rows) == 0.0


def test_a_stage_missing_from_the_table_weighs_one() -> None:
    rows = [stage("ingest", "done", 1.0), stage("not-a-stage", "running", 0.5)]
    expected = (STAGE_WEIGHTS["ingest"] + 0.5) / (STAGE_WEIGHTS["ingest"] + 1)
    assert job_progress(job(), rows) == pytest.approx(expected)


def test_succeeded_is_complete_whatever_the_rows_say() -> None:
    assert job_progress(job("succeeded"), all_stages(done=3)) == 1.0
    assert job_progress(job("succeeded"), []) == 1.0


def test_no_stage_rows_yet_is_zero() -> None:
    assert job_progress(job("queued"), []) == 0.0


def test_every_stage_done_is_one() -> None:
    assert job_progress(job(), all_stages(done=len(STAGES))) == pytest.approx(1.0)


def test_json_rounds_progress_and_lists_stages() -> None:
    out = job_json(job(), all_stages(done=1), ["/r/p.glb"])
    assert out["progress"] == round(STAGE_WEIGHTS[STAGES[0]] / TOTAL, 4)
    assert [s["name"] for s in out["stages"]] == list(STAGES)
    assert out["exports"] == ["/r/p.glb"]
    assert out["started_at"] is None


def test_eta_extrapolates_the_time_spent() -> None:
    j = job(started_at=1000.0)
    # A minute for the first quarter: three more for the rest.
    assert eta(j, 0.25, now=1060.0) == "3:00"
    assert eta(j, 0.5, now=1060.0) == "1:00"


def test_eta_is_unknown_early_or_when_not_running() -> None:
    assert eta(job(started_at=1000.0), 0.01, now=1060.0) == "-"
    assert eta(job("queued", started_at=1000.0), 0.5, now=1060.0) == "-"
    assert eta(job(started_at=None), 0.5, now=1060.0) == "-"


def test_bar_fills_in_proportion() -> None:
    assert bar(0.0, 10) == "░" * 10
    assert bar(1.0, 10) == "█" * 10
    assert bar(0.5, 10) == "█" * 5 + "░" * 5


def test_the_listing_is_aligned_one_line_per_job_with_no_trailing_blanks() -> None:
    jobs = [
        job("running", id="a1", project="short", stage="features", started_at=100.0),
        job("failed", id="b2", project="a-much-longer-project", error="disk full\nat export"),
        job("succeeded", id="c3", project="p"),
    ]
    stages = {"a1": all_stages(done=1, running=0.5), "b2": all_stages(done=3)}
    text = render.jobs_listing(jobs, stages)
    lines = text.split("\n")
    assert len(lines) == 4  # the header and one line per job, the error's newline folded
    assert lines[0].split() == list(render.LISTING_COLUMNS)
    state_at = lines[0].index("state")
    assert [line[state_at:].split()[0] for line in lines[1:]] == ["running", "failed", "succeeded"]
    assert lines[2].endswith("disk full at export")
    assert all(line == line.rstrip() for line in lines)
    assert "\x1b" not in text, "no colour codes unless the console has colours"
    # on a colour terminal the header is bold and every state is shown in its colour
    coloured = render.jobs_listing(jobs, stages, "truecolor").split("\n")
    assert coloured[0].startswith("\x1b[1m") and coloured[0].endswith("\x1b[0m")
    assert "\x1b[31mfailed" in coloured[2]  # red
    assert "\x1b[33mrunning" in coloured[1]  # yellow
    assert all(render.STATE_STYLE[s] for s in ("failed", "running", "succeeded"))


def test_the_listing_strips_control_codes_from_ledger_text() -> None:
    """A project name or an error text is the user's or a library's: an escape sequence
    in it must not reach the terminal."""
    jobs = [job("failed", id="x1", project="p\x1b[2J", error="bad \x1b]0;title\x07 input")]
    text = render.jobs_listing(jobs, {}, "truecolor")
    assert "\x1b[2J" not in text and "\x1b]0" not in text and "\x07" not in text
    assert "p[2J" in text and "bad ]0;title input" in text


def test_json_text_is_the_indented_json_of_the_items() -> None:
    items = [{"id": "j1", "stages": [{"metrics": {"psnr": 29.9, "n": [1, 2]}}], "error": None}]
    assert render.json_text(items) == json.dumps(items, indent=2) + "\n"
