"""The dashboard's JSON API and live streams, against a real server and the real daemon."""

from __future__ import annotations

import io
import json
import zipfile

import httpx
from conftest import Dashboard, sse_events, wait_job
from daemon_harness import Home, wait_for

from daemon.ledger import Ledger
from pipeline import STAGES


def test_stream_follows_a_job_through_its_stages_to_done(
    daemon: Home, dashboard: Dashboard, api: httpx.Client
) -> None:
    daemon.images("fountain", {"_all": {"sleep": 0.4}})
    daemon.drop("fountain", project="fountain", formats=["glb", "ply"])
    seen: dict[str, set[str]] = {"states": set(), "stages": set()}

    def done(events: list[tuple[str, str]]) -> bool:
        name, data = events[-1]
        if name != "jobs":
            return False
        for j in json.loads(data):
            if j["project"] == "fountain":
                seen["states"].add(j["state"])
                if j["stage"]:
                    seen["stages"].add(j["stage"])
                if j["state"] == "succeeded":
                    return True
        return False

    events = sse_events(api, "/api/stream", done, timeout=60)
    assert events[0][0] == "hello"
    assert "running" in seen["states"] and "succeeded" in seen["states"]
    assert len(seen["stages"]) >= 3, seen  # several stages went by, live
    assert any(name == "events" for name, _ in events)

    job = wait_job(api, "fountain", "succeeded")
    assert job["progress"] == 1.0 and job["host"] and job["attempts"] == 1
    assert [s["name"] for s in job["stages"]] == list(STAGES)
    assert all(s["state"] == "done" for s in job["stages"])
    assert job["elapsed_s"] > 0

    one = api.get(f"/api/jobs/{job['id']}").json()
    assert {e["format"] for e in one["exports"]} == {"glb", "ply"}
    evs = api.get(f"/api/jobs/{job['id']}/events").json()["events"]
    assert evs[0]["kind"] == "queued" and evs[-1]["kind"] == "succeeded"
    assert api.get("/api/jobs/nope").status_code == 404

    # The previous system's API.
    listed = api.get("/api/project/fountain/available_exports").json()["exports"]
    glb = next(e for e in listed if e["format"] == "glb")
    assert set(glb) >= {"filename", "format", "size", "size_mb", "created_at", "download_url"}
    full = api.get(glb["download_url"])
    assert full.status_code == 200 and len(full.content) == glb["size"]
    assert full.content[:4] == b"glTF"
    part = api.get(glb["download_url"], headers={"Range": "bytes=0-3"})
    assert part.status_code == 206 and part.content == b"glTF"
    assert part.headers["content-range"].startswith("bytes 0-3/")
    assert api.get(f"/api/exports/{glb['id']}").content == full.content

    log = api.get(f"/api/jobs/{job['id']}/log")
    assert log.status_code == 200 and "stage export done" in log.text
    z = zipfile.ZipFile(io.BytesIO(api.get(f"/api/jobs/{job['id']}/zip").content))
    names = set(z.namelist())
    assert "job.log" in names and glb["filename"] in names and len(names) == 3

    # The pages render the job, and the OpenAPI schema lists the API.
    page = api.get("/")
    assert page.status_code == 200 and job["id"] in page.text
    jp = api.get(f"/jobs/{job['id']}")
    assert jp.status_code == 200 and "<model-viewer" in jp.text
    schema = api.get("/openapi.json").json()
    assert "/api/project/{project}/available_exports" in schema["paths"]
    assert "available_exports" in api.get("/api").text


def test_job_stream_sends_log_and_events(
    daemon: Home, dashboard: Dashboard, api: httpx.Client
) -> None:
    daemon.images("logs", {"_all": {"sleep": 0.2}})
    daemon.drop("logs", project="logs")
    job = wait_job(api, "logs")

    def finished(events: list[tuple[str, str]]) -> bool:
        logs = "".join(json.loads(d)["text"] for n, d in events if n == "log")
        states = [json.loads(d)["state"] for n, d in events if n == "job"]
        return "job succeeded" in logs and "succeeded" in states

    events = sse_events(api, f"/api/jobs/{job['id']}/stream", finished, timeout=60)
    kinds = {n for n, _ in events}
    assert {"job", "log", "events", "exports"} <= kinds


