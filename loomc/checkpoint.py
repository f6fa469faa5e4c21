"""Checkpoint stores (loomc 0.3.0 module path)."""

from __future__ import annotations

from loomc._store import CheckpointStore, MemoryStore, SQLiteStore
from loomc._types import RunInfo, RunStatus, StepRecord

SQLiteCheckpointStore = SQLiteStore

__all__ = ["CheckpointStore", "MemoryStore", "RunInfo", "RunStatus", "SQLiteCheckpointStore", "SQLiteStore", "StepRecord"]
