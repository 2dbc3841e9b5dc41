"""Service latencies: request pickup, `dropmesh status` on a big ledger, cancel.

Targets: pickup p95 < 300 ms, status < 0.5 s with 10,000 jobs, cancel p95 < 2 s.
Runs the real daemon (subprocess) with the fast fake pipeline of the test suite
(tests/fakepipeline.py, through tests.daemon_harness): these figures are the service's own
costs, without photogrammetry in them.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import seed_ledger, summary, write_results
from tests.daemon_harness import Home, wait_for

ROOT = Path(__file__).resolve().parent.parent


def _created_at(db: Path, project: str) -> float | None:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = con.execute("select created_at from jobs where project=?", (project,)).fetchone()
        return float(row[0]) if row else None
    finally:
        con.close()


def bench_pickup(root: Path, drops: int) -> dict[str, Any]:
    home = Home(root / "pickup")
    home.images("p")
    home.start()
    lat: list[float] = []
    try:
        for i in range(drops):
            name = f"p{i:04d}"
            path = home.inbox / f"{name}.toml"
            with open(path, "w") as f:
                f.write(f'project = "{name}"\nimages = "../photos/p"\n')
            t0 = time.time()  # the file is closed: from here the clock runs
            created = wait_for(lambda n=name: _created_at(home.root / "jobs.db", n), 30, 0.02)
            lat.append(created - t0)
    finally:
        home.stop()
    return {"seconds": summary(lat), "target_p95_s": 0.3}


def bench_status(root: Path, jobs: int) -> dict[str, Any]:
    """`dropmesh status` (the default listing), `--all` and `--json` on a ledger of `jobs`
    jobs, each timed from the command's start to its exit (output captured, as a script
    reads it), five runs each in turn; and beside them the floor every command pays:
    the interpreter starting and importing the CLI (`python -c "import daemon.cli"`)."""
    home = Home(root / "status")
    db = home.root / "jobs.db"
    seed_ledger(db, jobs, projects=500, states=["succeeded"] * 8 + ["failed", "cancelled"])
    runs: dict[str, list[str]] = {
        "startup_floor": ["-c", "import daemon.cli"],
        "status": ["-m", "daemon.cli", "status"],
        "status_all": ["-m", "daemon.cli", "status", "--all"],
        "status_json_all": ["-m", "daemon.cli", "status", "--json"],
    }
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(5):
        for label, args in runs.items():
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, *args],
                env=home.env,
                cwd=home.root,
                check=True,
                capture_output=True,
            )
            times[label].append(time.perf_counter() - t0)
    out: dict[str, Any] = {"jobs": jobs, **{label: summary(t) for label, t in times.items()}}
    out["target_s"] = 0.5
    return out


def bench_cancel(root: Path, runs: int) -> dict[str, Any]:
    home = Home(root / "cancel")
    home.images("c", {"features": {"sleep": 120, "steps": 120, "child": True}})
    home.start()
    lat: list[float] = []
    db = home.root / "jobs.db"
    try:
        for i in range(runs):
            name = f"c{i:03d}"
            home.drop(name, images="../photos/c", project=name)

            def stage_pid(n: str = name) -> int | None:
                con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
                try:
                    row = con.execute(
                        "select s.pid from stages s join jobs j on j.id=s.job_id "
                        "where j.project=? and s.name='features' and s.state='running' "
                        "and s.pid is not null",
                        (n,),
                    ).fetchone()
                    return int(row[0]) if row else None
                finally:
                    con.close()

            pid = wait_for(stage_pid, 60, 0.02)
            proc = psutil.Process(pid)
            wait_for(lambda p=proc: p.children(recursive=True), 30, 0.02)
            tree = [proc, *proc.children(recursive=True)]
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "daemon.cli", "cancel", name],
                env=home.env,
                check=True,
                capture_output=True,
            )
            wait_for(
                lambda t=tree: not any(p.is_running() and p.status() != "zombie" for p in t),
                30,
                0.005,
            )
            lat.append(time.perf_counter() - t0)
    finally:
        home.stop()
    return {"seconds": summary(lat), "target_p95_s": 2.0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--drops", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--cancels", type=int, default=20)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="dropmesh-bench-") as tmp:
        root = Path(tmp)
        results = {
            "pickup": bench_pickup(root, args.drops),
            "status": bench_status(root, args.jobs),
            "cancel": bench_cancel(root, args.cancels),
        }
    path = write_results("service", results)
    p, s, c = results["pickup"]["seconds"], results["status"], results["cancel"]["seconds"]
    print(f"pickup  p50 {p['p50'] * 1000:.0f} ms  p95 {p['p95'] * 1000:.0f} ms  (target < 300)")
    print(
        f"status  {s['status']['p50']:.2f} s with {s['jobs']} jobs; --all "
        f"{s['status_all']['p50']:.2f} s; --json of all {s['status_json_all']['p50']:.2f} s "
        f"(targets < 0.3, 0.5, 0.5); start-up and imports alone {s['startup_floor']['p50']:.2f} s"
    )
    print(f"cancel  p50 {c['p50']:.2f} s  p95 {c['p95']:.2f} s  (target < 2)")
    print(f"written to {path.relative_to(ROOT)}")
    os.environ.pop("DROPMESH_HOME", None)
    return results


if __name__ == "__main__":
    main()
