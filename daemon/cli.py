"""`dropmesh`: the daemon and the commands that work on its ledger from any terminal."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from daemon import config as config_mod
from daemon.db import LedgerError
from daemon.humanize import clock
from daemon.listing import Listing
from daemon.states import ACTIVE, TERMINAL, JobState, StageState
from pipeline import FORMATS, QUALITIES, STAGES
from pipeline.stages import STAGE_WEIGHTS

if TYPE_CHECKING:
    # The ORM, loaded by the commands that need it: `status` reads through Listing.
    from daemon.ledger import Ledger

app = typer.Typer(
    help="dropmesh turns folders of photos into coloured 3D meshes in the background.\n\n"
    "Start the daemon with `dropmesh run`, drop request files into ./inbox (or use "
    "`dropmesh submit`), and follow them with `dropmesh status`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Wide enough for the status table when the output goes to a file or a pipe.
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

HomeOpt = Annotated[
    Path | None,
    typer.Option(
        "--home",
        envvar="DROPMESH_HOME",
        help="Folder holding config.toml, jobs.db, inbox/ and results/ (default: .).",
        show_default=False,
    ),
]


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _cfg(home: Path | None) -> config_mod.Config:
    try:
        return config_mod.load(home)
    except config_mod.ConfigError as exc:
        raise _fail(str(exc)) from exc


def _ledger(cfg: config_mod.Config) -> Ledger:
    from daemon.ledger import Ledger

    try:
        return Ledger.open(cfg.url)
    except LedgerError as exc:
        raise _fail(str(exc)) from exc


def _listing(cfg: config_mod.Config) -> Listing:
    try:
        return Listing.open(cfg.url)
    except LedgerError as exc:
        raise _fail(str(exc)) from exc


def _resolve(ledger: Ledger, ref: str) -> list[Any]:
    from daemon.ledger import NotFound

    try:
        return ledger.resolve(ref)
    except NotFound as exc:
        raise _fail(str(exc)) from exc


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds") if ts else None


def job_progress(job: Any, stages: list[Any]) -> float:
    if job.state == JobState.SUCCEEDED.value:
        return 1.0
    total = sum(STAGE_WEIGHTS.get(s.name, 1) for s in stages) or 1
    done = 0.0
    for s in stages:
        w = STAGE_WEIGHTS.get(s.name, 1)
        if s.state == StageState.DONE.value:
            done += w
        elif s.state == StageState.RUNNING.value:
            done += w * s.progress
    return done / total


def _job_json(job: Any, stages: list[Any], exports: list[str]) -> dict[str, Any]:
    progress = job_progress(job, stages)
    return {
        "id": job.id,
        "project": job.project,
        "state": job.state,
        "stage": job.stage,
        "progress": round(progress, 4),
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "priority": job.priority,
        "error": job.error,
        "cancel_requested": job.cancel_requested,
        "worker": job.worker,
        "host": job.host,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "next_attempt_at": _iso(job.next_attempt_at),
        "exports": exports,
        "stages": [
            {
                "name": s.name,
                "state": s.state,
                "progress": round(s.progress, 4),
                "message": s.message,
                "attempt": s.attempt,
                "duration_s": s.duration_s,
                "peak_rss_mb": s.peak_rss_mb,
                "device": s.device,
                "metrics": s.metrics,
            }
            for s in stages
        ],
    }


def _bar(fraction: float, width: int = 20) -> str:
    filled = int(round(fraction * width))
    return "█" * filled + "░" * (width - filled)


_STATE_STYLE = {
    "queued": "cyan",
    "running": "yellow",
    "waiting": "magenta",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "dim",
}


def _eta(job: Any, progress: float) -> str:
    if job.state != JobState.RUNNING.value or not job.started_at or progress <= 0.02:
        return "-"
    elapsed = time.time() - job.started_at
    return clock(elapsed * (1 - progress) / progress)


def _jobs_table(jobs: list[Any], stages: dict[str, list[Any]]) -> Table:
    t = Table(title=None, expand=False)
    for col in ("job", "project", "state", "stage", "progress", "elapsed", "eta", "note"):
        t.add_column(col, no_wrap=col != "note", overflow="fold")
    for job in jobs:
        p = job_progress(job, stages.get(job.id, []))
        end = job.finished_at or time.time()
        elapsed = end - job.started_at if job.started_at else None
        note = job.error or ""
        if job.state == JobState.WAITING.value and job.next_attempt_at:
            note = f"retry in {max(0, int(job.next_attempt_at - time.time()))} s; {note}"
        if job.cancel_requested and job.state == JobState.RUNNING.value:
            note = "cancelling"
        style = _STATE_STYLE.get(job.state, "")
        t.add_row(
            job.id,
            job.project,
            f"[{style}]{job.state}[/{style}]",
            job.stage or "-",
            f"{_bar(p, 12)} {p * 100:5.1f}%",
            clock(elapsed),
            _eta(job, p),
            note,
        )
    return t


def _job_detail(job: Any, stages: list[Any], exports: list[str]) -> Table:
    p = job_progress(job, stages)
    t = Table(
        title=f"job {job.id} · {job.project} · {job.state} · {p * 100:.1f}% · "
        f"attempt {job.attempts}/{job.max_attempts}",
        expand=False,
    )
    for col in ("stage", "state", "progress", "time", "peak MB", "message"):
        t.add_column(col, overflow="fold")
    for s in stages:
        style = {"done": "green", "running": "yellow", "failed": "red"}.get(s.state, "dim")
        dur = s.duration_s
        if s.state == StageState.RUNNING.value and s.started_at:
            dur = time.time() - s.started_at
        t.add_row(
            s.name,
            f"[{style}]{s.state}[/{style}]",
            f"{_bar(s.progress)} {s.progress * 100:5.1f}%",
            clock(dur) if dur is not None else "-",
            f"{s.peak_rss_mb:.0f}" if s.peak_rss_mb else "-",
            s.message or "",
        )
    if job.error:
        t.caption = f"error: {job.error}"
    elif exports:
        t.caption = "exports: " + ", ".join(exports)
    return t


@app.command()
def run(
    home: HomeOpt = None,
    once: Annotated[
        bool, typer.Option("--once", help="Process what is queued and in the inbox, then exit.")
    ] = False,
) -> None:
    """Run the daemon in the foreground: watch the inbox and process jobs.

    Example: dropmesh run --home ~/scans
    """
    from daemon.service import Daemon, DaemonError

    cfg = _cfg(home)
    logging.basicConfig(
        level=getattr(logging, cfg.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        code = Daemon(cfg).run(once=once)
    except DaemonError as exc:
        raise _fail(str(exc)) from exc
    raise typer.Exit(code)


@app.command()
def submit(
    images: Annotated[Path, typer.Argument(help="Folder of JPEG/PNG photos.")],
    home: HomeOpt = None,
    project: Annotated[
        str | None, typer.Option(help="Project name (default: the folder's name).")
    ] = None,
    quality: Annotated[str, typer.Option(help="low, medium or high.")] = "medium",
    fmt: Annotated[
        list[str] | None, typer.Option("--format", "-f", help="glb, ply or obj; repeatable.")
    ] = None,
    priority: Annotated[int, typer.Option(help="Higher runs first.")] = 0,
    force: Annotated[
        bool, typer.Option("--force", help="Run again even if the same request ran before.")
    ] = False,
) -> None:
    """Write a request file for IMAGES into the inbox.

    Example: dropmesh submit photos/fountain --quality high -f glb -f obj
    """
    from daemon.requests import RequestError, count_images, render_toml, resolve_images

    cfg = _cfg(home)
    try:
        folder = resolve_images(str(images), base=Path.cwd(), allowed_roots=cfg.allowed_roots)
        count_images(folder)
    except RequestError as exc:
        raise _fail(str(exc).removeprefix("key 'images': ")) from exc
    if quality not in QUALITIES:
        raise _fail(f"--quality must be one of {', '.join(QUALITIES)}", 2)
    formats = fmt or ["glb"]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise _fail(f"--format must be one of {', '.join(FORMATS)} (got {', '.join(bad)})", 2)
    name = project or folder.name.lower()
    body: dict[str, Any] = {
        "project": name,
        "images": str(folder),
        "quality": quality,
        "formats": formats,
        "priority": priority,
    }
    if force:
        body["force"] = True
    path = write_request(cfg.inbox, name, render_toml(body))
    console.print(f"request written to {path}")


def write_request(inbox: Path, name: str, text: str) -> Path:
    """Write a request atomically (temp name, then rename into the inbox)."""
    inbox.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name) or "request"
    path = inbox / f"{safe}.toml"
    n = 1
    while path.exists():
        n += 1
        path = inbox / f"{safe}-{n}.toml"
    tmp = inbox / f".{path.name}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


@app.command()
def status(
    job: Annotated[str | None, typer.Argument(help="Job id, id prefix or project.")] = None,
    home: HomeOpt = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh live.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    show_all: Annotated[bool, typer.Option("--all", "-a", help="List every job.")] = False,
) -> None:
    """Show jobs: state, current stage, progress, elapsed time and ETA.

    Examples: dropmesh status · dropmesh status fountain --watch · dropmesh status --json
    """
    cfg = _cfg(home)
    # A job named by id or project is resolved by the Ledger; a listing needs only Core.
    ledger = _ledger(cfg) if job else None
    listing = ledger if ledger is not None else _listing(cfg)

    def snapshot() -> tuple[list[Any], dict[str, list[Any]], dict[str, list[str]]]:
        if ledger is not None and job:
            jobs = _resolve(ledger, job)
        elif as_json or show_all:
            jobs = listing.list_jobs()
        else:
            active = listing.list_jobs(states=[s.value for s in ACTIVE])
            recent = listing.list_jobs(states=[s.value for s in TERMINAL], limit=10)
            jobs = active + recent
        ids = [j.id for j in jobs]
        stages = listing.stages_for(ids, every=len(ids) > 500)
        exports = listing.export_paths(ids, every=len(ids) >= 500)
        return jobs, stages, exports

    def render() -> Any:
        jobs, stages, exports = snapshot()
        if job and len(jobs) == 1:
            return _job_detail(jobs[0], stages[jobs[0].id], exports[jobs[0].id])
        if not jobs:
            return "no jobs yet: drop a request into the inbox or run `dropmesh submit`"
        return _jobs_table(jobs, stages)

    if as_json:
        jobs, stages, exports = snapshot()
        out = [_job_json(j, stages[j.id], exports[j.id]) for j in jobs]
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
        return
    if not watch:
        console.print(render())
        return
    from rich.live import Live

    try:
        with Live(render(), console=console, refresh_per_second=2) as live:
            while True:
                time.sleep(0.5)
                live.update(render())
    except KeyboardInterrupt:
        pass


@app.command()
def cancel(
    job: Annotated[str, typer.Argument(help="Job id, id prefix or project.")],
    home: HomeOpt = None,
) -> None:
    """Cancel a queued or running job (the daemon stops a running stage within a second).

    Example: dropmesh cancel fountain
    """
    cfg = _cfg(home)
    ledger = _ledger(cfg)
    jobs = _resolve(ledger, job)
    for j in jobs:
        state = ledger.request_cancel(j.id)
        if state in ("cancelled", "cancelling"):
            console.print(f"job {j.id} ({j.project}): {state}")
        else:
            console.print(f"job {j.id} ({j.project}) is already {state}; nothing to cancel")


@app.command()
def retry(
    job: Annotated[str, typer.Argument(help="Job id, id prefix or project.")],
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
    cfg = _cfg(home)
    ledger = _ledger(cfg)
    if fmt and any(f not in FORMATS for f in fmt):
        raise _fail(f"--format must be one of {', '.join(FORMATS)}", 2)
    if from_stage and from_stage not in STAGES:
        raise _fail(f"--from-stage must be one of {', '.join(STAGES)}", 2)
    from pipeline.stages import remove_stage_outputs

    for j in _resolve(ledger, job):
        try:
            rerun = ledger.retry(j.id, from_stage=from_stage, formats=fmt)
        except ValueError as exc:
            raise _fail(str(exc)) from exc
        for stage in rerun:
            remove_stage_outputs(cfg.workspace(j.id), stage)
        console.print(f"job {j.id} ({j.project}) queued again from stage {rerun[0]}")


@app.command()
def exports(
    project: Annotated[str | None, typer.Argument(help="Only this project.")] = None,
    home: HomeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List published exports (meshes) with size and path.

    Example: dropmesh exports fountain --json
    """
    cfg = _cfg(home)
    ledger = _ledger(cfg)
    rows = ledger.exports(project)
    items = [
        {
            "job": e.job_id,
            "project": p,
            "filename": Path(e.path).name,
            "format": e.format,
            "size": e.bytes,
            "size_mb": round(e.bytes / 1e6, 3),
            "sha256": e.sha256,
            "created_at": _iso(e.created_at),
            "path": e.path,
            "exists": Path(e.path).exists(),
        }
        for e, p in rows
    ]
    if as_json:
        sys.stdout.write(json.dumps(items, indent=2) + "\n")
        return
    if not items:
        console.print("no exports yet")
        return
    t = Table()
    for col in ("project", "job", "filename", "format", "MB", "created", "path"):
        t.add_column(col, overflow="fold")
    for i in items:
        t.add_row(
            str(i["project"]),
            str(i["job"]),
            str(i["filename"]),
            str(i["format"]),
            f"{i['size_mb']:.2f}",
            str(i["created_at"]),
            str(i["path"]) + ("" if i["exists"] else " [red](missing)[/red]"),
        )
    console.print(t)


