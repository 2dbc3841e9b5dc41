"""The dashboard in a real browser: Debian's Chromium driven by Playwright.

Playwright cannot download its own browsers here, so it drives /usr/bin/chromium
(`make test` installs it). Without it these tests skip, unless
DROPMESH_REQUIRE_BROWSER=1 (CI sets it), which makes a missing browser a failure.
Screenshots are kept in tests/artefacts/.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ARTEFACTS, Dashboard, wait_job
from daemon_harness import Home
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _require() -> None:
    missing = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "playwright is not installed (pip install -e '.[dev]')"
    if missing is None and not Path(CHROMIUM).exists():
        missing = "no Chromium at /usr/bin/chromium (apt-get install chromium)"
    if missing:
        if os.environ.get("DROPMESH_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser tests required: {missing}")
        pytest.skip(missing)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _require()
    from playwright.sync_api import sync_playwright

    args = ["--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--ignore-gpu-blocklist"]
    if os.geteuid() == 0:
        args.append("--no-sandbox")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=args)
        yield b
        b.close()


# Records every Notification the page creates, beside the real one.
RECORD_NOTIFICATIONS = """
(() => {
  const Real = window.Notification;
  window.__notifications = [];
  if (!Real) return;
  class Recording extends Real {
    constructor(title, opts) { super(title, opts); window.__notifications.push(title); }
  }
  window.Notification = Recording;
})();
"""


@pytest.fixture
def page(browser: Any, dashboard: Dashboard) -> Iterator[Any]:
    ctx = browser.new_context(base_url=dashboard.url, viewport={"width": 1400, "height": 900})
    ctx.grant_permissions(["notifications"], origin=dashboard.url)
    ctx.add_init_script(RECORD_NOTIFICATIONS)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert errors == [], errors


def shot(pg: Any, name: str, **kw: Any) -> Path:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTEFACTS / name
    (kw.pop("locator", None) or pg).screenshot(path=str(path), **kw)
    return path


def row(pg: Any, project: str) -> Any:
    return pg.locator("#jobs tbody tr", has=pg.locator("td.project", has_text=project))


def test_jobs_page_follows_a_job_to_done_live_and_notifies(daemon: Home, page: Any) -> None:
    page.goto("/")
    page.evaluate("window.__noReload = 1")
    page.wait_for_function("document.getElementById('live').textContent === 'live'")
    daemon.images("live", {"_all": {"sleep": 0.5}})
    daemon.drop("live", project="live")
    r = row(page, "live")
    r.wait_for(timeout=20000)
    stages_seen = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = r.locator(".state").text_content()
        stage = r.locator("td.stage").text_content()
        if stage and stage != "-":
            stages_seen.add(stage)
        if state == "running" and len(stages_seen) == 3:
            shot(page, "jobs-running.png")
        if state == "succeeded":
            break
        time.sleep(0.1)
    assert r.locator(".state").text_content() == "succeeded"
    assert r.locator(".pct").text_content().strip() == "100.0%"
    assert len(stages_seen) >= 3, stages_seen  # the stage column moved on, live
    assert page.evaluate("window.__noReload") == 1  # never reloaded
    page.wait_for_function("window.__notifications.length > 0", timeout=5000)
    assert page.evaluate("window.__notifications") == ["dropmesh: live is ready"]
    shot(page, "jobs-done.png")


def test_cancel_button_stops_a_running_job(daemon: Home, page: Any, dashboard: Dashboard) -> None:
    daemon.images("stuck", {"features": {"hang": True}})
    daemon.drop("stuck", project="stuck")
    page.goto("/")
    r = row(page, "stuck")
    r.locator(".state", has_text="running").wait_for(timeout=30000)
    r.locator("button.cancel").click()
    r.locator(".state", has_text="cancelled").wait_for(timeout=20000)
    with dashboard.client() as c:
        assert c.get("/api/jobs", params={"project": "stuck"}).json()["jobs"][0]["state"] == (
            "cancelled"
        )


def test_upload_creates_a_job(daemon: Home, page: Any, tmp_path: Path) -> None:
    files = []
    for i in range(3):
        p = tmp_path / f"photo{i}.jpg"
        Image.new("RGB", (32, 24), (40 * i, 120, 200)).save(p, "JPEG")
        files.append(str(p))
    page.goto("/")
    page.set_input_files("#photos", files)
    page.fill("#upload-form input[name=project]", "fromweb")
    page.click("#upload-btn")
    page.locator("#new-job-link").wait_for(timeout=30000)
    row(page, "fromweb").locator(".state", has_text="succeeded").wait_for(timeout=30000)


def _non_background(png: bytes) -> float:
    import numpy as np

    px = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3).astype(int)
    colours, counts = np.unique(px, axis=0, return_counts=True)
    bg = colours[counts.argmax()]
    return float((np.abs(px - bg).sum(axis=1) > 30).mean())


def test_3d_viewer_loads_the_glb(daemon: Home, page: Any, dashboard: Dashboard) -> None:
    daemon.images("cube")
    daemon.drop("cube", project="cube", formats=["glb", "obj"])
    with dashboard.client() as c:
        job = wait_job(c, "cube", "succeeded")
    page.goto(f"/jobs/{job['id']}")
    viewer = page.locator("model-viewer#viewer")
    viewer.wait_for()
    loaded = page.evaluate(
        """() => new Promise((resolve, reject) => {
            const mv = document.getElementById('viewer');
            if (mv.loaded) return resolve('already');
            mv.addEventListener('load', () => resolve('load'), { once: true });
            mv.addEventListener('error', (e) => reject(new Error(JSON.stringify(e.detail))));
            setTimeout(() => reject(new Error('no load event in 30 s')), 30000);
        })"""
    )
    assert loaded in ("load", "already")
    page.evaluate("document.getElementById('viewer').removeAttribute('auto-rotate')")
    page.wait_for_timeout(500)
    png = viewer.screenshot(path=str(ARTEFACTS / "viewer.png"))
    assert _non_background(png) > 0.02  # the cube is drawn, not an empty canvas
    downloads = page.locator("#downloads a")
    assert {d.text_content() for d in downloads.all()} >= {
        f"{job['id']}_textured_mesh_poisson.glb",
        f"{job['id']}_textured_mesh_poisson.obj",
    }
    page.locator("#log").filter(has_text="job succeeded").wait_for(timeout=10000)
    shot(page, "job-page.png", full_page=True)


def test_without_event_source_the_page_polls(
    daemon: Home, browser: Any, dashboard: Dashboard
) -> None:
    ctx = browser.new_context(base_url=dashboard.url)
    ctx.add_init_script("delete window.EventSource")
    pg = ctx.new_page()
    try:
        pg.goto("/")
        pg.wait_for_function("document.getElementById('live').textContent === 'polling'")
        daemon.images("polled")
        daemon.drop("polled", project="polled")
        row(pg, "polled").locator(".state", has_text="succeeded").wait_for(timeout=30000)
    finally:
        ctx.close()
