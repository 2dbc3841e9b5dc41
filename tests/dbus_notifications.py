"""A private D-Bus session bus with a recording notification server, for tests.

``private_notification_bus()`` starts its own ``dbus-daemon`` (a throw-away config: no
service activation, so nothing on the machine can answer in place of the test server)
and a notification server in a subprocess that owns ``org.freedesktop.Notifications``,
implements ``Notify``, ``GetCapabilities``, ``GetServerInformation`` and
``CloseNotification``, and appends every Notify call as one JSON line to a file.

Run as a script it is that server: ``python dbus_notifications.py ADDRESS OUTFILE``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BUS_NAME = "org.freedesktop.Notifications"
OBJECT_PATH = "/org/freedesktop/Notifications"
SERVER_INFO = ("dropmesh-test-notifications", "dropmesh", "1.0", "1.2")
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
# dbus-python clients introspect before calling, to learn the argument signatures.
INTROSPECTION_XML = """<node>
  <interface name="org.freedesktop.DBus.Introspectable">
    <method name="Introspect"><arg direction="out" type="s"/></method>
  </interface>
  <interface name="org.freedesktop.Notifications">
    <method name="Notify">
      <arg direction="in" type="s"/><arg direction="in" type="u"/>
      <arg direction="in" type="s"/><arg direction="in" type="s"/>
      <arg direction="in" type="s"/><arg direction="in" type="as"/>
      <arg direction="in" type="a{sv}"/><arg direction="in" type="i"/>
      <arg direction="out" type="u"/>
    </method>
    <method name="CloseNotification"><arg direction="in" type="u"/></method>
    <method name="GetCapabilities"><arg direction="out" type="as"/></method>
    <method name="GetServerInformation">
      <arg direction="out" type="s"/><arg direction="out" type="s"/>
      <arg direction="out" type="s"/><arg direction="out" type="s"/>
    </method>
  </interface>
