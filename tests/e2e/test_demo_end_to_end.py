"""The whole product: `dropmesh demo` drops a request, the real daemon runs the real
pipeline, a GLB is published and a notification reaches a real D-Bus session bus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import trimesh
from daemon_harness import Home
from dbus_notifications import NotificationBus

from pipeline import STAGES
from pipeline.devices import cuda_device_count


def test_demo_request_gives_glb_and_notification(
    tmp_path: Path, notification_bus: NotificationBus
) -> None:
    home = Home(tmp_path / "home", env=notification_bus.env)
    try:
        # the product's own device choice, not the harness's "cpu": the GPU where pycolmap
        # sees one, else the CPU
        home.start(DROPMESH_TEST_PIPELINE="pipeline.stages:run_stage", DROPMESH_DEVICE="auto")
        expected_device = "gpu" if cuda_device_count() > 0 else "cpu"
        home.cli("demo", "--images", "16", "--quality", "low")
        job = home.wait_state("demo", "succeeded", "failed", timeout=600)
        assert job["state"] == "succeeded", job["error"]
        assert [s["state"] for s in job["stages"]] == ["done"] * len(STAGES)
        stages = {s["name"]: s for s in job["stages"]}
        assert stages["mapping"]["metrics"]["registered"] == 16
        assert stages["stereo"]["device"] == expected_device

        glb = Path(next(p for p in job["exports"] if p.endswith(".glb")))
        assert glb.name == f"{job['id']}_textured_mesh_poisson.glb"
        assert glb.parent == home.results / "demo"
        mesh = trimesh.load(glb, force="mesh")
        assert len(mesh.faces) > 5000
        assert isinstance(mesh.visual, trimesh.visual.TextureVisuals)
        texture = np.asarray(mesh.visual.material.baseColorTexture.convert("RGB"))
        assert texture.std() > 10  # the photos' colours baked in, not one flat fill

        report = json.loads(next(glb.parent.glob("*_report.json")).read_text())
        assert report["device"] == expected_device

        got = notification_bus.wait_for(1, timeout=20)
        assert len(got) == 1
        assert "demo is ready" in got[0]["summary"] and glb.name in got[0]["body"]
    finally:
        home.stop()
