"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["tests.postgres_fixtures"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_default_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own default database, so none writes under the repository."""
    monkeypatch.setenv("LOOMC_DB", str(tmp_path / "default-checkpoints.db"))


@pytest.fixture
def db(tmp_path: Path) -> str:
    """A fresh SQLite database path in a temporary directory."""
    return str(tmp_path / "loomc.db")


@pytest.fixture
def no_blocking() -> Iterator[Any]:
    """Fail the test on any blocking call (SQLite, files, sleep) made on an asyncio event loop.

    Opt in with ``pytestmark = pytest.mark.usefixtures("no_blocking")``. Reads of ``/proc``
    (lease liveness) are memory-backed, not disk I/O, and are allowed.
    """
    from blockbuster import blockbuster_ctx

    with blockbuster_ctx() as bb:
        for name in ("io.BufferedReader.read", "io.FileIO.read", "os.stat", "os.path.exists"):
            if name in bb.functions:
                bb.functions[name].can_block_in("loomc/store/lease.py", {"_start_time", "is_alive"})
        yield bb
