"""Shared helpers for the benchmarks: results files and percentiles."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 0.5),
        "p95": percentile(values, 0.95),
        "max": max(values) if values else float("nan"),
        "mean": statistics.fmean(values) if values else float("nan"),
    }


def write_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    day = time.strftime("%Y-%m-%d")
    path = RESULTS / f"{day}-{name}.json"
    payload = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": _cpus(), "python": platform.python_version()},
        **data,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def seed_ledger(
    db: Path,
    n: int,
    *,
    projects: int,
    states: list[str],
    age_s: float = 0.0,
    error: str | None = None,
) -> None:
    """A ledger at `db` holding `n` finished-looking jobs spread over `projects` projects,
    their states cycling through `states`, each with every stage done; the failed ones
    carry `error`. For the benchmarks that need a big ledger (status, the dashboard)."""
    from daemon.ledger import Ledger
    from daemon.models import Job, Stage
    from pipeline import STAGES

    ledger = Ledger.open(f"sqlite:///{db}", create=True)
    now = time.time() - age_s
    with ledger.write() as s:
        s.execute(
            Job.__table__.insert(),  # type: ignore[attr-defined]
            [
                {
                    "id": f"{i:08x}",
                    "project": f"project{i % projects}",
                    "spec": {"project": f"project{i % projects}", "formats": ["glb"]},
                    "request_hash": f"{i:064x}",
                    "request_name": f"r{i}.toml",
                    "state": states[i % len(states)],
                    "priority": 0,
                    "attempts": 1,
                    "max_attempts": 3,
                    "cancel_requested": False,
                    "created_at": now - i,
                    "updated_at": now - i,
                    "finished_at": now - i + 1,
                    "error": error if states[i % len(states)] == "failed" else None,
                }
                for i in range(n)
            ],
        )
        s.execute(
            Stage.__table__.insert(),  # type: ignore[attr-defined]
            [
                {
                    "job_id": f"{i:08x}",
                    "name": name,
                    "seq": k,
                    "state": "done",
                    "progress": 1.0,
                    "message": "done",
                    "attempt": 1,
                    "metrics": {},
                }
                for i in range(n)
                for k, name in enumerate(STAGES)
            ],
        )
    ledger.close()
