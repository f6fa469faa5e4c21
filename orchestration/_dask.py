"""``DaskExecutor``: a graph's nodes and map items as tasks of a Dask cluster (``distributed``).

Each unit (``orchestration._executor.Unit``) is one Dask task calling
:func:`~orchestration._executor.run_unit` on a worker; the task's function and the
unit's ``@loop`` travel by Dask's own serialisation (cloudpickle), the runs live in the
store. ``distributed`` is imported when the executor opens, never by ``import orchestration``.
"""

from __future__ import annotations

import atexit
import secrets
import threading
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel

from loomc._core.errors import LoomcError
from orchestration._executor import StoreAddress, Unit, UnitCancelled, UnitLost, UnitOutcome, run_unit

__all__ = ["DaskExecutor"]

INSTALL = "pip install 'loomc[dask]'"


def _require_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise LoomcError(
            f"DaskExecutor needs Dask's distributed package ({exc.name} is missing); install it with {INSTALL}"
        ) from None
    return distributed


class DaskExecutor:
    """Run a graph's nodes, and each item of its map nodes, as tasks on a Dask cluster.

    Args:
        address: the scheduler's address (``"tcp://10.0.0.5:8786"``), a ``distributed.Client``
            (used as it is, never closed here), or ``None``: a ``LocalCluster`` of worker
            processes bound to 127.0.0.1, started when the first graph runs and kept for the
            next ones until :meth:`close` (or the end of the process).
        options: for ``None``, ``LocalCluster``'s keyword arguments (``n_workers=``,
            ``threads_per_worker=``, ``resources=``...); for an address, ``Client``'s.

    The graph's store must be one every worker reaches: a PostgreSQL database
    (``checkpoint="postgresql://..."``). Each task is given its run's place in the tree,
    its input, the store's address and the graph's wall-clock end; the budget is shared
    through the database.

    Example::

        graph = Graph("report", budget=Budget(usd=5), checkpoint="postgresql://db.internal/loomc",
                      executor=DaskExecutor("tcp://10.0.0.5:8786"))
    """

    def __init__(self, address: Any = None, **options: Any) -> None:
        if address is not None and not isinstance(address, str) and not _is_client(address):
            raise TypeError(
                f"DaskExecutor(address={address!r}): give a scheduler address such as 'tcp://10.0.0.5:8786', "
                "a distributed.Client, or None for a local cluster"
            )
        self.address = address
        self.options = options
        self._client: Any = None
        self._cluster: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        where = "local cluster" if self.address is None else (self.address if isinstance(self.address, str) else "client")
        return f"<DaskExecutor {where}>"

    def __enter__(self) -> DaskExecutor:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client(self) -> Any:
        """The ``distributed.Client`` in use (opening the executor if needed)."""
        self.open()
        return self._client

    # -- the executor seam -----------------------------------------------------------
    def check_store(self, store: Any) -> StoreAddress:
        """The store's address for the workers; a file or memory store is refused (they cannot share it).

        Raises:
            LoomcError: the store is not one every worker reaches, saying what to use instead.
        """
        from loomc.store.postgres import is_dsn

        dsn = getattr(store, "dsn", None)
        ttl = getattr(store, "lease_ttl", None)
        if isinstance(dsn, str) and is_dsn(dsn):
            if not callable(getattr(store, "reserve_shared", None)):
                raise LoomcError(
                    "DaskExecutor: this PostgreSQL store cannot hold a budget shared by processes; "
                    "upgrade loomc on the driver and the workers"
                )
            return StoreAddress(dsn, ttl)
        path = getattr(store, "path", None)
        what = f"the SQLite file {path}" if path is not None else "an in-memory store"
        raise LoomcError(
            f"DaskExecutor: the graph's store is {what}, which Dask workers in other processes or on other machines "
            "cannot share; store the graph in PostgreSQL: Graph(..., checkpoint='postgresql://USER@HOST/DB') "
            "(or LOOMC_DB / --db), or run it without executor= (in this process)"
        )

    def open(self) -> None:
        """Connect to the scheduler (or start the local cluster); once."""
        with self._lock:
            if self._client is not None:
                return
            distributed = _require_distributed()
            if _is_client(self.address):
                self._client = self.address
                return
            if self.address is None:
                options = {"host": "127.0.0.1", "processes": True, "dashboard_address": None, **self.options}
                # the scheduler's HTTP endpoints on a free port of 127.0.0.1 (never a fixed, maybe busy, one)
                options["scheduler_kwargs"] = {"dashboard_address": "127.0.0.1:0", **options.get("scheduler_kwargs", {})}
                self._cluster = distributed.LocalCluster(**options)
                self._client = distributed.Client(self._cluster)
            else:
                try:
                    self._client = distributed.Client(self.address, **self.options)
                except (OSError, TimeoutError) as exc:
                    raise LoomcError(
                        f"DaskExecutor: cannot reach the Dask scheduler at {self.address}: {exc}; check the address "
                        "and that `dask scheduler` is running"
                    ) from None
            atexit.register(self.close)

    def close(self) -> None:
        """Close the client and the local cluster this executor started (a client given to it stays open)."""
        with self._lock:
            client, cluster = self._client, self._cluster
            self._client = self._cluster = None
        if client is not None and not _is_client(self.address):
            client.close()
        if cluster is not None:
            cluster.close()

    def submit(self, unit: Unit) -> Any:
        """One Dask task running :func:`run_unit` (a fresh key: never merged with an earlier attempt's)."""
        key = f"loomc-{unit.key}-{unit.parent_run_id[:12]}-{unit.call_index}-{secrets.token_hex(4)}"
        return self.client.submit(run_unit, unit, key=key, pure=False, resources=unit.resources or None)

    def cancel(self, handles: Sequence[Any]) -> None:
        """Cancel the tasks (those already running stop at their next step boundary: the graph's row says so)."""
        client = self._client
        if client is not None and handles:
            try:
                client.cancel(list(handles))
            except Exception:  # noqa: BLE001, S110 - a scheduler gone cannot run them either
                pass

    async def wait(self, handle: Any) -> UnitOutcome:
        """The task's outcome, without holding a thread while it runs.

        Raises:
            UnitCancelled: the task was cancelled.
            UnitLost: the cluster gave up on it (``KilledWorker``: the workers running it kept dying).
        """
        done = anyio.Event()
        token = anyio.lowlevel.current_token()
        box: list[Any] = []

        def finished(future: Any) -> None:  # in a thread of distributed's
            try:
                box.append(future.result())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                box.append(exc)
            try:
                anyio.from_thread.run_sync(done.set, token=token)
            except RuntimeError:  # the graph's event loop is gone: nobody waits any more
                pass

        handle.add_done_callback(finished)
        await done.wait()
        out = box[0]
        if isinstance(out, UnitOutcome):
            return out
        if type(out).__name__ == "CancelledError" or handle.cancelled():
            raise UnitCancelled(f"task {handle.key} was cancelled")
        if type(out).__name__ == "KilledWorker":
            raise UnitLost(f"Dask gave up on task {handle.key}: {out}")
        raise out


def _is_client(value: Any) -> bool:
    if value is None or isinstance(value, str):
        return False
    try:
        from distributed import Client
    except ImportError:
        return False
    return isinstance(value, Client)
