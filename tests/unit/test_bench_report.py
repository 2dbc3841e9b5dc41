"""bench/report.py: every target names its source and gets a verdict."""

from __future__ import annotations

import copy
from typing import Any

from bench.report import TARGETS, check, latest, targets_section


def service(status_p50: float) -> dict[str, Any]:
    stats = {"p50": status_p50, "p95": status_p50}
    return {
        "_file": "x-service.json",
        "pickup": {"seconds": {"p50": 0.01, "p95": 0.02}},
        "status": {"status": dict(stats), "status_json_all": dict(stats)},
        "cancel": {"seconds": {"p50": 1.0, "p95": 1.0}},
    }


def test_every_target_says_which_issue_asked_for_it() -> None:
    for t in TARGETS:
        assert t.source.startswith("issue "), t.what


def test_verdicts_follow_the_measured_figure() -> None:
    (status,) = [t for t in TARGETS if t.what.startswith("`dropmesh status`") and "0.5" in t.limit]
    assert check(status, service(0.2)) == ("0.200 s", "pass")
    assert check(status, service(0.7)) == ("0.700 s", "FAIL")


def test_missing_results_or_figures_are_not_measured() -> None:
    (all_flag,) = [t for t in TARGETS if "--all" in t.what]
    assert check(all_flag, service(0.2)) == ("", "not measured")
    assert check(TARGETS[0], None) == ("", "not measured")


def test_the_committed_results_give_a_verdict_for_every_target() -> None:
    suites = {t.suite for t in TARGETS}
    results = {s: latest(s) for s in suites}
    text, lines = targets_section(copy.deepcopy(results))
    assert len(lines) == len(TARGETS)
    assert text.count("\n| ") == len(TARGETS) + 1  # header and one row per target
    measured = [check(t, results[t.suite])[1] for t in TARGETS if results[t.suite]]
    assert set(measured) <= {"pass", "FAIL", "not measured"}
    assert "pass" in measured


def mapper_runs(global_s: float, global_rms: float) -> dict[str, Any]:
    def summary(seconds: float, rms: float) -> dict[str, Any]:
        return {"seconds_median": seconds, "registered_min": 128, "camera_rms_max": rms}

    return {
        "sizes": [
            {
                "images": 128,
                "summary": {
                    "incremental": summary(360.0, 0.0005),
                    "global": summary(global_s, global_rms),
                },
            }
        ]
    }


def test_the_auto_mapper_target_checks_speed_and_camera_error() -> None:
    """`auto` maps 128 photos globally: that passes only if global was measured faster
    with a camera error within 10 % of incremental's."""
    (auto,) = [t for t in TARGETS if t.suite == "mapper"]
    assert check(auto, mapper_runs(230.0, 0.0004))[1] == "pass"
    assert check(auto, mapper_runs(400.0, 0.0004))[1] == "FAIL"  # slower
    assert check(auto, mapper_runs(230.0, 0.0006))[1] == "FAIL"  # less accurate
