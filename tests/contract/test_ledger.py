"""Ledger behaviour every backend must share."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import sqlite3
import time
from pathlib import Path

import pytest

from daemon.ledger import ExportRecord, Fenced, Ledger, NotFound
from daemon.ledgerfile import LedgerError
from daemon.states import JobState, StageState, TransitionError
from pipeline import STAGES


def make(ledger: Ledger, project: str = "p", priority: int = 0, h: str = "h") -> str:
    return ledger.create_job(
        project=project,
        spec={"project": project},
        request_hash=h,
        request_name=f"{project}.toml",
        priority=priority,
    ).id


def test_new_job_is_queued_with_pending_stages(ledger: Ledger) -> None:
    job_id = make(ledger)
    job = ledger.get(job_id)
    assert job.state == "queued" and job.attempts == 0
    assert [s.name for s in ledger.stages(job_id)] == list(STAGES)
    assert {s.state for s in ledger.stages(job_id)} == {"pending"}
    assert ledger.events(job_id)[0].kind == "queued"


def test_guarded_transition_has_one_winner(ledger: Ledger) -> None:
    job_id = make(ledger)
    assert ledger.transition(job_id, JobState.QUEUED, JobState.RUNNING)
    assert not ledger.transition(job_id, JobState.QUEUED, JobState.RUNNING)
    with pytest.raises(TransitionError):
        ledger.transition(job_id, JobState.RUNNING, JobState.RUNNING)


def test_claim_order_priority_then_age(ledger: Ledger) -> None:
    a = make(ledger, "a")
    time.sleep(0.01)
    b = make(ledger, "b", priority=5)
    time.sleep(0.01)
    c = make(ledger, "c")
    order = [ledger.claim_next("w").id for _ in range(3)]  # type: ignore[union-attr]
    assert order == [b, a, c]
    assert ledger.claim_next("w") is None


def test_waiting_job_is_claimed_only_when_due(ledger: Ledger) -> None:
    job_id = make(ledger)
    ledger.claim_next("w")
    ledger.schedule_retry(job_id, "features", "boom", delay_s=60)
    assert ledger.claim_next("w") is None
    assert ledger.claim_next("w", now=time.time() + 61).id == job_id  # type: ignore[union-attr]
    assert ledger.get(job_id).attempts == 2


def _claim_worker(url: str, name: str, out: mp.Queue) -> None:  # type: ignore[type-arg]
    led = Ledger.open(url)
    got = []
    while (job := led.claim_next(name)) is not None:
        got.append(job.id)
    out.put(got)


def test_concurrent_claims_never_double_claim(ledger: Ledger, ledger_url: str) -> None:
    ids = {make(ledger, f"p{i}", h=str(i)) for i in range(40)}
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_claim_worker, args=(ledger_url, f"w{i}", q)) for i in range(4)]
    for p in procs:
        p.start()
    claimed = [j for _ in procs for j in q.get(timeout=60)]
    for p in procs:
        p.join()
    assert sorted(claimed) == sorted(ids)


def test_cancel_queued_and_running(ledger: Ledger) -> None:
    queued = make(ledger, "a")
    assert ledger.request_cancel(queued) == "cancelled"
    running = make(ledger, "b", h="b")
    ledger.claim_next("w")
    assert ledger.request_cancel(running) == "cancelling"
    assert ledger.cancel_requested([running, queued]) == {running}
    assert ledger.get(running).state == "running"


def test_a_job_flagged_while_running_is_cancelled_instead_of_claimed(ledger: Ledger) -> None:
    flagged = make(ledger, "a", priority=1)
    other = make(ledger, "b", h="b")
    assert ledger.claim_next("a:1:x").id == flagged  # type: ignore[union-attr]
    assert ledger.request_cancel(flagged) == "cancelling"
    assert ledger.recover(stale_after_s=-1) == [flagged]  # its daemon died before acting
    got = ledger.claim_next("b:2:y")
    assert got is not None and got.id == other
    job = ledger.get(flagged)
    assert (job.state, job.cancel_requested, job.lease_token) == ("cancelled", False, 1)
    assert ledger.events(flagged)[-1].message == "cancelled (requested while it was running)"


def test_success_records_exports_and_one_notification(ledger: Ledger, tmp_path: Path) -> None:
    job_id = make(ledger)
    ledger.claim_next("w")
    f = tmp_path / "m.glb"
    f.write_bytes(b"glTF" + b"\0" * 100)
    ledger.stage_started(job_id, "export", pid=1, attempt=1)
    ledger.stage_finished(
        job_id,
        "export",
        metrics={},
        device="cpu",
        peak_rss_mb=10.0,
        exports=[ExportRecord(f, "glb")],
        last=True,
    )
    assert ledger.get(job_id).state == "succeeded"
    ((e, project),) = ledger.exports()
    assert (e.bytes, e.format, project) == (104, "glb", "p") and len(e.sha256) == 64
    pending = ledger.pending_notifications()
    assert len(pending) == 1 and "m.glb" in pending[0].body
    ledger.mark_notified(pending[0].id, shown=True)
    ledger.mark_notified(pending[0].id, shown=True)
    assert ledger.pending_notifications() == []
    assert ledger.exports()[0][0].notified_at is not None


def test_exports_measured_by_the_stage_are_recorded_as_given(
    ledger: Ledger, tmp_path: Path
) -> None:
    job_id = make(ledger)
    job = ledger.claim_next("w")
    assert job is not None
    gone = tmp_path / "m.glb"  # never written: a measured export is not read again
    measured = ExportRecord(gone, "glb", size=7, sha256="ab" * 32)
    unmeasured = tmp_path / "m.ply"
    unmeasured.write_bytes(b"ply\n")
    ledger.stage_finished(
        job_id,
        "export",
        metrics={},
        device="cpu",
        peak_rss_mb=None,
        exports=[measured, ExportRecord(unmeasured, "ply")],
        last=True,
        token=job.lease_token,
    )
    got = {Path(e.path).name: (e.bytes, e.sha256) for e, _ in ledger.exports()}
    assert got == {"m.glb": (7, "ab" * 32), "m.ply": (4, hashlib.sha256(b"ply\n").hexdigest())}
    (note,) = ledger.pending_notifications()
    assert note.kind == "exported" and note.title == "dropmesh: p is ready"
    assert note.body.splitlines()[:2] == ["m.glb, m.ply", f"in {tmp_path}"]


def test_an_unreadable_export_changes_nothing(ledger: Ledger, tmp_path: Path) -> None:
    job_id = make(ledger)
    job = ledger.claim_next("w")
    assert job is not None
    with pytest.raises(FileNotFoundError):
        ledger.stage_finished(
            job_id,
            "export",
            metrics={},
            device="cpu",
            peak_rss_mb=None,
            exports=[ExportRecord(tmp_path / "missing.glb", "glb")],
            last=True,
            token=job.lease_token,
        )
    assert ledger.get(job_id).state == "running" and ledger.exports() == []
    assert ledger.pending_notifications() == []


def test_failure_and_rejection_are_notified_with_their_reason(ledger: Ledger) -> None:
    job_id = make(ledger, "fountain")
    ledger.claim_next("w")
    assert ledger.fail(job_id, "mapping", "too few images registered")
    assert not ledger.fail(job_id, "mapping", "again")  # no longer running: no second one
    ledger.reject("bad.toml", "images: folder is empty")
    ledger.reject("dup.toml", "already queued", notify=False)
    assert [(n.kind, n.job_id, n.title, n.body) for n in ledger.pending_notifications()] == [
        ("failed", job_id, "dropmesh: fountain failed", "stage mapping: too few images registered"),
        ("rejected", None, "dropmesh: request bad.toml rejected", "images: folder is empty"),
    ]
    assert [e.kind for e in ledger.events(None)][-2:] == ["rejected", "rejected"]


def test_retry_from_stage_resets_later_stages(ledger: Ledger) -> None:
    job_id = make(ledger)
    ledger.claim_next("w")
    for name in STAGES[:4]:
        ledger.stage_started(job_id, name, pid=1, attempt=1)
        ledger.stage_finished(job_id, name, metrics={}, device="cpu", peak_rss_mb=None)
    ledger.fail(job_id, "undistort", "boom")
    assert ledger.get(job_id).state == "failed"
    assert ledger.retry(job_id) == list(STAGES[4:])
    assert ledger.get(job_id).state == "queued"
    with pytest.raises(ValueError, match="only finished jobs"):
        ledger.retry(job_id)
    ledger.request_cancel(job_id)
    rerun = ledger.retry(job_id, from_stage="matching", formats=["obj"])
    assert rerun == list(STAGES[2:])
    assert ledger.get(job_id).spec["formats"] == ["obj"]
    states = {s.name: s.state for s in ledger.stages(job_id)}
    assert states["features"] == "done" and states["matching"] == "pending"


def test_recover_requeues_jobs_of_a_dead_daemon(ledger: Ledger) -> None:
    job_id = make(ledger)
    ledger.claim_next("old-daemon")
    ledger.stage_started(job_id, "ingest", pid=999999, attempt=1)
    assert ledger.recover(worker="new-daemon") == [job_id]
    job = ledger.get(job_id)
    assert job.state == "queued" and job.attempts == 0
    assert ledger.stages(job_id)[0].state == StageState.PENDING.value


def test_resolve_by_id_prefix_and_project(ledger: Ledger) -> None:
    job_id = make(ledger, "fountain")
    assert ledger.resolve(job_id)[0].id == job_id
    assert ledger.resolve(job_id[:5])[0].id == job_id
    assert ledger.resolve("fountain")[0].id == job_id
    with pytest.raises(NotFound, match="no job or project"):
        ledger.resolve("nothing")


def test_cli_open_refuses_missing_ledger(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no ledger at"):
        Ledger.open(f"sqlite:///{tmp_path / 'none.db'}")


def test_corrupt_ledger_refused_with_hint(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError, match="corrupt"):
        Ledger.open(f"sqlite:///{db}", create=True)
    assert db.read_bytes().startswith(b"this is not")


def test_foreign_database_is_not_overwritten(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    con = sqlite3.connect(db)
    con.execute("create table photos (id integer)")
    con.commit()
    con.close()
    with pytest.raises(LedgerError, match="not a dropmesh ledger"):
        Ledger.open(f"sqlite:///{db}", create=True)


def test_schema_head_constant_matches_migrations() -> None:
    from daemon import db

    assert db.head_revision() == db.SCHEMA_HEAD


# -- leases, fencing, several daemons -------------------------------------------------


def test_each_claim_gets_a_larger_fencing_token(ledger: Ledger) -> None:
    job_id = make(ledger)
    first = ledger.claim_next("host-a:1:aaa")
    assert first is not None and first.lease_token == 1 and first.host == "host-a"
    assert first.lease_expires_at is not None and first.lease_expires_at > time.time()
    time.sleep(0.02)
    assert ledger.recover(stale_after_s=0.01) == [job_id]
    second = ledger.claim_next("host-b:2:bbb")
    assert second is not None and second.id == job_id and second.lease_token == 2


def test_stale_token_writes_are_refused(ledger: Ledger, tmp_path: Path) -> None:
    job_id = make(ledger)
    old = ledger.claim_next("a:1:x")
    assert old is not None
    ledger.stage_started(job_id, "ingest", pid=11, attempt=1, token=old.lease_token)
    time.sleep(0.02)
    assert ledger.recover(stale_after_s=0.01) == [job_id]  # lease a expired
    new = ledger.claim_next("b:2:y")
    assert new is not None and new.lease_token > old.lease_token
    ledger.stage_started(job_id, "ingest", pid=22, attempt=1, token=new.lease_token)
    before = (ledger.get(job_id), ledger.stages(job_id), len(ledger.events(job_id)))
    t = old.lease_token
    f = tmp_path / "m.glb"
    f.write_bytes(b"glTF")
    stale_writes = [
        lambda: ledger.stage_started(job_id, "features", pid=1, attempt=1, token=t),
        lambda: ledger.stage_progress(job_id, "ingest", 0.9, "late", token=t),
        lambda: ledger.stage_finished(
            job_id, "ingest", metrics={}, device="cpu", peak_rss_mb=None, token=t
        ),
        lambda: ledger.stage_finished(
            job_id,
            "export",
            metrics={},
            device="cpu",
            peak_rss_mb=None,
            exports=[ExportRecord(f, "glb")],
            last=True,
            token=t,
        ),
        lambda: ledger.stage_failed(job_id, "ingest", "late", StageState.FAILED, token=t),
        lambda: ledger.fail(job_id, "ingest", "late", token=t),
        lambda: ledger.schedule_retry(job_id, "ingest", "late", 1.0, token=t),
        lambda: ledger.transition(job_id, JobState.RUNNING, JobState.CANCELLED, token=t),
        lambda: ledger.release(job_id, t, "late"),
    ]
    for write in stale_writes:
        with pytest.raises(Fenced):
            write()
    assert ledger.heartbeat({job_id: t}, "a:1:x") == {job_id}
    job, stages, n_events = before
    after = ledger.get(job_id)
    assert (after.state, after.worker, after.lease_token) == ("running", "b:2:y", new.lease_token)
    assert [(s.state, s.pid, s.progress) for s in ledger.stages(job_id)] == [
        (s.state, s.pid, s.progress) for s in stages
    ]
    assert len(ledger.events(job_id)) == n_events and ledger.exports() == []
    # the current owner still writes
    assert ledger.heartbeat({job_id: new.lease_token}, "b:2:y") == set()
    ledger.stage_progress(job_id, "ingest", 0.5, "half", token=new.lease_token)
    assert ledger.stages(job_id)[0].progress == 0.5


def test_recover_by_staleness_leaves_live_leases(ledger: Ledger) -> None:
    live, dead = make(ledger, "live", h="1"), make(ledger, "dead", h="2")
    a = ledger.claim_next("a:1:x")
    b = ledger.claim_next("b:2:y")
    assert a is not None and b is not None
    time.sleep(0.3)
    ledger.heartbeat({a.id: a.lease_token}, "a:1:x")
    assert ledger.recover(stale_after_s=0.2) == [b.id]
    assert {ledger.get(live).state, ledger.get(dead).state} == {"running", "queued"}
    assert ledger.recover(dead_workers=["a:1:x"]) == [a.id]


def test_claim_leaves_jobs_whose_next_stage_is_skipped(ledger: Ledger) -> None:
    job_id = make(ledger)
    job = ledger.claim_next("gpu:1:x")
    assert job is not None
    ledger.stage_started(job_id, "ingest", pid=1, attempt=1, token=job.lease_token)
    ledger.stage_finished(
        job_id, "ingest", metrics={}, device="cpu", peak_rss_mb=None, token=job.lease_token
    )
    assert ledger.release(job_id, job.lease_token, "features wants a GPU")
    assert ledger.get(job_id).attempts == 0
    assert ledger.claim_next("cpu:2:y", skip_next={"features", "matching"}) is None
    other = make(ledger, "other", h="o")
    got = ledger.claim_next("cpu:2:y", skip_next={"features", "matching"})
    assert got is not None and got.id == other  # its next stage is ingest
    got = ledger.claim_next("gpu:1:x")
    assert got is not None and got.id == job_id and got.lease_token == 2


def test_request_key_makes_intake_idempotent(ledger: Ledger) -> None:
    from daemon.ledger import RequestTaken, request_key

    key = request_key("h", "a.toml", 123, 45)
    first = ledger.create_job(
        project="a", spec={}, request_hash="h", request_name="a.toml", request_key=key
    )
    with pytest.raises(RequestTaken):
        ledger.create_job(
            project="a", spec={}, request_hash="h", request_name="a.toml", request_key=key
        )
    assert [j.id for j in ledger.find_by_hash("h")] == [first.id]
    assert ledger.find_by_key(key) is not None


def test_workers_register_heartbeat_and_gpu_presence(ledger: Ledger) -> None:
    ledger.register_worker("cpu-host:10:aa", cuda_devices=0, max_jobs=2, gpu_stages="prefer")
    assert not ledger.gpu_worker_alive(30)
    ledger.register_worker("gpu-host:11:bb", cuda_devices=2, max_jobs=1, gpu_stages="any")
    assert ledger.gpu_worker_alive(30)
    assert not ledger.gpu_worker_alive(30, now=time.time() + 60)
    assert ledger.worker_heartbeat("gpu-host:11:bb")
    ws = {w.id: w for w in ledger.workers()}
    assert ws["gpu-host:11:bb"].host == "gpu-host" and ws["gpu-host:11:bb"].pid == 11
    assert ws["cpu-host:10:aa"].max_jobs == 2
    ledger.unregister_worker("gpu-host:11:bb")
    assert not ledger.worker_heartbeat("gpu-host:11:bb")
    assert [w.id for w in ledger.workers()] == ["cpu-host:10:aa"]


def _deliver_worker(url: str, out: mp.Queue) -> None:  # type: ignore[type-arg]
    led = Ledger.open(url)
    sent: list[int] = []
    while led.deliver_notifications(lambda n: sent.append(n.id) is None, limit=3):
        pass
    out.put(sent)


def test_each_notification_is_delivered_by_one_daemon(ledger: Ledger, ledger_url: str) -> None:
    if not ledger.shared:
        pytest.skip("an SQLite ledger has one daemon (home lock), which owns the outbox")
    for i in range(30):
        ledger.reject(f"r{i}.toml", "bad")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_deliver_worker, args=(ledger_url, q)) for _ in range(3)]
    for p in procs:
        p.start()
    sent = [n for _ in procs for n in q.get(timeout=60)]
    for p in procs:
        p.join()
    assert len(sent) == 30 and len(set(sent)) == 30
    assert ledger.pending_notifications() == []


def test_stage_metrics_read_back_as_written(ledger: Ledger) -> None:
    job_id = make(ledger)
    ledger.claim_next("w")
    metrics = {"registered": 15, "cameras": [{"model": "SIMPLE_RADIAL", "params": [575.6, 0.1]}]}
    ledger.stage_started(job_id, "ingest", pid=1, attempt=1)
    ledger.stage_finished(job_id, "ingest", metrics=metrics, device="cpu", peak_rss_mb=None)
    (ingest,) = [s for s in ledger.stages_for([job_id])[job_id] if s.name == "ingest"]
    assert ingest.metrics == metrics
    (brief,) = [s for s in ledger.stages_for([job_id], brief=True)[job_id] if s.name == "ingest"]
    assert (brief.state, brief.progress) == ("done", 1.0)
