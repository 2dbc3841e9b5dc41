"""Claims on a shared ledger: claims per second and pickup latency with 1, 3 and 8 daemons.

Each daemon is a process running the daemon's claim path (Ledger.claim_next with a
lease, then the fenced success write), against PostgreSQL (a throwaway cluster on
loopback unless --url is given) and, for comparison, SQLite.

  throughput: N jobs queued up front; the daemons claim and finish them as fast as
              they can; claims/s = N / wall time.
  pickup:     a producer queues jobs at a steady rate while the daemons poll like the
              real one (claim, else wait 50 ms); latency = claimed_at - created_at.

Run: python -m bench.claims [--url postgresql+psycopg://...] [--jobs 600]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import summary, write_results
from daemon.ledger import Ledger
from daemon.states import JobState

ROOT = Path(__file__).resolve().parent.parent
DAEMONS = (1, 3, 8)
IDLE_WAIT_S = 0.05  # the daemon's main loop wait when there is nothing to do


def _daemon(url: str, name: str, stop: Any, out: Any) -> None:
    """Claim until the queue is empty (stop is None) or until `stop` is set."""
    led = Ledger.open(url)
    claimed: list[tuple[str, float]] = []
    while stop is None or not stop.is_set():
        job = led.claim_next(name, lease_s=30.0)
        if job is None:
            if stop is None:
                break  # throughput run: the queue is empty
            time.sleep(IDLE_WAIT_S)
            continue
        claimed.append((job.id, time.time() - job.created_at))
        led.transition(
            job.id, JobState.RUNNING, JobState.SUCCEEDED, token=job.lease_token, worker=None
        )
    led.close()
    out.put(claimed)


def _queue(led: Ledger, n: int, tag: str) -> None:
    for i in range(n):
        led.create_job(project=f"b{i}", spec={}, request_hash=f"{tag}{i}", request_name="b.toml")


def throughput(url: str, k: int, n: int) -> dict[str, Any]:
    led = Ledger.open(url, create=True)
    _queue(led, n, f"t{k}-")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_daemon, args=(url, f"bench:{i}:x", None, q)) for i in range(k)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    got = [c for _ in procs for c in q.get(timeout=600)]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    ids = [j for j, _ in got]
    assert len(ids) == n and len(set(ids)) == n, "a job was claimed twice or not at all"
    led.close()
    return {"jobs": n, "seconds": wall, "claims_per_s": n / wall}


def pickup(url: str, k: int, n: int, rate: float) -> dict[str, Any]:
    led = Ledger.open(url, create=True)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    stop = ctx.Event()
    procs = [ctx.Process(target=_daemon, args=(url, f"bench:{i}:x", stop, q)) for i in range(k)]
    for p in procs:
        p.start()
    time.sleep(2.0)  # let the daemons start
    t0 = time.monotonic()
    for i in range(n):
        led.create_job(project=f"l{i}", spec={}, request_hash=f"l{k}-{i}", request_name="l.toml")
        time.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))
    deadline = time.monotonic() + 120
    while led.count_by_state().get(JobState.QUEUED.value) and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    got = [c for _ in procs for c in q.get(timeout=600)]
    for p in procs:
        p.join()
    lat = [latency for _, latency in got]
    assert len(got) == n and len({j for j, _ in got}) == n
    led.close()
    return {"jobs": n, "rate_per_s": rate, "latency_s": summary(lat)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="PostgreSQL URL (default: a throwaway local cluster)")
    ap.add_argument("--jobs", type=int, default=600, help="jobs per throughput run")
    ap.add_argument("--pickup-jobs", type=int, default=100)
    ap.add_argument("--rate", type=float, default=20.0, help="jobs queued per second")
    ap.add_argument("--no-sqlite", action="store_true")
    args = ap.parse_args(argv)
    from tests.pgcluster import running_cluster, skip_reason

    results: dict[str, Any] = {"postgresql": {}, "sqlite": {}}
    with tempfile.TemporaryDirectory(prefix="dropmesh-bench-") as tmp:
        backends: list[tuple[str, Any]] = []
        if not args.no_sqlite:
            backends.append(("sqlite", lambda k, run: f"sqlite:///{tmp}/{run}-{k}.db"))
        if args.url:
            backends.append(("postgresql", lambda k, run: args.url))
            cluster_cm: Any = None
        else:
            reason = skip_reason()
            if reason:
                print(f"PostgreSQL left out: {reason}")
                cluster_cm = None
            else:
                cluster_cm = running_cluster()
                cluster = cluster_cm.__enter__()
                backends.append(("postgresql", lambda k, run: cluster.new_database()))
        try:
            for backend, url_for in backends:
                for k in DAEMONS:
                    results[backend][str(k)] = {
                        "throughput": throughput(url_for(k, "t"), k, args.jobs),
                        "pickup": pickup(url_for(k, "p"), k, args.pickup_jobs, args.rate),
                    }
        finally:
            if cluster_cm is not None:
                cluster_cm.__exit__(None, None, None)
    path = write_results("claims", results)
    print(f"{'backend':<11} {'daemons':>7} {'claims/s':>9} {'pickup p50':>11} {'p95':>8}")
    for backend, by_k in results.items():
        for k, r in by_k.items():
            lat = r["pickup"]["latency_s"]
            print(
                f"{backend:<11} {k:>7} {r['throughput']['claims_per_s']:>9.0f} "
                f"{lat['p50'] * 1000:>8.0f} ms {lat['p95'] * 1000:>5.0f} ms"
            )
    print(
        f"(pickup: {args.rate:.0f} jobs/s queued; daemons poll every {IDLE_WAIT_S * 1000:.0f} ms)"
    )
    print(f"written to {path.relative_to(ROOT)}")
    return results


if __name__ == "__main__":
    main()
