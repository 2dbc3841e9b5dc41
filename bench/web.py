"""The dashboard: server time for the jobs page and its JSON with 10,000 jobs in the ledger,
and Server-Sent Events fan-out to 50 clients while a job runs, with the daemon's request
pickup latency measured beside it (without and with those clients).

Targets: jobs JSON p95 < 200 ms; pickup latency unchanged within noise.
Loopback only; every loop is bounded. Runs the real daemon with the fast test pipeline.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import seed_ledger, summary, write_results
from tests.daemon_harness import Home, wait_for

ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(home: Home) -> tuple[subprocess.Popen[bytes], str]:
    port = _port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "serve", "--port", str(port)],
        env=home.env,
        cwd=home.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 30, 0.1)
    return proc, url


def _seed(home: Home, n: int) -> None:
    seed_ledger(
        home.root / "jobs.db",
        n,
        projects=200,
        states=["succeeded"] * 7 + ["failed", "cancelled", "queued"],
        age_s=86400,
        error="stage mapping: too few photos registered",
    )


def bench_pages(url: str, runs: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cases = {
        "jobs_json": "/api/jobs",
        "jobs_json_page_100": "/api/jobs?page=100",
        "jobs_json_state_failed": "/api/jobs?state=failed",
        "jobs_json_project": "/api/jobs?project=project7",
        "jobs_page_html": "/",
    }
    with httpx.Client(base_url=url, timeout=30) as c:
        for label, path in cases.items():
            assert c.get(path).status_code == 200  # warm
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                r = c.get(path)
                times.append(time.perf_counter() - t0)
                assert r.status_code == 200
            out[label] = summary(times)
    out["target_p95_s"] = 0.2
    return out


def _pickup(home: Home, drops: int, tag: str) -> list[float]:
    import sqlite3

    lat = []
    for i in range(drops):
        name = f"{tag}{i:03d}"
        with open(home.inbox / f"{name}.toml", "w") as f:
            f.write(f'project = "{name}"\nimages = "../photos/p"\n')
        t0 = time.time()

        def created(n: str = name) -> float | None:
            con = sqlite3.connect(f"file:{home.root / 'jobs.db'}?mode=ro", uri=True, timeout=5)
            try:
                row = con.execute("select created_at from jobs where project=?", (n,)).fetchone()
                return float(row[0]) if row else None
            finally:
                con.close()

        lat.append(wait_for(created, 30, 0.01) - t0)
        time.sleep(0.3)
    return lat


def bench_fanout(root: Path, clients: int, drops: int) -> dict[str, Any]:
    home = Home(root / "fanout")
    home.env["DROPMESH_HTTP"] = ""
    home.images("p")
    home.images("watched", {"_all": {"sleep": 0.3}})
    home.start()
    proc, url = _serve(home)
    try:
        alone = _pickup(home, drops, "a")
        seen: list[float] = []
        updates = [0] * clients
        stop = threading.Event()
        ready = threading.Barrier(clients + 1, timeout=60)

        def client(k: int) -> None:
            with (
                httpx.Client(base_url=url, timeout=httpx.Timeout(10, read=5)) as c,
                c.stream("GET", "/api/stream") as r,
            ):
                name = ""
                first = True
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        name = line[6:].strip()
                        continue
                    if not line.startswith("data:"):
                        continue
                    if first:
                        first = False
                        ready.wait()
                    if name == "jobs":
                        updates[k] += 1
                        for j in json.loads(line[5:]):
                            if j["project"] == "watched" and j["state"] == "succeeded":
                                seen.append(time.time())
                                return
                    if stop.is_set():
                        return

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
        for t in threads:
            t.start()
        ready.wait()
        home.drop("watched", project="watched")
        with_clients = _pickup(home, drops, "b")
        done = home.wait_state("watched", "succeeded", timeout=60)
        deadline = time.monotonic() + 30
        for t in threads:
            t.join(max(0.1, deadline - time.monotonic()))
        stop.set()
        finished = datetime_ts(done["finished_at"])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        home.stop()
    return {
        "clients": clients,
        "clients_saw_done": len(seen),
        "updates_per_client": summary([float(u) for u in updates]),
        "delay_after_finish_s": summary([max(0.0, s - finished) for s in seen]),
        "pickup_alone_s": summary(alone),
        "pickup_with_clients_s": summary(with_clients),
    }


def datetime_ts(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--drops", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="2,000 jobs, 10 runs, 10 clients")
    args = ap.parse_args(argv)
    if args.quick:
        args.jobs, args.runs, args.clients, args.drops = 2000, 10, 10, 5
    with tempfile.TemporaryDirectory(prefix="dropmesh-bench-web-") as tmp:
        root = Path(tmp)
        home = Home(root / "pages")
        _seed(home, args.jobs)
        proc, url = _serve(home)
        try:
            pages = bench_pages(url, args.runs)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        pages["jobs"] = args.jobs
        fanout = bench_fanout(root, args.clients, args.drops)
    results = {"pages": pages, "fanout": fanout}
    path = write_results("web", results)
    for label in ("jobs_json", "jobs_json_page_100", "jobs_json_state_failed", "jobs_page_html"):
        s = pages[label]
        print(
            f"{label:24s} p50 {s['p50'] * 1000:5.1f} ms  p95 {s['p95'] * 1000:5.1f} ms "
            f"({args.jobs} jobs; target p95 < 200 ms)"
        )
    f = fanout
    print(
        f"SSE fan-out: {f['clients_saw_done']}/{f['clients']} clients saw the job finish, "
        f"p95 {f['delay_after_finish_s']['p95']:.2f} s after the ledger said so"
    )
    print(
        f"pickup p50/p95: alone {f['pickup_alone_s']['p50'] * 1000:.0f}/"
        f"{f['pickup_alone_s']['p95'] * 1000:.0f} ms, with {f['clients']} clients "
        f"{f['pickup_with_clients_s']['p50'] * 1000:.0f}/"
        f"{f['pickup_with_clients_s']['p95'] * 1000:.0f} ms"
    )
    print(f"written to {path.relative_to(ROOT)}")
    return results


if __name__ == "__main__":
    main()
