"""`dropmesh service install` writes a systemd user unit that systemd accepts; doctor sees it;
shell completion is on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_harness import Home


def test_service_install_writes_a_unit_doctor_checks(home: Home, tmp_path: Path) -> None:
    home.env["XDG_CONFIG_HOME"] = str(tmp_path / "cfg")
    res = home.cli("doctor", check=False)
    assert "no systemd user unit" in res.stdout
    out = home.cli("service", "install").stdout
    unit = tmp_path / "cfg" / "systemd" / "user" / "dropmesh.service"
    assert str(unit) in out and "systemctl --user enable --now dropmesh" in out
    text = unit.read_text()
    assert f"--home {home.root}" in text and f"WorkingDirectory={home.root}" in text
    assert "Restart=on-failure" in text and "WantedBy=default.target" in text
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
        )
        assert verify.returncode == 0, verify.stderr
    res = home.cli("doctor", check=False)
    service_line = next(ln for ln in res.stdout.splitlines() if "service:" in ln)
    assert "ok" in service_line and str(unit) in service_line
    # a unit for another home is reported, not passed
    unit.write_text(text.replace(str(home.root), "/elsewhere"))
    res = home.cli("doctor", check=False)
    assert "runs another home folder" in res.stdout and res.returncode == 1


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_shell_completion_is_available(home: Home, shell: str) -> None:
    exe = Path(sys.executable).with_name("dropmesh")
    if not exe.exists():
        pytest.skip("the dropmesh script is not installed in this environment")
    # Typer otherwise guesses the shell from the parent process (under make: sh, which it
    # has no script for) and takes no shell name; this switch makes it take the name.
    env = {**home.env, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    res = subprocess.run(
        [str(exe), "--show-completion", shell], capture_output=True, text=True, env=env
    )
    assert res.returncode == 0, res.stderr
    assert "_DROPMESH_COMPLETE" in res.stdout and "dropmesh" in res.stdout
