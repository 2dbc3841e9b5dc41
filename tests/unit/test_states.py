from __future__ import annotations

import random

import pytest

from daemon.scheduler import backoff_delay
from daemon.states import TRANSITIONS, JobState, TransitionError, check_transition


def test_every_state_has_a_row() -> None:
    assert set(TRANSITIONS) == set(JobState)


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (JobState.QUEUED, JobState.RUNNING),
        (JobState.RUNNING, JobState.WAITING),
        (JobState.WAITING, JobState.RUNNING),
        (JobState.RUNNING, JobState.SUCCEEDED),
        (JobState.FAILED, JobState.QUEUED),
    ],
)
def test_allowed(src: JobState, dst: JobState) -> None:
    check_transition(src, dst)


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (JobState.QUEUED, JobState.SUCCEEDED),
        (JobState.SUCCEEDED, JobState.RUNNING),
        (JobState.CANCELLED, JobState.RUNNING),
        (JobState.WAITING, JobState.SUCCEEDED),
    ],
)
def test_refused(src: JobState, dst: JobState) -> None:
    with pytest.raises(TransitionError, match=f"{src.value} job cannot become {dst.value}"):
        check_transition(src, dst)


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    rng = random.Random(1)
    for attempt, nominal in [(1, 10), (2, 20), (3, 40), (4, 80)]:
        delays = [backoff_delay(attempt, 10, 1000, rng) for _ in range(200)]
        assert min(delays) >= nominal * 0.75
        assert max(delays) <= nominal * 1.25
        assert max(delays) - min(delays) > nominal * 0.2  # there is jitter


def test_backoff_is_capped() -> None:
    rng = random.Random(2)
    assert backoff_delay(30, 10, 100, rng) <= 125
