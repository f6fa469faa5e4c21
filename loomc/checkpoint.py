"""Checkpoint stores (loomc 0.3.0 module path)."""

from __future__ import annotations

from loomc._core.types import RunInfo, RunStatus, StepRecord
from loomc.store.sqlite.sync import CheckpointStore, MemoryStore, SQLiteStore

SQLiteCheckpointStore = SQLiteStore

__all__ = ["CheckpointStore", "MemoryStore", "RunInfo", "RunStatus", "SQLiteCheckpointStore", "SQLiteStore", "StepRecord"]
