"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from dbus_notifications import NotificationBus, private_notification_bus


@pytest.fixture
def notification_bus() -> Iterator[NotificationBus]:
    """A private D-Bus session bus with a recording notification server.

    ``.env`` is the environment for subprocesses (DBUS_SESSION_BUS_ADDRESS set),
    ``.received()`` the notifications recorded so far, ``.stop_server()`` leaves the bus
    without a notification server.
    """
    with private_notification_bus() as bus:
        yield bus