def _ledger_home(home: Home, n: int) -> list[str]:
    home.cfg_ledger = Ledger.open(f"sqlite:///{home.root / 'jobs.db'}", create=True)
    ids = []
    for i in range(n):
        project = "alpha" if i % 3 else "beta"
        job = home.cfg_ledger.create_job(
            project=project,
            spec={"formats": ["glb"]},
            request_hash=f"h{i}",
            request_name=f"r{i}.toml",
        )
        ids.append(job.id)
    return ids


def test_pages_and_filters(home: Home) -> None:
    ids = _ledger_home(home, 130)
    home.cfg_ledger.request_cancel(ids[0])
    d = Dashboard(home)
    try:
        with d.client() as c:
            first = c.get("/api/jobs", params={"per_page": 50}).json()
            assert first["total"] == 130 and first["pages"] == 3 and len(first["jobs"]) == 50
            third = c.get("/api/jobs", params={"per_page": 50, "page": 3}).json()
            assert len(third["jobs"]) == 30
            every = {
                j["id"]
                for p in (1, 2, 3)
                for j in c.get("/api/jobs", params={"per_page": 50, "page": p}).json()["jobs"]
            }
            assert every == set(ids)
            beta = c.get("/api/jobs", params={"project": "beta", "per_page": 200}).json()
            assert beta["total"] == 44 and {j["project"] for j in beta["jobs"]} == {"beta"}
            cancelled = c.get("/api/jobs", params={"state": "cancelled"}).json()
            assert [j["id"] for j in cancelled["jobs"]] == [ids[0]]
            assert c.get("/api/jobs", params={"state": "active"}).json()["total"] == 129
            assert c.get("/api/jobs", params={"state": "bogus"}).status_code == 400
            assert first["projects"] == ["alpha", "beta"]
            assert first["counts"] == {"queued": 129, "cancelled": 1}
            page = c.get("/", params={"project": "beta"})
            assert page.status_code == 200 and "44 job(s)" in page.text
    finally:
        d.stop()


def test_dashboard_keeps_working_across_a_daemon_restart(
    daemon: Home, dashboard: Dashboard, api: httpx.Client
) -> None:
    daemon.images("first")
    daemon.drop("first", project="first")
    wait_job(api, "first", "succeeded")
    daemon.stop()
    assert api.get("/api/jobs").status_code == 200
    daemon.start()
    daemon.images("second")
    daemon.drop("second", project="second")
    wait_job(api, "second", "succeeded")
    wait_for(lambda: api.get("/api/health").json()["counts"].get("succeeded") == 2)


def test_serves_a_postgresql_ledger(home: Home, pg_url: str) -> None:
    ledger = Ledger.open(pg_url, create=True)
    ids = [
        ledger.create_job(
            project=f"farm{i}", spec={}, request_hash=f"{i}", request_name="r.toml"
        ).id
        for i in range(3)
    ]
    ledger.request_cancel(ids[0])
    d = Dashboard(home, DROPMESH_LEDGER_URL=pg_url)
    try:
        with d.client(headers={"X-Dropmesh-Token": "local"}) as c:
            page = c.get("/api/jobs").json()
            assert page["total"] == 3 and page["counts"] == {"queued": 2, "cancelled": 1}
            assert c.get("/api/jobs", params={"project": "farm2"}).json()["jobs"][0]["id"] == ids[2]
            assert c.post(f"/api/jobs/{ids[1]}/cancel").json()["state"] == "cancelled"
            events = sse_events(c, "/api/stream", lambda evs: evs[-1][0] == "hello", timeout=20)
            assert json.loads(events[-1][1])["last_event"] > 0
    finally:
        d.stop()
        ledger.close()
