"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
