"""The real daemon as a subprocess, with the fast test pipeline."""

from __future__ import annotations

import time

import psutil
import trimesh
from daemon_harness import Home, wait_for

from pipeline import STAGES


def test_request_becomes_job_with_export(home: Home) -> None:
    home.images("fountain")
    home.start()
    home.drop("fountain", formats=["glb", "obj"])
    job = home.wait_state("fountain", "succeeded")
    assert job["progress"] == 1.0
    assert [s["state"] for s in job["stages"]] == ["done"] * len(STAGES)
    assert len(job["exports"]) == 2
    for path in job["exports"]:
        mesh = trimesh.load(path, force="mesh")
        assert len(mesh.faces) == 12
    # the request moved out of the inbox into the job's folder
    assert not (home.inbox / "fountain.toml").exists()
    assert (home.workspaces / job["id"] / "request.toml").exists()
    assert home.stage_runs(job["id"]) == list(STAGES)
    exports = home.cli("exports", "--json").stdout
    assert "fountain" in exports and "textured_mesh_poisson.glb" in exports


def test_transient_failures_retry_then_succeed(home: Home) -> None:
    home.images("flaky", {"matching": {"fail": 2, "how": "segv"}})
    home.start()
    home.drop("flaky")
    job = home.wait_state("flaky", "succeeded")
    assert job["attempts"] == 3
    runs = home.stage_runs(job["id"])
    assert runs.count("matching") == 3
    assert runs.count("features") == 1  # finished stages are not redone
    assert "SIGSEGV" in home.log()


def test_permanent_failure_fails_at_once(home: Home) -> None:
    home.images("bad", {"mapping": {"fail": -1, "how": "permanent"}})
    home.start()
    home.drop("bad")
    job = home.wait_state("bad", "failed")
    assert job["attempts"] == 1
    assert "mapping" in job["error"] and "cannot go on" in job["error"]


def test_transient_failures_give_up_after_max_attempts(home: Home) -> None:
    home.images("doomed", {"stereo": {"fail": -1, "how": "memory"}})
    home.start()
    home.drop("doomed")
    job = home.wait_state("doomed", "failed")
    assert job["attempts"] == 3
    assert "out of memory" in job["error"] and "gave up after 3 attempts" in job["error"]


def test_cancel_running_stage_kills_process_tree(home: Home) -> None:
    home.images("long", {"features": {"sleep": 60, "steps": 60, "child": True}})
    home.images("other")
    home.start()
    home.drop("long")
    j = home.wait_state("long", "running")
    wait_for(lambda: (home.job("long") or {}).get("stage") == "features")
    me = psutil.Process(home.proc.pid)  # type: ignore[union-attr]
    wait_for(lambda: any(p.name() == "sleep" for p in me.children(recursive=True)))
    # the stage's process tree: below the fork server, not the daemon's own helpers
    tree = [p for p in me.children(recursive=True) if p.ppid() != me.pid]
    home.cli("cancel", "long")
    home.wait_state("long", "cancelled", timeout=10)
    wait_for(lambda: not any(p.is_running() and p.status() != "zombie" for p in tree), 5)
    assert not (home.workspaces / j["id"] / "features").exists()
    home.drop("other")
    home.wait_state("other", "succeeded")


def test_kill9_resumes_at_first_unfinished_stage(home: Home) -> None:
    home.images("resume", {"stereo": {"sleep": 30, "steps": 30}})
    home.start()
    home.drop("resume")
    wait_for(lambda: (home.job("resume") or {}).get("stage") == "stereo")
    job_id = home.job("resume")["id"]  # type: ignore[index]
    descendants = psutil.Process(home.proc.pid).children(recursive=True)  # type: ignore[union-attr]
    assert descendants
    home.kill9()
    # the stage child, the fork server and every helper die with the daemon
    wait_for(lambda: not any(p.is_running() and p.status() != "zombie" for p in descendants), 10)
    (home.root / "photos" / "resume" / "fake.json").write_text("{}")
    home.start()
    job = home.wait_state("resume", "succeeded")
    runs = home.stage_runs(job_id)
    assert runs.count("stereo") == 2
    assert all(runs.count(s) == 1 for s in STAGES if s != "stereo")
    assert job["attempts"] == 1


def test_sigterm_stops_quickly_and_job_resumes(home: Home) -> None:
    home.images("term", {"meshing": {"sleep": 30, "steps": 30}})
    home.start()
    home.drop("term")
    wait_for(lambda: (home.job("term") or {}).get("stage") == "meshing")
    t0 = time.monotonic()
    assert home.stop() == 0
    assert time.monotonic() - t0 < 5
    assert home.job("term")["state"] == "queued"  # type: ignore[index]
    (home.root / "photos" / "term" / "fake.json").write_text("{}")
    home.start()
    home.wait_state("term", "succeeded")


def test_bad_requests_rejected_daemon_keeps_running(home: Home) -> None:
    home.images("good")
    home.start()
    home.drop("unknown", images="../photos/good", colour="red")
    home.drop("missing", images="../photos/nope")
    home.drop("escape", images="/etc")
    (home.inbox / "garbage.toml").write_bytes(b"\x00\x01\x02binary")
    (home.inbox / "empty.json").write_bytes(b"")
    rejected = home.inbox / "rejected"
    wait_for(lambda: len(list(rejected.glob("*.error.txt"))) == 5, 15)
    assert "unknown key 'colour'" in (rejected / "unknown.toml.error.txt").read_text()
    assert "does not exist" in (rejected / "missing.toml.error.txt").read_text()
    assert "outside the allowed folders" in (rejected / "escape.toml.error.txt").read_text()
    assert "not a text file" in (rejected / "garbage.toml.error.txt").read_text()
    assert "empty" in (rejected / "empty.json.error.txt").read_text()
    home.drop("good")
    home.wait_state("good", "succeeded")
    assert home.proc is not None and home.proc.poll() is None


def test_same_request_twice_runs_once(home: Home) -> None:
    home.images("twice")
    home.start()
    home.drop("twice")
    home.wait_state("twice", "succeeded")
    home.drop("twice")
    rejected = home.inbox / "rejected" / "twice.toml.error.txt"
    wait_for(rejected.exists)
    assert "already submitted" in rejected.read_text()
    home.drop("twice", images="../photos/twice", force=True)
    wait_for(lambda: len(home.status()) == 2)


def test_retry_new_format_reuses_dense_result(home: Home) -> None:
    home.images("again")
    home.start()
    home.drop("again")
    job = home.wait_state("again", "succeeded")
    home.cli("retry", job["id"], "--format", "ply")
    wait_for(
        lambda: home.job("again")["state"] == "queued" or len(home.job("again")["exports"]) == 2
    )  # type: ignore[index]
    job = home.wait_state("again", "succeeded")
    assert home.stage_runs(job["id"]).count("export") == 2
    assert home.stage_runs(job["id"]).count("stereo") == 1
    assert any(p.endswith(".ply") for p in job["exports"])
