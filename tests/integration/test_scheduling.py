"""Scheduling inside one daemon: concurrency limit and the single GPU slot."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from daemon_harness import FAST_ENV, Home, wait_for

from daemon import config
from daemon.ledger import Ledger
from daemon.service import Daemon
from pipeline.devices import available_cores
from pipeline.stages import GPU_STAGES


class _Quiet:
    def notify(self, title: str, message: str) -> bool:
        return True


class _Recorder:
    """A companion that records the daemon's calls into it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def start(self) -> None:
        self.calls.append("start")

    def poll(self) -> None:
        if self.calls[-1:] != ["poll"]:
            self.calls.append("poll")

    def stop(self) -> None:
        self.calls.append("stop")


def _intervals(home: Home, job_id: str) -> list[tuple[str, float, float, int]]:
    """(stage, started, ended, threads the daemon gave it) for each stage the job ran."""
    lines = (home.workspaces / job_id / "stage_times.log").read_text().splitlines()
    return [(s, float(a), float(b), int(t)) for s, a, b, t in (line.split() for line in lines)]


@pytest.mark.parametrize("gpus", [0, 1])
def test_two_jobs_share_one_gpu_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpus: int
) -> None:
    home = Home(tmp_path / "home")
    for key, value in {**FAST_ENV, "DROPMESH_MAX_JOBS": "2", "DROPMESH_DEVICE": "auto"}.items():
        monkeypatch.setenv(key, value)
    cfg = config.load(home.root)
    companion = _Recorder()
    daemon = Daemon(cfg, notifier=_Quiet(), gpu_count=gpus, companions=[companion])
    thread = threading.Thread(target=daemon.run, kwargs={"once": False}, daemon=True)
    for name in ("a", "b"):
        home.images(name, {"_all": {"sleep": 0.4}})
    thread.start()
    try:
        wait_for(lambda: daemon.intake.idle.is_set(), 30)
        assert companion.calls[0] == "start"
        home.drop("a")
        home.drop("b")
        ledger = Ledger.open(cfg.url)
        wait_for(
            lambda: (
                {j.state for j in ledger.list_jobs()} == {"succeeded"}
                and len(ledger.list_jobs()) == 2
            ),
            90,
            0.2,
        )
        a, b = (_intervals(home, j.id) for j in ledger.list_jobs())
    finally:
        daemon.stop()
        thread.join(15)
    assert companion.calls == ["start", "poll", "stop"]

    def overlap(x: tuple[str, float, float, int], y: tuple[str, float, float, int]) -> bool:
        return x[1] < y[2] and y[1] < x[2]

    gpu_overlaps = [
        (x[0], y[0])
        for x in a
        for y in b
        if x[0] in GPU_STAGES and y[0] in GPU_STAGES and overlap(x, y)
    ]
    any_overlap = any(overlap(x, y) for x in a for y in b)
    assert any_overlap, "two jobs with max_jobs = 2 should run at the same time"
    # the cores are shared between the two jobs: no stage is given more than half of them,
    # so two at once never oversubscribe the machine
    assert {x[3] for x in a + b} == {max(1, available_cores() // 2)}
    if gpus:
        assert gpu_overlaps == []


@pytest.mark.parametrize(
    ("threads", "max_jobs", "expected"),
    [(0, 1, available_cores()), (0, 2, max(1, available_cores() // 2)), (3, 2, 3), (0, 64, 1)],
)
def test_stage_threads_share_the_cores_among_the_jobs(
    threads: int, max_jobs: int, expected: int
) -> None:
    """`threads` as configured, else the cores divided among max_jobs (at least one)."""
    from types import SimpleNamespace

    from daemon.scheduler import Scheduler

    sched = SimpleNamespace(cfg=SimpleNamespace(threads=threads, max_jobs=max_jobs))
    assert Scheduler.stage_threads(sched) == expected  # type: ignore[arg-type]