</node>
"""

_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


class NotificationBus:
    """A running private bus; ``env`` is what a subprocess needs to reach it."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.address = ""
        self.records = workdir / "notifications.jsonl"
        self._bus: subprocess.Popen[str] | None = None
        self._server: subprocess.Popen[str] | None = None

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["DBUS_SESSION_BUS_ADDRESS"] = self.address
        return env

    def received(self) -> list[dict[str, Any]]:
        """Every Notify call the server has answered, oldest first."""
        if not self.records.exists():
            return []
        lines = self.records.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until at least ``count`` notifications were recorded; return them all."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.received()
            if len(got) >= count or time.monotonic() >= deadline:
                return got
            time.sleep(0.05)

    # lifecycle ---------------------------------------------------------------

    def start_bus(self) -> None:
        if shutil.which("dbus-daemon") is None:
            raise RuntimeError("dbus-daemon not found (Debian package: dbus-daemon)")
        socket_path = self.workdir / "bus.sock"
        config = self.workdir / "bus.conf"
        config.write_text(_BUS_CONFIG.format(socket=socket_path), encoding="utf-8")
        # Its stderr goes to a file: it complains about fd limits when not run by root.
        with (self.workdir / "dbus-daemon.log").open("w") as log:
            self._bus = subprocess.Popen(
                ["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address"],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        assert self._bus.stdout is not None
        self.address = self._bus.stdout.readline().strip()
        if not self.address:
            raise RuntimeError(f"dbus-daemon exited with {self._bus.wait(5)}")

    def start_server(self, *, markup: bool = True, reply_delay_s: float = 0.0) -> None:
        """Start the notification server; returns once it owns the bus name. With
        reply_delay_s it records each Notify call at once and answers it that much later
        (a slow server: the sender is still waiting when the record appears)."""
        if self._server is not None:
            raise RuntimeError("notification server already running")
        cmd = [sys.executable, str(Path(__file__).resolve()), self.address, str(self.records)]
        if not markup:
            cmd.append("--no-markup")
        if reply_delay_s:
            cmd += ["--reply-delay", str(reply_delay_s)]
        self._server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self._server.stdout is not None
        line = self._server.stdout.readline().strip()
        if line != "ready":
            code = self._server.wait(5)
            self._server = None
            raise RuntimeError(f"notification server failed to start (exit {code})")

    def stop_server(self) -> None:
        """Stop the notification server; the bus keeps running without one."""
        proc, self._server = self._server, None
        if proc is not None:
            _terminate(proc)
            # The bus drops the name owner asynchronously; wait until it has.
            deadline = time.monotonic() + 5
            while _name_has_owner(self.address) and time.monotonic() < deadline:
                time.sleep(0.02)

    def close(self) -> None:
        self.stop_server()
        bus, self._bus = self._bus, None
        if bus is not None:
            _terminate(bus)


def _terminate(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc.stdout is not None:
        proc.stdout.close()


def _name_has_owner(address: str) -> bool:
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection

    with open_dbus_connection(bus=address) as conn:
        reply = conn.send_and_get_reply(message_bus.NameHasOwner(BUS_NAME), timeout=5)
        return bool(reply.body[0])


@contextlib.contextmanager
def private_notification_bus(
    *, server: bool = True, markup: bool = True
) -> Iterator[NotificationBus]:
    """A private session bus, with a recording notification server unless ``server=False``."""
    with tempfile.TemporaryDirectory(prefix="dropmesh-dbus-") as tmp:
        bus = NotificationBus(Path(tmp))
        try:
            bus.start_bus()
            if server:
                bus.start_server(markup=markup)
            yield bus
        finally:
            bus.close()


# the server ---------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def serve(address: str, outfile: Path, *, markup: bool = True, reply_delay_s: float = 0) -> None:
    from jeepney import HeaderFields, MessageType, new_error, new_method_return
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection

    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    capabilities = ["body", "actions", "persistence"] + (["body-markup"] if markup else [])
    next_id = 0
    with open_dbus_connection(bus=address) as conn:
        # flags=4: DBUS_NAME_FLAG_DO_NOT_QUEUE; reply 1 means we are the primary owner.
        reply = conn.send_and_get_reply(message_bus.RequestName(BUS_NAME, 4), timeout=5)
        if reply.body[0] != 1:
            raise SystemExit(f"could not own {BUS_NAME} (RequestName -> {reply.body[0]})")
        print("ready", flush=True)
        while not stop:
            try:
                msg = conn.receive(timeout=0.2)
            except TimeoutError:
                continue
            except (ConnectionError, OSError):
                break
            if msg.header.message_type != MessageType.method_call:
                continue
            fields = msg.header.fields
            member = fields.get(HeaderFields.member)
            interface = fields.get(HeaderFields.interface, BUS_NAME)
            if fields.get(HeaderFields.path) != OBJECT_PATH:
                conn.send(new_error(msg, "org.freedesktop.DBus.Error.UnknownObject"))
            elif interface == INTROSPECTABLE and member == "Introspect":
                conn.send(new_method_return(msg, "s", (INTROSPECTION_XML,)))
            elif interface != BUS_NAME:
                conn.send(new_error(msg, "org.freedesktop.DBus.Error.UnknownInterface"))
            elif member == "Notify":
                app_name, replaces_id, app_icon, summary, body, actions, hints, timeout = msg.body
                next_id += 1
                record = {
                    "id": next_id,
                    "app_name": app_name,
                    "replaces_id": replaces_id,
                    "app_icon": app_icon,
                    "summary": summary,
                    "body": body,
                    "actions": list(actions),
                    "hints": {k: _jsonable(v[1]) for k, v in hints.items()},
                    "expire_timeout": timeout,
                }
                # Record before replying: whoever got the reply can read the record.
                with outfile.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                time.sleep(reply_delay_s)
                conn.send(new_method_return(msg, "u", (next_id,)))
            elif member == "GetCapabilities":
                conn.send(new_method_return(msg, "as", (capabilities,)))
            elif member == "GetServerInformation":
                conn.send(new_method_return(msg, "ssss", SERVER_INFO))
            elif member == "CloseNotification":
                conn.send(new_method_return(msg))
            else:
                conn.send(new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod"))


def main() -> None:
    parser = argparse.ArgumentParser(description="Recording desktop-notification server.")
    parser.add_argument("address", help="D-Bus address of the bus to serve on")
    parser.add_argument("outfile", type=Path, help="JSON-lines file of received notifications")
    parser.add_argument("--no-markup", action="store_true", help="do not offer body-markup")
    parser.add_argument("--reply-delay", type=float, default=0.0, help="answer Notify late")
    args = parser.parse_args()
    serve(args.address, args.outfile, markup=not args.no_markup, reply_delay_s=args.reply_delay)


if __name__ == "__main__":
    main()
