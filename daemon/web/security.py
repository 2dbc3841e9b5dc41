"""Who may use the dashboard, and which files it may serve.

- Bound to loopback without a token, only requests whose Host names the loopback
  interface are served (a DNS-rebinding page cannot reach it under its own name).
- With a token (required for any other address), every page, API call and download
  needs it: `Authorization: Bearer T`, `X-Dropmesh-Token: T`, `?token=T` (a page then
  sets an HttpOnly, SameSite=Strict cookie and drops it from the address) or that cookie.
- A state-changing request (POST, PUT, PATCH, DELETE) needs the header X-Dropmesh-Token
  (the token itself when there is one; a cookie alone is not enough), and when the
  browser says where it comes from (Origin, Referer, Sec-Fetch-Site) it must be this
  same origin. A custom header cannot be sent cross-site without a CORS preflight,
  which the dashboard never grants.
- Files are served only when the ledger lists them as an export (or they are the job's
  log) and their real path, symlinks resolved, lies under results/<project>/.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

TOKEN_HEADER = "x-dropmesh-token"
COOKIE = "dropmesh_token"
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


def _host_name(host_header: str) -> str:
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class Guard:
    """ASGI middleware applying the rules above to every HTTP request."""

    def __init__(self, app: Any, *, token: str | None, loopback_only: bool) -> None:
        self.app = app
        self.token = token or None
        self.loopback_only = loopback_only

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method = scope["method"]
        path = scope["path"]
        host = headers.get("host", "")
        if self.loopback_only and not self.token and _host_name(host) not in LOOPBACK_NAMES:
            await _reply(send, 403, {"detail": f"host {host!r} is not this dashboard"})
            return
        if method in UNSAFE:
            why = self._cross_site(headers, host)
            if why:
                await _reply(send, 403, {"detail": why})
                return
        if self.token and not path.startswith("/static/"):
            given = self._given_token(headers, scope)
            if given is None or not hmac.compare_digest(given, self.token):
                if method == "GET" and not path.startswith("/api/") and path != "/openapi.json":
                    await _login_page(send)
                else:
                    await _reply(send, 401, {"detail": "this dashboard needs its token"})
                return
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            if "token" in query and method == "GET" and not path.startswith("/api/"):
                # Remember it in a cookie and take it out of the address bar and history.
                query.pop("token")
                target = path + ("?" + urlencode(query) if query else "")
                await _redirect_with_cookie(send, target, self.token)
                return
        await self.app(scope, receive, send)

    def _given_token(self, headers: dict[str, str], scope: dict[str, Any]) -> str | None:
        if scope["method"] in UNSAFE:
            return headers.get(TOKEN_HEADER)  # never a cookie: that is what CSRF rides on
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        if TOKEN_HEADER in headers:
            return headers[TOKEN_HEADER]
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        if "token" in query:
            return query["token"]
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                return value
        return None

    def _cross_site(self, headers: dict[str, str], host: str) -> str | None:
        if TOKEN_HEADER not in headers:
            return "state-changing requests need the X-Dropmesh-Token header"
        site = headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return f"cross-site request refused (Sec-Fetch-Site: {site})"
        for key in ("origin", "referer"):
            value = headers.get(key)
            if value is None:
                continue
            if value == "null" or urlsplit(value).netloc != host:
                return f"cross-site request refused ({key.title()}: {value})"
            break
        return None


async def _reply(send: Any, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(data)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


LOGIN_HTML = b"""<!doctype html><html><head><meta charset="utf-8"><title>dropmesh</title>
<link rel="stylesheet" href="/static/app.css"></head><body><main class="login">
<h1>dropmesh</h1><p>This dashboard needs its token (config <code>http_token</code>, or the
one printed when it started).</p><form method="get"><input name="token" type="password"
autofocus placeholder="token"> <button>Open</button></form></main></body></html>"""


async def _login_page(send: Any) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [(b"content-type", b"text/html; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": LOGIN_HTML})


async def _redirect_with_cookie(send: Any, target: str, token: str) -> None:
    cookie = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
    await send(
        {
            "type": "http.response.start",
            "status": 303,
            "headers": [
                (b"location", target.encode("latin-1")),
                (b"set-cookie", cookie.encode("latin-1")),
                (b"content-length", b"0"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b""})


def safe_file(path: str | Path, root: Path) -> Path | None:
    """The real path of `path` when it is a regular file under `root` (both with symlinks
    resolved), else None."""
    try:
        real = Path(os.path.realpath(path))
        base = Path(os.path.realpath(root))
    except (OSError, ValueError):
        return None
    if real != base and not real.is_relative_to(base):
        return None
    try:
        st = os.stat(real)
    except OSError:
        return None
    return real if stat.S_ISREG(st.st_mode) else None