@app.command()
def logs(
    job: Annotated[str, typer.Argument(help="Job id, id prefix or project.")],
    home: HomeOpt = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
) -> None:
    """Print a job's log (daemon lines and the pipeline's own output).

    Example: dropmesh logs fountain -f
    """
    cfg = _cfg(home)
    ledger = _ledger(cfg)
    j = _resolve(ledger, job)[0]
    path = cfg.workspace(j.id) / "job.log"
    if not path.exists():
        for ev in ledger.events(j.id):
            sys.stdout.write(f"{_iso(ev.at)} {ev.kind}: {ev.message}\n")
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
def doctor(home: HomeOpt = None) -> None:
    """Check the set-up: ledger, inbox watching, notifications, GPU, free disk.

    Example: dropmesh doctor --home ~/scans
    """
    from daemon.ledger import Ledger
    from daemon.notify import Notifier
    from pipeline.devices import cuda_device_count, pycolmap_build

    cfg = _cfg(home)
    ok_all = True

    def line(ok: bool | None, what: str, detail: str) -> None:
        nonlocal ok_all
        mark = {True: "[green]ok[/green]", False: "[red]FAIL[/red]", None: "[yellow]warn[/yellow]"}
        if ok is False:
            ok_all = False
        console.print(f"{mark[ok]:>18}  {what}: {detail}")

    try:
        ledger = Ledger.open(cfg.url)
        ledger.add_event(None, "doctor", "doctor check")
        line(True, "ledger", f"{cfg.url} is readable and writable")
    except LedgerError as exc:
        line(False if cfg.db_path.exists() else None, "ledger", str(exc))
    except Exception as exc:
        line(False, "ledger", f"{cfg.url}: {exc}")
    inbox_ok = cfg.inbox.is_dir() and os.access(cfg.inbox, os.W_OK)
    line(inbox_ok or None, "inbox", f"{cfg.inbox} {'exists' if inbox_ok else 'missing'}")
    mode = "polling (use_polling = true)" if cfg.use_polling else _inotify_check(cfg.inbox)
    line(True if "inotify" in mode else None, "watching", mode)
    shown, why = Notifier().reachable()
    line(True if shown else None, "notifications", why)
    n = cuda_device_count() if cfg.device != "cpu" else 0
    line(
        bool(n or cfg.device != "gpu"),
        "GPU",
        f"{n} CUDA device(s) seen by pycolmap" if n else "none; dense stereo runs on the CPU",
    )
    line(None if " and " in (b := pycolmap_build()) else True, "pycolmap", b)
    target = cfg.results if cfg.results.exists() else cfg.home
    free = shutil.disk_usage(target).free / 1e9
    line(free > 5 or None, "disk", f"{free:.1f} GB free at {target}")
    raise typer.Exit(0 if ok_all else 1)


