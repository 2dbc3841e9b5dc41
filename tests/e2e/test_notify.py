"""Desktop notifications on a real private D-Bus session bus."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from dbus_notifications import NotificationBus, private_notification_bus

from daemon import notify
from daemon.notify import Notifier


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    # "one warning per process": give every test its own process-wide memory.
    monkeypatch.setattr(notify, "_warned", set())


@pytest.fixture
def on_bus(notification_bus: NotificationBus, monkeypatch: pytest.MonkeyPatch) -> NotificationBus:
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", notification_bus.address)
    return notification_bus


def warnings_from(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "daemon.notify" and r.levelno == logging.WARNING
    ]


def test_delivers_title_and_escaped_body(on_bus: NotificationBus) -> None:
    title = "fountain: export ready & <done>"
    message = 'results/fountain/fountain.glb <12.3 MB> "A & B" ünïcødé'
    assert Notifier().notify(title, message) is True
    [got] = on_bus.received()
    assert got["app_name"] == "dropmesh"
    assert got["summary"] == title  # the summary is plain text in the spec
    assert got["body"] == 'results/fountain/fountain.glb &lt;12.3 MB&gt; "A &amp; B" ünïcødé'


def test_body_is_not_escaped_for_a_server_without_markup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with private_notification_bus(markup=False) as bus:
        monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", bus.address)
        assert Notifier().notify("t", "a & <b>") is True
        assert [r["body"] for r in bus.received()] == ["a & <b>"]


def test_text_that_looks_like_an_option_or_is_empty_still_arrives(
    on_bus: NotificationBus,
) -> None:
    n = Notifier()
    assert n.notify("-v", "--help me") is True
    assert n.notify("", "") is True
    got = on_bus.received()
    assert [(r["summary"], r["body"]) for r in got] == [
        ("\u200b-v", "\u200b--help me"),
        ("dropmesh", ""),
    ]


def test_notification_from_a_subprocess_is_recorded(notification_bus: NotificationBus) -> None:
    code = textwrap.dedent(
        """
        import sys
        from daemon.notify import Notifier
        sys.exit(0 if Notifier().notify("lion: export ready", "3 files") else 1)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=notification_bus.env,
        cwd=Path(notify.__file__).parents[1],  # the repository root, for `import daemon`
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    [got] = notification_bus.wait_for(1)
    assert (got["app_name"], got["summary"], got["body"]) == (
        "dropmesh",
        "lion: export ready",
        "3 files",
    )


def test_reachable_names_the_server(on_bus: NotificationBus) -> None:
    ok, detail = Notifier().reachable()
    assert ok, detail
    assert "dropmesh-test-notifications" in detail
    assert on_bus.address in detail


def test_session_bus_found_through_xdg_runtime_dir(
    notification_bus: NotificationBus, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Without DBUS_SESSION_BUS_ADDRESS, libnotify (like libdbus) uses $XDG_RUNTIME_DIR/bus.
    (tmp_path / "bus").symlink_to(notification_bus.address.split("=", 1)[1].split(",")[0])
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert Notifier().notify("via runtime dir", "") is True
    assert [r["summary"] for r in notification_bus.received()] == ["via runtime dir"]


def test_no_session_bus(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    n = Notifier()
    with caplog.at_level(logging.DEBUG, logger="daemon.notify"):
        assert n.notify("a", "b") is False
        assert n.notify("a", "b") is False
    assert warnings_from(caplog) == [
        "desktop notification not shown: no D-Bus session bus (DBUS_SESSION_BUS_ADDRESS unset)"
    ]
    assert n.reachable() == (False, "no D-Bus session bus (DBUS_SESSION_BUS_ADDRESS unset)")


def test_bus_address_that_leads_nowhere(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", f"unix:path={tmp_path}/gone.sock")
    with caplog.at_level(logging.WARNING, logger="daemon.notify"):
        assert Notifier().notify("a", "b") is False
        assert Notifier().notify("a", "b") is False
    [warning] = warnings_from(caplog)
    assert "cannot query the notification server" in warning


def test_bus_without_notification_server(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with private_notification_bus(server=False) as bus:
        monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", bus.address)
        n = Notifier()
        with caplog.at_level(logging.WARNING, logger="daemon.notify"):
            assert n.notify("a", "b") is False
            assert n.notify("c", "d") is False
        [warning] = warnings_from(caplog)
        assert "no notification server on the session bus" in warning
        ok, detail = n.reachable()
        assert not ok and "no notification server" in detail


def test_server_going_away_and_coming_back(
    on_bus: NotificationBus, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier()
    assert n.notify("one", "") is True
    on_bus.stop_server()
    with caplog.at_level(logging.WARNING, logger="daemon.notify"):
        assert n.notify("two", "") is False
    assert len(warnings_from(caplog)) == 1
    on_bus.start_server()
    assert n.notify("three", "") is True
    assert [r["summary"] for r in on_bus.received()] == ["one", "three"]


def test_no_notify_send(monkeypatch: pytest.MonkeyPatch, on_bus: NotificationBus) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    n = Notifier()
    assert n.notify("a", "b") is False
    assert n.reachable() == (False, "notify-send not found (Debian package libnotify-bin)")
    assert on_bus.received() == []
