"""``open_store``: what a ``checkpoint=`` argument names, resolved to a store at run time."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from loomc.store.memory import MemoryStore
from loomc.store.protocol import Durability, default_db_path
from loomc.store.sqlite.sync import SQLiteStore

__all__ = ["open_store", "replace_durability"]

_stores: dict[tuple[str, str], SQLiteStore] = {}
_stores_lock = threading.Lock()


def open_store(checkpoint: Any, durability: Durability | None = None) -> Any:
    """Resolve a ``checkpoint=`` argument to a store, at run time (never at decoration).

    ``"sqlite"`` or ``None``: the default database; ``"memory"``: a fresh
    :class:`MemoryStore`; a path: a SQLite file; a store object: itself.
    """
    if checkpoint is None or checkpoint == "sqlite":
        path = default_db_path()
    elif checkpoint == "memory":
        return MemoryStore()
    elif isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint)
    else:
        if isinstance(getattr(checkpoint, "sync", None), SQLiteStore):
            checkpoint = checkpoint.sync  # an AsyncSQLiteStore: the engine names its file by the sync store
        if durability is not None and isinstance(checkpoint, SQLiteStore) and checkpoint.durability != durability:
            return replace_durability(checkpoint, durability)
        return checkpoint
    key = (str(path.resolve()), durability or "power")
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = SQLiteStore(path, durability=durability or "power")
        return store


def replace_durability(store: SQLiteStore, durability: Durability) -> SQLiteStore:
    """A store on the same file with another durability."""
    return open_store(store.path, durability)  # type: ignore[no-any-return]
