"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from dbus_notifications import NotificationBus, private_notification_bus
from pgcluster import Cluster, running_cluster, skip_reason


@pytest.fixture
def notification_bus() -> Iterator[NotificationBus]:
    """A private D-Bus session bus with a recording notification server.

    ``.env`` is the environment for subprocesses (DBUS_SESSION_BUS_ADDRESS set),
    ``.received()`` the notifications recorded so far, ``.stop_server()`` leaves the bus
    without a notification server.
    """
    with private_notification_bus() as bus:
        yield bus


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """One throwaway PostgreSQL server on loopback for the whole session."""
    reason = skip_reason()
    if reason is not None:
        if os.environ.get("DROPMESH_REQUIRE_POSTGRES"):
            pytest.fail(f"DROPMESH_REQUIRE_POSTGRES is set, but {reason}")
        pytest.skip(reason)
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_url(pg_cluster: Cluster) -> str:
    """A fresh, empty PostgreSQL database for one test."""
    return pg_cluster.new_database()
