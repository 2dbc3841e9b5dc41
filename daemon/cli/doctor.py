"""`dropmesh doctor`: check the set-up, one line per check (ok, warn or FAIL)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import typer

from daemon.cli.app import HomeOpt, app, console, load_config
from daemon.ledgerfile import LedgerError

# The top-level import names dropmesh installs. Other distributions may install the same
# names (python-daemon installs `daemon`); see docs/ARCHITECTURE.md, "Import names".
IMPORT_NAMES = ("daemon", "pipeline")


def import_name_clashes(
    names: tuple[str, ...] = IMPORT_NAMES, ours: Path | None = None
) -> list[str]:
    """What is wrong with the import names in this environment, in words (empty when
    nothing is): a name that resolves to a folder other than dropmesh's own, or another
    installed distribution that provides the same top-level name."""
    import importlib
    import importlib.metadata

    root = ours if ours is not None else Path(__file__).resolve().parents[2]
    problems: list[str] = []
    providers = importlib.metadata.packages_distributions()
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            problems.append(f"`{name}` cannot be imported: {exc}")
            continue
        where = Path(module.__file__ or "").resolve().parent
        if where != root / name:
            problems.append(f"`{name}` is {where}, not dropmesh's {root / name}")
        others = sorted({d for d in providers.get(name, []) if d.lower() != "dropmesh"})
        if others:
            problems.append(
                f"{', '.join(others)} also install(s) `{name}` into this environment; "
                "run dropmesh from its own venv (`make run` creates one)"
            )
    return problems


def _inotify_check(path: Path) -> str:
    try:
        from watchdog.observers.inotify_c import InotifyFD  # noqa: F401

        max_watches = Path("/proc/sys/fs/inotify/max_user_watches")
        limit = max_watches.read_text().strip() if max_watches.exists() else "?"
        return f"inotify (max_user_watches {limit})"
    except Exception as exc:
        return f"polling fallback ({exc})"


@app.command()
def doctor(ctx: typer.Context, home: HomeOpt = None) -> None:
    """Check the set-up: import names, ledger, inbox watching, notifications, GPU, free disk.

    Example: dropmesh doctor --home ~/scans
    """
    from daemon.ledger import Ledger
    from daemon.notify import Notifier
    from pipeline.devices import cuda_device_count, pycolmap_build

    cfg = load_config(ctx, home)
    ok_all = True

    def line(ok: bool | None, what: str, detail: str) -> None:
        nonlocal ok_all
        mark = {True: "[green]ok[/green]", False: "[red]FAIL[/red]", None: "[yellow]warn[/yellow]"}
        if ok is False:
            ok_all = False
        console.print(f"{mark[ok]:>18}  {what}: {detail}")

    line(
        cfg.home.is_dir() or None,
        "home",
        f"{cfg.home}"
        if cfg.home.is_dir()
        else f"{cfg.home} does not exist yet (`dropmesh run` creates it)",
    )
    clashes = import_name_clashes()
    line(
        not clashes,
        "import names",
        "; ".join(clashes) or f"{' and '.join(IMPORT_NAMES)} are dropmesh's own",
    )
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
    build = pycolmap_build()
    line(None if " and " in build else True, "pycolmap", build)
    from daemon.web.unit import check as unit_check

    unit_ok, unit_detail = unit_check(cfg)
    line(unit_ok, "service", unit_detail)
    # the disk the results will go to: the nearest folder that exists on their way
    target = next(p for p in (cfg.results, *cfg.results.parents) if p.exists())
    free = shutil.disk_usage(target).free / 1e9
    line(free > 5 or None, "disk", f"{free:.1f} GB free at {target}")
    raise typer.Exit(0 if ok_all else 1)
