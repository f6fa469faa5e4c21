"""Who may read the page: the bind rule, the token, the Host check, and the headers every answer carries.

- Bound to a loopback address without a token, the page answers only requests whose
  ``Host`` names this machine (``127.0.0.1``, ``localhost``, ``[::1]``): a web page
  elsewhere that points a name of its own at 127.0.0.1 (DNS rebinding) is refused.
- With a token (required for any other address), every request carries it: an
  ``Authorization: Bearer`` header, or the cookie set when a link with ``?token=`` is
  opened (the answer then redirects to the same link without the token). Compared in
  constant time.
- A request that writes (POST) must come from the page itself: an ``Origin`` naming
  another site is refused.
- Every answer forbids scripts, styles and frames from anywhere but the page's own
  ``/static/`` files (Content-Security-Policy), so even a stored string that escaped
  escaping could not run; and it says how long the server took (``Server-Timing``).
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from loomc._core.errors import LoomcError

__all__ = ["COOKIE", "Guard", "check_bind", "is_loopback"]

COOKIE = "loomc_ui_token"
TOKEN_ENV = "LOOMC_UI_TOKEN"  # noqa: S105 - the name of the variable, not a token

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class UnsafeBind(LoomcError, ValueError):
    """``loomc ui`` was asked to listen beyond this machine without a token."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable only from this machine."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=")


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen on a non-loopback address without a token, and a token a cookie cannot carry.

    Raises:
        UnsafeBind: ``host`` is not a loopback address and no token was given.
        ValueError: the token is empty or holds a character outside ``A-Z a-z 0-9 - . _ ~ + / =``.
    """
    if token is not None and (not token or not set(token) <= _TOKEN_CHARS):
        raise ValueError(
            "--token: use a non-empty token of letters, digits and - . _ ~ + / = only "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe())')"
        )
    if not is_loopback(host) and not token:
        shown = host or "every address"
        raise UnsafeBind(
            f"--host {shown} would show your runs to the network: pass --token T (or set ${TOKEN_ENV}) "
            "so every request must carry it, or bind to 127.0.0.1"
        )


def _host_name(host_header: str) -> str:
    """The name in a ``Host`` header, without its port (``[::1]:8765`` -> ``::1``)."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class Guard:
    """ASGI middleware: the token, the Host and Origin checks, and the security headers.

    Args:
        app: the application it guards.
        token: the token every request must carry (``None``: none, and only requests
            addressed to this machine by name are answered).
    """

    def __init__(self, app: Any, token: str | None = None) -> None:
        self.app = app
        self.token = token or None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        async def send_guarded(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                took = (time.perf_counter() - started) * 1000
                message = {**message, "headers": [*message.get("headers", []), *_HEADERS,
                                                   (b"server-timing", f"app;dur={took:.1f}".encode())]}
            await send(message)

        refusal = self._refusal(scope, headers)
        if refusal is not None:
            status, text, extra = refusal
            await _answer(send_guarded, status, text, extra)
            return
        await self.app(scope, receive, send_guarded)

    def _refusal(self, scope: dict[str, Any], headers: dict[str, str]) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
        """``(status, message, headers)`` when the request is refused (or redirected), else ``None``."""
        host = headers.get("host", "")
        if self.token is None and not is_loopback(_host_name(host)):
            return 421, (
                "loomc ui answers only to this machine (open it as http://127.0.0.1:PORT/); "
                "to serve it to others, restart it with --host and --token"
            ), []
        if scope["method"] not in ("GET", "HEAD"):
            origin = headers.get("origin")
            if origin is not None and urlsplit(origin).netloc != host:
                return 403, "a form on another site cannot write here; use this page's own form", []
        if self.token is None:
            return None
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
        given = query.get("token")
        if given is not None and self._matches(given):
            # A link with the token: keep it in a cookie, then show the link without it
            # (so it does not stay in the address bar or the history).
            rest = urlencode([(k, v) for k, v in query.items() if k != "token"])
            where = scope.get("root_path", "") + scope["path"] + (f"?{rest}" if rest else "")
            cookie = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Lax"
            return 303, "signed in", [(b"location", where.encode("latin-1")), (b"set-cookie", cookie.encode("latin-1"))]
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and self._matches(auth[7:].strip()):
            return None
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 - a malformed cookie header is a missing token
            jar = SimpleCookie()
        if COOKIE in jar and self._matches(jar[COOKIE].value):
            return None
        return 401, (
            "this page needs the token loomc ui was started with: open the link it printed "
            "(http://HOST:PORT/?token=...), or send the header Authorization: Bearer TOKEN"
        ), []

    def _matches(self, given: str) -> bool:
        assert self.token is not None
        return hmac.compare_digest(given.encode(), self.token.encode())


async def _answer(send: Any, status: int, text: str, extra: list[tuple[bytes, bytes]]) -> None:
    body = f"loomc ui: {text}\n".encode()
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"), *extra],
    })
    await send({"type": "http.response.body", "body": body})