def _inotify_check(path: Path) -> str:
    try:
        from watchdog.observers.inotify_c import InotifyFD  # noqa: F401

        max_watches = Path("/proc/sys/fs/inotify/max_user_watches")
        limit = max_watches.read_text().strip() if max_watches.exists() else "?"
        return f"inotify (max_user_watches {limit})"
    except Exception as exc:
        return f"polling fallback ({exc})"


@app.command()
def prune(
    home: HomeOpt = None,
    days: Annotated[
        float | None, typer.Option(help="Age in days (default: keep_workspaces_days).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would go.")] = False,
) -> None:
    """Remove the working folders of finished jobs older than N days (exports stay).

    Example: dropmesh prune --days 7 --dry-run
    """
    cfg = _cfg(home)
    ledger = _ledger(cfg)
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
def demo(
    home: HomeOpt = None,
    images: Annotated[int, typer.Option("--images", "-n", help="Number of photos.")] = 24,
    quality: Annotated[str, typer.Option(help="low, medium or high.")] = "low",
    project: Annotated[str, typer.Option(help="Project name.")] = "demo",
    variant: Annotated[
        str, typer.Option(help="Scene variant: easy, ..., hard (python -m pipeline.demo -h).")
    ] = "easy",
) -> None:
    """Render a synthetic demo scene and drop a request for it into the inbox.

    Example: dropmesh demo --images 24 --quality low --variant hard
    """
    from daemon.requests import render_toml
    from pipeline.demo import VARIANTS, render_scene

    cfg = _cfg(home)
    if quality not in QUALITIES:
        raise _fail(f"--quality must be one of {', '.join(QUALITIES)}", 2)
    if variant not in VARIANTS:
        raise _fail(f"--variant must be one of {', '.join(VARIANTS)}", 2)
    out = cfg.home / "demo" / project
    console.print(f"rendering {images} {variant} photos of the demo scene into {out} ...")
    render_scene(out, n_images=images, variant=variant)
    body = {
        "project": project,
        "images": str(out / "images"),
        "quality": quality,
        "formats": ["glb"],
        "force": True,
    }
    path = write_request(cfg.inbox, project, render_toml(body))
    console.print(f"request written to {path}; follow it with `dropmesh status --watch`")


