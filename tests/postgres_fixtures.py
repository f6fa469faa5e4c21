"""A real PostgreSQL server for the test session (from the ``pgserver`` wheel) and a schema per test.

Loaded by ``tests/conftest.py``. The server starts once, on first use, in a temporary
directory and stops when the session ends. Each test that asks for ``pg_dsn`` gets a
fresh schema of its own, named in the DSN (``options=-csearch_path=...``): tests are
isolated without a database per test.
"""

from __future__ import annotations

import secrets
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest


@dataclass
class PgServer:
    """The session's PostgreSQL server."""

    handle: Any  # pgserver.PostgresServer
    uri: str

    def dsn(self, schema: str) -> str:
        """A DSN whose tables live in ``schema``."""
        return f"{self.uri}{'&' if '?' in self.uri else '?'}options={quote(f'-csearch_path={schema}')}"

    def new_schema(self) -> str:
        """Create an empty schema; its DSN."""
        import psycopg

        name = f"t_{secrets.token_hex(6)}"
        with psycopg.connect(self.uri, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {name}")  # type: ignore[call-overload]
        return self.dsn(name)

    def restart(self) -> None:
        """Stop the server (fast: its connections are ended) and start it again on the same data."""
        import pgserver

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
            pgserver.pg_ctl(["-w", "-m", "fast", "restart"], pgdata=self.handle.pgdata, user=self.handle.system_user, timeout=60)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """Start one PostgreSQL server for the session (stopped at its end)."""
    root = Path(tempfile.mkdtemp(prefix="loomc-pg-"))
    root.chmod(0o755)  # the server runs as its own user when the tests run as root
    with warnings.catch_warnings():
        # pgserver asks platformdirs for a runtime directory, which warns when XDG_RUNTIME_DIR is unset
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        import pgserver

        server = pgserver.get_server(root / "data", cleanup_mode="delete")
    try:
        yield PgServer(server, server.get_uri())
    finally:
        server.cleanup()


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> Iterator[str]:
    """A DSN naming a fresh, empty schema of the session's server.

    The stores loops opened on it (``checkpoint=dsn`` is cached per process) are closed
    after the test, so their connections do not pile up on the server.
    """
    from loomc.store import open as store_open

    dsn = pg_server.new_schema()
    yield dsn
    for key in [k for k in store_open._pg_stores if k[0] == dsn]:
        store_open._pg_stores.pop(key).close()
