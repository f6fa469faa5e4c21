"""Serve the application with uvicorn on a socket bound here (so a busy port is one clear error)."""

from __future__ import annotations

import errno
import socket
import sys
from typing import Any

from loomc._core.errors import LoomcError
from loomc.ui._guard import check_bind

__all__ = ["ServeError", "bind", "serve", "url_of"]


class ServeError(LoomcError):
    """``loomc ui`` cannot listen where it was asked to."""


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one).

    Raises:
        ServeError: the host cannot be resolved, the port is taken or not allowed.
    """
    try:
        family, _, _, _, addr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ServeError(f"--host {host}: cannot resolve it ({exc.strerror}); use an address such as 127.0.0.1") from exc
    try:
        return socket.create_server(addr[:2], family=family)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(f"port {port} on {host} is in use: pass --port N (0 picks a free port)") from exc
        if exc.errno == errno.EACCES:
            raise ServeError(f"port {port} needs privileges this process lacks: pass --port N above 1023") from exc
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ServeError(f"--host {host} is not an address of this machine: use 127.0.0.1, or one this machine has") from exc
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def url_of(sock: socket.socket, host: str, token: str | None) -> str:
    """The address to open in a browser (with ``?token=`` when there is one)."""
    port = sock.getsockname()[1]
    # every address: this machine's loopback is one of them
    shown = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host  # noqa: S104
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def serve(store: Any, host: str = "127.0.0.1", port: int = 8765, token: str | None = None, *, where: str = "") -> None:
    """Serve ``loomc ui`` over ``store`` until interrupted (Ctrl-C, SIGTERM).

    Raises:
        UnsafeBind: a non-loopback ``host`` without a token.
        ServeError: the address cannot be listened on.
    """
    check_bind(host, token)
    import uvicorn

    from loomc.ui._app import create_app

    app = create_app(store, token)
    sock = bind(host, port)
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, proxy_headers=False, server_header=False, lifespan="off",
    )
    sys.stdout.write(f"loomc ui: runs of {where or 'the store'} at {url_of(sock, host, token)} (Ctrl-C stops it)\n")
    sys.stdout.flush()
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
