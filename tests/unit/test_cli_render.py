"""daemon/cli/render.py: overall progress, ETA and bars from ledger rows."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

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