@app.command()
def workers(
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
    cfg = _cfg(home)
    ledger = _ledger(cfg)
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
        items.append(
            {
                "id": w.id,
                "host": w.host,
                "pid": w.pid,
                "live": live,
                "heartbeat_age_s": round(age, 1),
                "started_at": _iso(w.started_at),
                "cuda_devices": w.cuda_devices,
                "gpu_stages": w.gpu_stages,
                "max_jobs": w.max_jobs,
                "jobs": sorted(running.get(w.id, [])),
            }
        )
    if as_json:
        sys.stdout.write(json.dumps(items, indent=2) + "\n")
        return
    if not items:
        console.print("no live daemons" + ("" if show_all else " (--all shows stale ones)"))
        return
    t = Table()
    for col in ("host", "pid", "state", "heartbeat", "up", "GPUs", "jobs", "running"):
        t.add_column(col, overflow="fold")
    for i in items:
        t.add_row(
            str(i["host"]),
            str(i["pid"]),
            "[green]live[/green]" if i["live"] else "[red]stale[/red]",
            f"{i['heartbeat_age_s']:.1f} s ago",
            clock(now - datetime.fromisoformat(str(i["started_at"])).timestamp()),
            str(i["cuda_devices"]) if i["cuda_devices"] else f"- ({i['gpu_stages']})",
            f"{len(i['jobs'])}/{i['max_jobs']}",
            ", ".join(i["jobs"]) or "-",
        )
    console.print(t)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
