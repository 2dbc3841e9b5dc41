"""The commands that run the daemon and that read or change jobs on the ledger."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from typing import Annotated, Any

import typer

from daemon.cli import render
from daemon.cli.app import (
    HomeOpt,
    app,
    complete_job,
    complete_project,
    console,
    fail,
    load_config,
    open_ledger,
    open_listing,
    resolve,
)
from daemon.progress import reads_stages
from daemon.states import ACTIVE, TERMINAL, JobState
from pipeline import FORMATS, STAGES

# A job named on the command line: an id, a unique id prefix or a project.
JobArg = Annotated[
    str, typer.Argument(help="Job id, id prefix or project.", autocompletion=complete_job)
]


@app.command()
def run(
    ctx: typer.Context,
    home: HomeOpt = None,
    once: Annotated[
        bool, typer.Option("--once", help="Process what is queued and in the inbox, then exit.")
    ] = False,
) -> None:
    """Run the daemon in the foreground: watch the inbox and process jobs.

    Example: dropmesh run --home ~/scans
    """
    from daemon.service import Daemon, DaemonError
    from daemon.web.supervisor import DashboardSupervisor

    cfg = load_config(ctx, home)
    logging.basicConfig(
        level=getattr(logging, cfg.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        # the dashboard (config key `http`): a supervised child process beside the daemon
        dashboard = None if once else DashboardSupervisor.from_config(cfg)
        code = Daemon(cfg, companions=[dashboard] if dashboard else []).run(once=once)
    except DaemonError as exc:
        raise fail(str(exc)) from exc
    raise typer.Exit(code)


Snapshot = tuple[list[Any], dict[str, list[Any]], dict[str, list[str]]]
# jobs: read the rows of more than this many in one scan of the table rather than by id
SCAN_FROM = 5000


def read_jobs(
    listing: Any,
    ledger: Any,
    ref: str | None,
    *,
    every: bool,
    brief: bool = False,
    exports: bool = True,
) -> Snapshot:
    """The jobs `status` shows, with their stages and export paths: those `ref` names;
    else every job (`every`); else the active ones and the ten most recent finished.
    brief: only what a listing shows (see Listing.list_jobs and Listing.stages_for).
    exports: read the export paths (else none)."""
    if ledger is not None and ref:
        jobs = resolve(ledger, ref)
    elif every:
        jobs = listing.list_jobs(brief=brief)
    else:
        active = listing.list_jobs(states=[s.value for s in ACTIVE], brief=brief)
        recent = listing.list_jobs(states=[s.value for s in TERMINAL], limit=10, brief=brief)
        jobs = active + recent
    ids = [j.id for j in jobs]
    # a listing shows only the progress of each job, which a succeeded job's stages do not
    # change: read the stages of the others (most of a big ledger has succeeded)
    wanted = [j.id for j in jobs if reads_stages(j)] if brief else ids
    stages = listing.stages_for(wanted, every=len(wanted) > SCAN_FROM, brief=brief)
    paths = listing.export_paths(ids, every=len(ids) > SCAN_FROM) if exports else {}
    return jobs, stages, paths


@app.command()
def status(
    ctx: typer.Context,
    job: Annotated[
        str | None,
        typer.Argument(help="Job id, id prefix or project.", autocompletion=complete_job),
    ] = None,
    home: HomeOpt = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh live.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    show_all: Annotated[bool, typer.Option("--all", "-a", help="List every job.")] = False,
) -> None:
    """Show jobs: state, current stage, progress, elapsed time and ETA.

    Examples: dropmesh status · dropmesh status fountain --watch · dropmesh status --json
    """
    cfg = load_config(ctx, home)
    # A job named by id or project is resolved by the Ledger; a listing is plain SQL.
    ledger = open_ledger(cfg) if job else None
    listing = ledger if ledger is not None else open_listing(cfg)

    def snapshot(exports: bool) -> Snapshot:
        # a job asked for by name is shown whole; a listing, only what it prints
        return read_jobs(
            listing, ledger, job, every=as_json or show_all, brief=not job, exports=exports
        )

    def view() -> Any:
        """The job's table, or the listing as text (ANSI colours when the console has
        them)."""
        jobs, stages, exports = snapshot(exports=bool(job))
        if job and len(jobs) == 1:
            return render.job_detail(jobs[0], stages[jobs[0].id], exports[jobs[0].id])
        if not jobs:
            return "no jobs yet: drop a request into the inbox or run `dropmesh submit`"
        return render.jobs_listing(jobs, stages, console.color_system)

    if as_json:
        jobs, stages, exports = snapshot(exports=True)
        out = [
            render.job_json(j, stages.get(j.id, []), exports[j.id], detail=bool(job)) for j in jobs
        ]
        sys.stdout.write(render.json_text(out))
        return
    if not watch:
        shown = view()
        if isinstance(shown, str):
            sys.stdout.write(shown + "\n")  # written as it is: no markup, no wrapping
        else:
            console.print(shown)
        return
    from rich.live import Live
    from rich.text import Text

    def live_view() -> Any:
        shown = view()
        return Text.from_ansi(shown, no_wrap=True) if isinstance(shown, str) else shown

    try:
        with Live(live_view(), console=console, refresh_per_second=2) as live:
            while True:
                time.sleep(0.5)
                live.update(live_view())
    except KeyboardInterrupt:
        pass


@app.command()
def cancel(
    ctx: typer.Context,
    job: JobArg,
    home: HomeOpt = None,
) -> None:
    """Cancel a queued or running job (the daemon stops a running stage within a second).

    Example: dropmesh cancel fountain
    """
    cfg = load_config(ctx, home)
    ledger = open_ledger(cfg)
    jobs = resolve(ledger, job)
    for j in jobs:
        state = ledger.request_cancel(j.id)
        if state in ("cancelled", "cancelling"):
            console.print(f"job {j.id} ({j.project}): {state}")
        else:
            console.print(f"job {j.id} ({j.project}) is already {state}; nothing to cancel")


@app.command()
def retry(
    ctx: typer.Context,
    job: JobArg,
    home: HomeOpt = None,
    from_stage: Annotated[
        str | None,
        typer.Option("--from-stage", help=f"Stage to start from: {', '.join(STAGES)}."),
    ] = None,
    fmt: Annotated[
        list[str] | None,
        typer.Option("--format", "-f", help="Export these formats instead (re-uses the mesh)."),
    ] = None,
) -> None:
    """Run a failed, cancelled or finished job again, from a stage.

    Examples: dropmesh retry 3fa2c1d0 · dropmesh retry fountain --from-stage meshing ·
    dropmesh retry fountain --format obj
    """
    cfg = load_config(ctx, home)
    ledger = open_ledger(cfg)
    if fmt and any(f not in FORMATS for f in fmt):
        raise fail(f"--format must be one of {', '.join(FORMATS)}", 2)
    if from_stage and from_stage not in STAGES:
        raise fail(f"--from-stage must be one of {', '.join(STAGES)}", 2)
    from pipeline.stages import remove_stage_outputs

    for j in resolve(ledger, job):
        try:
            rerun = ledger.retry(j.id, from_stage=from_stage, formats=fmt)
        except ValueError as exc:
            raise fail(str(exc)) from exc
        for stage in rerun:
            remove_stage_outputs(cfg.workspace(j.id), stage)
        console.print(f"job {j.id} ({j.project}) queued again from stage {rerun[0]}")


@app.command()
def exports(
    ctx: typer.Context,
    project: Annotated[
        str | None, typer.Argument(help="Only this project.", autocompletion=complete_project)
    ] = None,
    home: HomeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List published exports (meshes) with size and path.

    Example: dropmesh exports fountain --json
    """
    cfg = load_config(ctx, home)
    ledger = open_ledger(cfg)
    items = render.export_items(ledger.exports(project))
    if as_json:
        sys.stdout.write(render.json_text(items))
        return
    if not items:
        console.print("no exports yet")
        return
    console.print(render.exports_table(items))


