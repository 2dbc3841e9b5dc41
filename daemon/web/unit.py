"""`dropmesh service install`: a systemd user unit running the daemon (and so its dashboard)
for one home folder, across logins and, with lingering, reboots."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

from daemon.config import Config

UNIT = "dropmesh.service"


def unit_dir(env: dict[str, str] | None = None) -> Path:
    env = dict(os.environ if env is None else env)
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".config")
    return Path(base) / "systemd" / "user"


def render(cfg: Config, python: str = sys.executable) -> str:
    cmd = " ".join(
        shlex.quote(a) for a in [python, "-m", "daemon.cli", "run", "--home", str(cfg.home)]
    )
    url = f"http://{cfg.http}/" if cfg.http else "off (config key http)"
    return f"""[Unit]
Description=dropmesh: photos to 3D meshes for {cfg.home} (dashboard {url})

[Service]
Type=simple
WorkingDirectory={cfg.home}
Environment=PYTHONUNBUFFERED=1
ExecStart={cmd}
# SIGTERM: running stages stop and resume at the next start
KillSignal=SIGTERM
TimeoutStopSec=30
Restart=on-failure
RestartSec=5

[Install]
WantedBy=default.target
"""


def install(cfg: Config, *, env: dict[str, str] | None = None) -> Path:
    folder = unit_dir(env)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / UNIT
    tmp = folder / f".{UNIT}.tmp"
    tmp.write_text(render(cfg), encoding="utf-8")
    os.replace(tmp, path)
    return path


def check(cfg: Config, env: dict[str, str] | None = None) -> tuple[bool | None, str]:
    """For `dropmesh doctor`: (ok, detail); None when no unit is installed (a warning)."""
    path = unit_dir(env) / UNIT
    if not path.exists():
        return None, "no systemd user unit (`dropmesh service install` writes one)"
    text = path.read_text(encoding="utf-8", errors="replace")
    exec_line = next((ln for ln in text.splitlines() if ln.startswith("ExecStart=")), "")
    try:
        args = shlex.split(exec_line.removeprefix("ExecStart="))
    except ValueError:
        return False, f"{path}: ExecStart cannot be read"
    if "--home" not in args or Path(args[args.index("--home") + 1]) != cfg.home:
        return False, f"{path} runs another home folder; `dropmesh service install` rewrites it"
    if not args or not (Path(args[0]).exists() or shutil.which(args[0])):
        return False, f"{path}: {args[0] if args else '?'} does not exist; install it again"
    return True, f"{path} (systemctl --user enable --now dropmesh)"
