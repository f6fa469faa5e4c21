"""``open_store``: what a ``checkpoint=`` argument names, resolved to a store at run time."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from loomc.store.memory import MemoryStore
from loomc.store.postgres import is_dsn
from loomc.store.protocol import Durability, default_db_path
from loomc.store.sqlite.sync import SQLiteStore

__all__ = ["open_postgres", "open_store", "replace_durability"]

_stores: dict[tuple[str, str], SQLiteStore] = {}
_pg_stores: dict[tuple[str, str], Any] = {}
_stores_lock = threading.Lock()


def open_store(checkpoint: Any, durability: Durability | None = None) -> Any:
    """Resolve a ``checkpoint=`` argument to a store, at run time (never at decoration).

    ``"sqlite"`` or ``None``: the default database (``$LOOMC_DB``, which may be a
    PostgreSQL URI); ``"memory"``: a fresh :class:`MemoryStore`; ``"postgresql://..."``
    (or ``"postgres://..."``): a :class:`~loomc.PostgresStore`; a path: a SQLite file; a
    store object: itself.
    """
    if checkpoint is None or checkpoint == "sqlite":
        env = os.environ.get("LOOMC_DB")
        if is_dsn(env):
            return open_postgres(env, durability)  # type: ignore[arg-type]
        path = default_db_path()
    elif checkpoint == "memory":
        return MemoryStore()
    elif is_dsn(checkpoint):
        return open_postgres(checkpoint, durability)
    elif isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint)
    else:
        if getattr(checkpoint, "is_async", False) and getattr(checkpoint, "sync", None) is not None:
            checkpoint = checkpoint.sync  # an async store: the engine names its database by the sync store
        if durability is not None and isinstance(checkpoint, SQLiteStore) and checkpoint.durability != durability:
            return replace_durability(checkpoint, durability)
        if durability is not None and is_dsn(getattr(checkpoint, "dsn", None)) and checkpoint.durability != durability:
            return open_postgres(checkpoint.dsn, durability)
        return checkpoint
    key = (str(path.resolve()), durability or "power")
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = SQLiteStore(path, durability=durability or "power")
        return store


def open_postgres(dsn: str, durability: Durability | None = None) -> Any:
    """The process's :class:`~loomc.PostgresStore` for ``dsn`` and ``durability`` (one pool each).

    Raises:
        LoomcError: the ``postgres`` extra is not installed.
    """
    key = (dsn, durability or "power")
    with _stores_lock:
        store = _pg_stores.get(key)
        if store is None:
            from loomc.store.postgres.sync import PostgresStore

            store = _pg_stores[key] = PostgresStore(dsn, durability=durability or "power")
        return store


def replace_durability(store: SQLiteStore, durability: Durability) -> SQLiteStore:
    """A store on the same file with another durability."""
    return open_store(store.path, durability)  # type: ignore[no-any-return]
