"""Notifications from the daemon, on a real private D-Bus session bus."""

from __future__ import annotations

from pathlib import Path

from daemon_harness import Home, wait_for
from dbus_notifications import NotificationBus


def test_export_and_failure_notified_once_across_restart(
    tmp_path: Path, notification_bus: NotificationBus
) -> None:
    home = Home(tmp_path / "home", env=notification_bus.env)
    try:
        home.images("fountain")
        home.images("broken", {"mapping": {"fail": -1, "how": "permanent"}})
        home.start()
        home.drop("fountain")
        job = home.wait_state("fountain", "succeeded")
        home.drop("broken")
        home.wait_state("broken", "failed")
        got = notification_bus.wait_for(2)
        assert len(got) == 2
        ready, failed = got
        assert ready["app_name"] == "dropmesh"
        assert "fountain is ready" in ready["summary"]
        assert f"{job['id']}_textured_mesh_poisson.glb" in ready["body"]
        assert "broken failed" in failed["summary"] and "mapping" in failed["body"]
        home.stop()
        home.start()
        home.drop("other", images="../photos/nope")  # a rejection: the third notification
        got = notification_bus.wait_for(3)
        assert len(got) == 3 and "rejected" in got[2]["summary"]
        exports = home.cli("exports", "--json").stdout
        assert '"exists": true' in exports
    finally:
        home.stop()


def test_no_notification_server_job_still_succeeds(
    tmp_path: Path, notification_bus: NotificationBus
) -> None:
    notification_bus.stop_server()
    home = Home(tmp_path / "home", env=notification_bus.env)
    try:
        home.images("quiet")
        home.start()
        home.drop("quiet")
        home.wait_state("quiet", "succeeded")
        wait_for(lambda: "notification not shown" in home.log(), 10)
        assert home.log().count("notification not shown") == 1
    finally:
        home.stop()