@app.command()
def logs(
    ctx: typer.Context,
    job: JobArg,
    home: HomeOpt = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
) -> None:
    """Print a job's log (daemon lines and the pipeline's own output).

    Example: dropmesh logs fountain -f
    """
    cfg = load_config(ctx, home)
    ledger = open_ledger(cfg)
    j = resolve(ledger, job)[0]
    path = cfg.workspace(j.id) / "job.log"
    if not path.exists():
        for ev in ledger.events(j.id):
            sys.stdout.write(f"{render.iso(ev.at)} {ev.kind}: {ev.message}\n")
        if not follow:
            return
    pos = 0
    while True:
        chunk = b""
        if path.exists():
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
        if not follow:
            return
        if ledger.get(j.id).state in {s.value for s in TERMINAL} and not chunk:
            return
        time.sleep(0.5)


@app.command()
def prune(
    ctx: typer.Context,
    home: HomeOpt = None,
    days: Annotated[
        float | None, typer.Option(help="Age in days (default: keep_workspaces_days).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would go.")] = False,
) -> None:
    """Remove the working folders of finished jobs older than N days (exports stay).

    Example: dropmesh prune --days 7 --dry-run
    """
    cfg = load_config(ctx, home)
    ledger = open_ledger(cfg)
    cutoff = time.time() - 86400 * (cfg.keep_workspaces_days if days is None else days)
    freed = 0
    count = 0
    for j in ledger.list_jobs(states=[s.value for s in TERMINAL]):
        ws = cfg.workspace(j.id)
        if not ws.exists() or (j.finished_at or j.created_at) > cutoff:
            continue
        size = sum(f.stat().st_size for f in ws.rglob("*") if f.is_file())
        freed += size
        count += 1
        console.print(f"{'would remove' if dry_run else 'removed'} {ws} ({size / 1e6:.1f} MB)")
        if not dry_run:
            shutil.rmtree(ws, ignore_errors=True)
            ledger.add_event(j.id, "pruned", f"workspace removed ({size / 1e6:.1f} MB)")
    console.print(f"{count} workspace(s), {freed / 1e6:.1f} MB")


@app.command()
def workers(
    ctx: typer.Context,
    home: HomeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    show_all: Annotated[
        bool, typer.Option("--all", help="Also daemons that stopped heartbeating.")
    ] = False,
) -> None:
    """List the daemons working on this ledger: host, pid, GPUs, jobs, heartbeat age.

    A daemon is live while its heartbeat is younger than stale_after_s; a daemon killed
    without a clean stop shows as stale (--all) until its jobs have moved on.

    Example: dropmesh workers --all
    """
    cfg = load_config(ctx, home)
    ledger = open_ledger(cfg)
    now = time.time()
    running: dict[str, list[str]] = {}
    for j in ledger.list_jobs([JobState.RUNNING.value]):
        if j.worker:
            running.setdefault(j.worker, []).append(j.id)
    items: list[dict[str, Any]] = []
    for w in ledger.workers():
        age = now - w.heartbeat_at
        live = age < cfg.stale_after_s
        if not live and not show_all:
            continue
        items.append(render.worker_item(w, live, age, running.get(w.id, [])))
    if as_json:
        sys.stdout.write(render.json_text(items))
        return
    if not items:
        console.print("no live daemons" + ("" if show_all else " (--all shows stale ones)"))
        return
    console.print(render.workers_table(items, now))
