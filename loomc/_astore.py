"""The async twin of a checkpoint store.

``async_twin(store)`` gives the async face of a store for the async driver. Any store
is served by :class:`ThreadedStore`, which runs each call in a worker thread so the
event loop never blocks on SQLite.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["ThreadedStore", "async_twin"]


class ThreadedStore:
    """Async face of a sync store: every method runs in a worker thread."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)
        if not callable(method):
            return method

        async def call(*args: Any) -> Any:
            import anyio.to_thread

            return await anyio.to_thread.run_sync(lambda: method(*args))

        return call


_twins: dict[int, Any] = {}
_lock = threading.Lock()


def async_twin(store: Any) -> Any:
    """The async face of ``store`` (itself when it is already async)."""
    if getattr(store, "is_async", False):
        return store
    key = id(store)
    with _lock:
        twin = _twins.get(key)
        if twin is None or twin.store is not store:
            twin = _twins[key] = ThreadedStore(store)
        return twin
