"""Desktop notifications: what they say, and plyer's notify-send backend behind a real check
that they can land.

The wording (`exported_text`, `failed_text`, `rejected_text`) is written into the ledger's
outbox in the same transaction as what it announces, and shown later by `Notifier`.

plyer reports nothing back: its notify-send backend drops the exit status, and its
dbus-python backend keeps one session-bus connection for the life of the process, so
after the session bus restarts every later notification fails. So before each
notification we ask the session bus (with jeepney, a fresh connection each time) whether
anything owns ``org.freedesktop.Notifications`` and whether it renders body markup, and
only then hand the text to plyer's notify-send backend (a fresh process each time, which
follows the current bus). The backend is picked explicitly so that behaviour does not
change with whether dbus-python happens to be importable.
"""

from __future__ import annotations

import html
import logging
import os
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from daemon.humanize import words

log = logging.getLogger(__name__)

APP_NAME = "dropmesh"
# The freedesktop notification service (jeepney and plyer are imported only to show a
# notification, so the ledger, which stores the wording, does not load them).
NOTIFICATIONS_PATH = "/org/freedesktop/Notifications"
NOTIFICATIONS_NAME = "org.freedesktop.Notifications"
BUS_TIMEOUT_S = 2.0

# Kinds of failure already logged as a warning in this process (later ones log at debug).
_warned: set[str] = set()


class NotificationText(NamedTuple):
    title: str
    body: str


def exported_text(project: str, files: Sequence[Path], took_s: float) -> NotificationText:
    """A job's exports are ready: the files, their folder and how long the job took."""
    names = ", ".join(Path(f).name for f in files)
    return NotificationText(
        f"dropmesh: {project} is ready",
        f"{names}\nin {Path(files[0]).parent}\ntook {words(took_s)}",
    )


def failed_text(project: str, stage: str, message: str) -> NotificationText:
    return NotificationText(f"dropmesh: {project} failed", f"stage {stage}: {message}")


def rejected_text(request_name: str, message: str) -> NotificationText:
    return NotificationText(f"dropmesh: request {request_name} rejected", message)


class Unavailable(Exception):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class ServerInfo:
    address: str
    name: str
    version: str
    markup: bool


def session_bus_address() -> str | None:
    """The session bus address as libnotify finds it: the variable, else $XDG_RUNTIME_DIR/bus."""
    address = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
    if address:
        return address
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        path = os.path.join(runtime, "bus")
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return f"unix:path={path}"
        except OSError:
            pass
    return None


def probe() -> ServerInfo:
    """Check that a notification can be shown now; raise Unavailable saying why not."""
    if shutil.which("notify-send") is None:
        raise Unavailable("no-notify-send", "notify-send not found (Debian package libnotify-bin)")
    address = session_bus_address()
    if address is None:
        raise Unavailable("no-bus", "no D-Bus session bus (DBUS_SESSION_BUS_ADDRESS unset)")
    from jeepney import DBusAddress, new_method_call
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection
    from jeepney.wrappers import unwrap_msg

    service = DBusAddress(
        NOTIFICATIONS_PATH, bus_name=NOTIFICATIONS_NAME, interface=NOTIFICATIONS_NAME
    )
    try:
        with open_dbus_connection(bus=address, auth_timeout=BUS_TIMEOUT_S) as conn:
            reply = conn.send_and_get_reply(
                message_bus.NameHasOwner(NOTIFICATIONS_NAME), timeout=BUS_TIMEOUT_S
            )
            if not unwrap_msg(reply)[0]:
                raise Unavailable(
                    "no-server",
                    f"no notification server on the session bus (nothing owns "
                    f"{NOTIFICATIONS_NAME} on {address})",
                )
            caps = conn.send_and_get_reply(
                new_method_call(service, "GetCapabilities"), timeout=BUS_TIMEOUT_S
            )
            info = conn.send_and_get_reply(
                new_method_call(service, "GetServerInformation"), timeout=BUS_TIMEOUT_S
            )
            capabilities = unwrap_msg(caps)[0]
            name, _vendor, version, _spec = unwrap_msg(info)
    except Unavailable:
        raise
    except Exception as exc:  # connection refused, auth, timeout, error reply, bad address
        raise Unavailable(
            "bus-error", f"cannot query the notification server on {address}: {exc!r}"
        ) from exc
    return ServerInfo(address, name, version, "body-markup" in capabilities)


def _argv_safe(text: str) -> str:
    # notify-send would read a leading "-" as an option and fail (plyer hides the failure);
    # a zero-width space in front keeps the text looking the same.
    return "\u200b" + text if text.startswith("-") else text


class Notifier:
    """Best-effort desktop notifications: ``notify`` never raises."""

    def __init__(self) -> None:
        from plyer.platforms.linux.notification import NotifySendNotification

        self._backend = NotifySendNotification()

    def reachable(self) -> tuple[bool, str]:
        """For ``dropmesh doctor``: can a notification be shown, and what will show it."""
        try:
            server = probe()
        except Unavailable as exc:
            return False, exc.reason
        return True, (
            f"notification server {server.name} {server.version} on {server.address} "
            f"(sent with notify-send)"
        )

    def notify(self, title: str, message: str) -> bool:
        """Show a notification; True when a notification server took it."""
        try:
            server = probe()
            # The spec makes the body markup when the server offers body-markup; the
            # summary is always plain text.
            body = html.escape(message, quote=False) if server.markup else message
            self._backend.notify(
                title=_argv_safe(title or APP_NAME),
                message=_argv_safe(body),
                app_name=APP_NAME,
            )
        except Unavailable as exc:
            self._not_shown(exc.kind, exc.reason)
            return False
        except Exception as exc:  # never let a notification fail a job
            self._not_shown("send-error", f"notify-send failed: {exc!r}")
            return False
        return True

    @staticmethod
    def _not_shown(kind: str, reason: str) -> None:
        if kind in _warned:
            log.debug("desktop notification not shown: %s", reason)
        else:
            _warned.add(kind)
            log.warning("desktop notification not shown: %s", reason)
