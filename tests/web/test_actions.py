"""Actions from the dashboard, carried out by the real daemon."""

from __future__ import annotations

import io

import httpx
from conftest import Dashboard, wait_job
from daemon_harness import Home, wait_for
from PIL import Image

from pipeline import STAGES


def test_cancel_retry_and_reexport(daemon: Home, dashboard: Dashboard, api: httpx.Client) -> None:
    daemon.images("slow", {"features": {"hang": True}})
    daemon.drop("slow", project="slow")
    job = wait_job(api, "slow", "running")
    assert api.post(f"/api/jobs/{job['id']}/retry").status_code == 409  # still running
    r = api.post(f"/api/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelling"
    wait_job(api, "slow", "cancelled", timeout=20)

    daemon.images("mesh")
    daemon.drop("mesh", project="mesh")
    done = wait_job(api, "mesh", "succeeded")
    runs_before = daemon.stage_runs(done["id"])
    r = api.post(f"/api/jobs/{done['id']}/retry", json={"from_stage": "meshing"})
    assert r.status_code == 200 and r.json()["stages"][0] == "meshing"
    assert api.post(f"/api/jobs/{done['id']}/retry", json={"from_stage": "x"}).status_code == 400
    wait_job(api, "mesh", "succeeded")
    again = daemon.stage_runs(done["id"])[len(runs_before) :]
    assert again == list(STAGES[STAGES.index("meshing") :])

    r = api.post(f"/api/jobs/{done['id']}/reexport", json={"formats": ["obj", "ply"]})
    assert r.status_code == 200 and r.json()["stages"] == ["export"]
    wait_job(api, "mesh", "succeeded")
    formats = {e["format"] for e in api.get(f"/api/jobs/{done['id']}").json()["exports"]}
    assert {"obj", "ply"} <= formats
    assert api.post(f"/api/jobs/{done['id']}/reexport", json={"formats": []}).status_code == 400


def test_new_jobs_from_a_folder_or_an_upload_are_request_files(
    daemon: Home, dashboard: Dashboard, api: httpx.Client
) -> None:
    folder = daemon.images("byfolder")
    r = api.post("/api/jobs", json={"images": str(folder), "project": "byfolder"})
    assert r.status_code == 202, r.text
    status = r.json()["status_url"]
    assert r.json()["request"].startswith("byfolder-") and r.json()["request"].endswith(".toml")
    wait_job(api, "byfolder", "succeeded")
    assert api.get(status).json()["status"] == "accepted"

    outside = api.post("/api/jobs", json={"images": "/etc"})
    assert outside.status_code == 400 and "outside the allowed folders" in outside.json()["detail"]

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 90, 200)).save(buf, "JPEG")
    files = [("photos", (f"p{i}.jpg", buf.getvalue(), "image/jpeg")) for i in range(3)]
    r = api.post("/api/uploads", files=files, data={"project": "uploaded"})
    assert r.status_code == 202, r.text
    assert r.json()["photos"] == 3
    job = wait_job(api, "uploaded", "succeeded")
    assert job["request_name"] == r.json()["request"]
    saved = sorted(p.name for p in (daemon.root / "uploads").rglob("*.jpg"))
    assert saved == ["p0.jpg", "p1.jpg", "p2.jpg"]

    # The same validation as any request: a second identical request is a duplicate.
    r = api.post("/api/jobs", json={"images": str(folder), "project": "byfolder"})
    req = r.json()["status_url"]

    def rejected() -> dict | None:
        s = api.get(req).json()
        return s if s["status"] == "rejected" else None

    assert "already" in wait_for(rejected, 20, 0.2)["error"]
