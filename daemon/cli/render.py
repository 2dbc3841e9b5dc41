"""What the commands print: overall progress, ETA, bars, the tables and the JSON shapes.

Pure functions of ledger rows (jobs, stages, exports, daemons) and the clock; they read
nothing themselves, so they are tested without a ledger.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from rich.cells import cell_len
from rich.console import COLOR_SYSTEMS
from rich.style import Style
from rich.table import Table

from daemon.humanize import clock
from daemon.progress import iso, job_progress, seconds_left
from daemon.states import JobState, StageState


def json_text(items: Any) -> str:
    """What the `--json` options print: indented, as json.dumps(indent=2) would, but some
    20 times faster (`status --json` on 10,000 jobs writes 30 MB)."""
    return orjson.dumps(items, option=orjson.OPT_INDENT_2).decode() + "\n"


def job_json(
    job: Any, stages: list[Any], exports: list[str], *, detail: bool = True
) -> dict[str, Any]:
    """One job as `dropmesh status --json` prints it: with detail (one job asked for by
    name), its stages with their metrics too; without (a listing), the job alone, whose
    `stages` only its progress needs (see Listing.stages_for's brief)."""
    progress = job_progress(job, stages)
    out = {
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
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "next_attempt_at": iso(job.next_attempt_at),
        "exports": exports,
    }
    if detail:
        out["stages"] = [
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
        ]
    return out


def bar(fraction: float, width: int = 20) -> str:
    filled = int(round(fraction * width))
    return "█" * filled + "░" * (width - filled)


STATE_STYLE = {
    "queued": "cyan",
    "running": "yellow",
    "waiting": "magenta",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "dim",
}


def eta(job: Any, progress: float, now: float | None = None) -> str:
    """Time left as `m:ss` (see daemon.progress.seconds_left), "-" when unknown."""
    left = seconds_left(job, progress, time.time() if now is None else now)
    return "-" if left is None else clock(left)


LISTING_COLUMNS = ("job", "project", "state", "stage", "progress", "elapsed", "eta", "note")


def job_row(job: Any, stages: list[Any], now: float) -> tuple[str, ...]:
    """One job's cells in the listing, in LISTING_COLUMNS order."""
    p = job_progress(job, stages)
    end = job.finished_at or now
    elapsed = end - job.started_at if job.started_at else None
    note = job.error or ""
    if job.state == JobState.WAITING and job.next_attempt_at:
        note = f"retry in {max(0, int(job.next_attempt_at - now))} s; {note}"
    if job.cancel_requested and job.state == JobState.RUNNING:
        note = "cancelling"
    return (
        job.id,
        job.project,
        job.state,
        job.stage or "-",
        f"{bar(p, 12)} {p * 100:5.1f}%",
        clock(elapsed),
        eta(job, p, now),
        " ".join(note.split()),  # one line per job, whatever the error text holds
    )


def _printable(cell: str) -> str:
    """A cell from the ledger with no control codes (a job's error text or a project
    name must not move the terminal's cursor or change its colours)."""
    return cell if cell.isprintable() else "".join(c for c in cell if c.isprintable())


def jobs_listing(
    jobs: list[Any], stages: dict[str, list[Any]], color_system: str | None = None
) -> str:
    """The jobs as aligned columns, one line each, as `docker ps` or `kubectl get` print
    them; with a `color_system` (a rich Console's), the header bold and each state in its
    colour, as ANSI codes. Plain text rather than a rich renderable: rich measures and
    styles every cell, about 0.1 ms a row, a second for `status --all` on 10,000 jobs (a
    Table: 0.5 ms a row). Lines wider than the terminal wrap there."""
    now = time.time()
    rows = [LISTING_COLUMNS, *(job_row(job, stages.get(job.id, []), now) for job in jobs)]
    rows = [tuple(_printable(cell) for cell in row) for row in rows]
    lengths = [[len(cell) if cell.isascii() else cell_len(cell) for cell in row] for row in rows]
    widths = [max(column) + 2 for column in zip(*lengths, strict=True)]
    system = COLOR_SYSTEMS.get(color_system or "")

    def paint(text: str, style: str) -> str:
        return Style.parse(style).render(text, color_system=system) if style else text

    state = LISTING_COLUMNS.index("state")
    lines = []
    for n, (row, length) in enumerate(zip(rows, lengths, strict=True)):
        last = max(i for i, cell in enumerate(row) if cell)  # no trailing blanks
        cells = [
            cell if i == last else cell + " " * (widths[i] - length[i])
            for i, cell in enumerate(row[: last + 1])
        ]
        if n == 0:
            lines.append(paint("".join(cells), "bold"))
            continue
        cells[state] = paint(cells[state], STATE_STYLE.get(row[state], ""))
        lines.append("".join(cells))
    return "\n".join(lines)


def job_detail(job: Any, stages: list[Any], exports: list[str]) -> Table:
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
            f"{bar(s.progress)} {s.progress * 100:5.1f}%",
            clock(dur) if dur is not None else "-",
            f"{s.peak_rss_mb:.0f}" if s.peak_rss_mb else "-",
            s.message or "",
        )
    if job.error:
        t.caption = f"error: {job.error}"
    elif exports:
        t.caption = "exports: " + ", ".join(exports)
    return t


def export_items(rows: list[tuple[Any, str]]) -> list[dict[str, Any]]:
    """(export row, project) pairs as `dropmesh exports --json` prints them."""
    return [
        {
            "job": e.job_id,
            "project": p,
            "filename": Path(e.path).name,
            "format": e.format,
            "size": e.bytes,
            "size_mb": round(e.bytes / 1e6, 3),
            "sha256": e.sha256,
            "created_at": iso(e.created_at),
            "path": e.path,
            "exists": Path(e.path).exists(),
        }
        for e, p in rows
    ]


def exports_table(items: list[dict[str, Any]]) -> Table:
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
    return t


def worker_item(w: Any, live: bool, age: float, jobs: list[str]) -> dict[str, Any]:
    """One daemon row as `dropmesh workers --json` prints it."""
    return {
        "id": w.id,
        "host": w.host,
        "pid": w.pid,
        "live": live,
        "heartbeat_age_s": round(age, 1),
        "started_at": iso(w.started_at),
        "cuda_devices": w.cuda_devices,
        "gpu_stages": w.gpu_stages,
        "max_jobs": w.max_jobs,
        "jobs": sorted(jobs),
    }


def workers_table(items: list[dict[str, Any]], now: float) -> Table:
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
    return t
