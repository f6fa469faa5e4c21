"""The async twin of a checkpoint store: ``AsyncCheckpointStore``, ``AsyncSQLiteStore`` on aiosqlite.

The async driver never blocks its event loop on SQLite. ``async_twin(store)`` gives it
the async face of the run's store:

- a :class:`~loomc.SQLiteStore` under asyncio gets an :class:`AsyncSQLiteStore` on the
  same file with the same durability: one aiosqlite connection (its own thread) per
  event loop, opened while runs use it and closed when the last one leaves;
- anything else (trio, where aiosqlite cannot run, a ``MemoryStore``, a custom store)
  gets a :class:`ThreadedStore`, which runs each call in a worker thread.

The operations are ``loomc.store.core``'s, written once for every store: reads are driven
on aiosqlite's public API, writes by the sync store's transaction driver in a worker
thread (aiosqlite has no public way to run a transaction of several statements in one
trip to its thread; one trip per statement would cost a step ~3 more trips).
"""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

from loomc._core.errors import StoreError
from loomc._core.holds import HeldCharge
from loomc._core.types import RunInfo, RunStatus, StepRecord
from loomc.store import core
from loomc.store import protocol as p
from loomc.store.core import Op, StateLoader
from loomc.store.protocol import AsyncCheckpointStore, Durability, NewRun, new_run_id
from loomc.store.sqlite import sql as _sql
from loomc.store.sqlite.sync import SQLiteStore, WriteOp

if TYPE_CHECKING:
    import os

    import aiosqlite
    import anyio

__all__ = ["AsyncCheckpointStore", "AsyncSQLiteStore", "ThreadedStore", "async_twin"]


class SQLiteOptions(TypedDict, total=False):
    """How a :class:`~loomc.SQLiteStore` opens its file (``durability``, ``create``)."""

    durability: Durability
    create: bool


def _current_loop() -> Any:
    """The running asyncio event loop (the object a connection belongs to)."""
    import asyncio

    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise StoreError(
            "AsyncSQLiteStore runs on asyncio only (aiosqlite); under trio or outside an event loop use "
            "SQLiteStore — async loops drive it from worker threads by themselves"
        ) from None


class AsyncSQLiteStore:
    """The SQLite store for async loops: the event loop never waits on SQLite.

    Same file format, operations (``loomc.store.core``) and semantics as
    :class:`~loomc.SQLiteStore`, awaited. Reads go through one aiosqlite connection per
    event loop. Writes are group-committed: those that tasks of the loop make while a
    transaction is under way are committed together in the next one, run by the sync
    store (``SQLiteStore.write_batch``) in a writer thread of its own (``loop.run_in_executor``):
    one trip and one fsync for all of them, shielded from cancellation, so a cancelled
    task never leaves one half done. Use it as an async context manager, or call
    :meth:`aclose` when done; it runs on asyncio only (under trio loomc offloads the sync
    store to worker threads instead).

    Args:
        path: as for :class:`~loomc.SQLiteStore`, with ``durability`` and ``create``.
        durability: ``"power"`` or ``"process"``.
        create: when ``False``, a missing database is a :class:`~loomc.StoreError`.
        sync: the :class:`~loomc.SQLiteStore` to mirror (its path and durability), instead.
    """

    is_async = True
    supports_deltas = True

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, sync: SQLiteStore | None = None, **options: Unpack[SQLiteOptions]
    ) -> None:
        # The sync store opens and migrates the database, commits the writes (in a worker
        # thread) and loads lazily-read history states.
        self._owns_sync = sync is None
        self.sync = sync if sync is not None else SQLiteStore(path, **options)
        self._conn: aiosqlite.Connection | None = None
        self._lock: anyio.Lock | None = None  # held while the connection opens
        self._batch: _Batch | None = None  # writes waiting for the next group commit
        self._writing = False  # a batch is in the writer thread
        self._writer: ThreadPoolExecutor | None = None  # runs the batches, in order, on one thread
        self._loop: Any = None
        self._users = 0

    @property
    def path(self) -> Any:
        """The database file."""
        return self.sync.path

    @property
    def db_path(self) -> str:
        """The database file path as a string."""
        return self.sync.db_path

    @property
    def durability(self) -> Durability:
        """``"power"`` or ``"process"``."""
        return self.sync.durability

    def __repr__(self) -> str:
        return f"AsyncSQLiteStore({str(self.path)!r}, durability={self.durability!r})"

    # -- connection -----------------------------------------------------------------
    async def __aenter__(self) -> AsyncSQLiteStore:
        self._users += 1
        try:
            await self._connect()
        except BaseException:
            self._users -= 1
            if self._users == 0 and self._conn is None:
                self._loop = self._lock = None  # nothing open: keep no reference to the loop
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._users -= 1
        if self._users <= 0:
            self._users = 0
            await self.aclose()

    async def _connect(self) -> aiosqlite.Connection:
        loop = _current_loop()
        if self._conn is not None:
            if self._loop is not loop:
                raise StoreError(
                    f"{self!r} is open in another event loop; use one AsyncSQLiteStore per event loop "
                    "(loomc's async loops do this by themselves)"
                )
            return self._conn
        import aiosqlite
        import anyio
        import anyio.to_thread

        lock = self._lock if self._lock is not None and self._loop is loop else anyio.Lock()
        self._lock, self._loop = lock, loop
        async with lock:
            if self._conn is None:
                with anyio.CancelScope(shield=True):
                    # the sync store opens the file first: its checks, its migrations
                    await anyio.to_thread.run_sync(self.sync.open)
                    self._conn = await aiosqlite.connect(
                        f"file:{self.path}?mode=rw", uri=True, isolation_level=None, timeout=_sql.BUSY_TIMEOUT_S
                    )
                    self._writer = ThreadPoolExecutor(1, thread_name_prefix="loomc-writer")
        assert self._conn is not None
        return self._conn

    async def aclose(self) -> None:
        """Close the connection (it reopens on next use)."""
        conn, self._conn = self._conn, None
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=False)  # a batch in flight still lands; its writers wait for it
        if conn is not None:
            import anyio
            import anyio.to_thread

            with anyio.CancelScope(shield=True):
                await conn.close()
                if self._owns_sync:
                    await anyio.to_thread.run_sync(self.sync.close)
        if self._users == 0 and self._conn is None:  # nobody reopened it meanwhile
            # let go of the event loop, so the per-loop cache entry goes when the loop does
            self._loop = self._lock = None

    async def _read(self, op: Op) -> Any:
        """Drive a read operation of the core on the aiosqlite connection."""
        import sqlite3

        conn = await self._connect()
        send: Any = None
        try:
            while True:
                _, sql, args = op.send(send)  # reads only ever QUERY
                send = list(await conn.execute_fetchall(sql, args))
        except StopIteration as done:
            return done.value
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {self.path}: {exc}") from exc

    async def _write(self, op: WriteOp) -> Any:
        """Run ``op(heartbeat)`` in a write transaction, group-committed; its result.

        One transaction is in the writer thread at a time; writes made meanwhile wait in
        the next batch, sent as soon as the current one lands (``SQLiteStore.write_batch``:
        one that fails fails alone). The caller waits until its batch is committed, even
        if it is cancelled meanwhile (then it re-raises the cancellation): a write is
        never left half done or unknown.
        """
        import asyncio

        await self._connect()
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch()
        i = len(batch.ops)
        batch.ops.append(op)
        if not self._writing:  # send it on the loop's next turn: writes made in this one join it
            self._writing = True
            self._loop.call_soon(self._send)
        cancelled: asyncio.CancelledError | None = None
        while not batch.landed:
            # A future of this writer's own, set when the batch lands: a cancellation cancels
            # it, never the batch. (``asyncio.shield`` of one shared future does the same at
            # the price of one more turn of the event loop, on every step.)
            waiter = self._loop.create_future()
            batch.waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError as exc:
                cancelled = exc
        err = batch.error or batch.errors.get(i)
        # A write that failed says so even when cancelled meanwhile (a cancellation that
        # lands on a write therefore means the write was made: the caller can rely on it).
        if err is not None:
            if isinstance(err, StoreError):
                raise StoreError(str(err)) from err
            raise err
        if cancelled is not None:
            # the cancellation itself, not a new one: anyio tells its cancel scopes' own apart by it
            raise cancelled
        return batch.results.get(i)

    def _send(self) -> None:
        """Hand the waiting batch to the writer thread (on the event loop, no await)."""
        batch, self._batch = self._batch, None
        assert batch is not None
        self._writing = True
        # A dedicated one-thread executor: batches run in order, and the hand-off costs
        # ~40 us, like aiosqlite's own (the shared default executor's costs ~50-90 us).
        # The thread wakes the loop itself when the batch is done (:meth:`_commit`), one
        # turn of the loop sooner than through ``run_in_executor``'s wrapped future.
        try:
            if self._writer is not None:
                self._writer.submit(self._commit, self._loop, batch)
            else:  # closed while this batch waited: it still lands, through the loop's executor
                self._loop.run_in_executor(None, self._commit, self._loop, batch)
        except RuntimeError:  # the executor is shut down: the event loop is closing
            batch.error = StoreError(f"the write to {self.path} was abandoned (its event loop is closing)")
            self._landed(batch)

    def _commit(self, loop: Any, batch: _Batch) -> None:
        """Commit ``batch`` (in the writer thread), then wake its writers on ``loop``."""
        try:
            batch.results, batch.errors = self.sync.write_batch(batch.ops)
        except BaseException as exc:  # noqa: BLE001 - every writer of the batch raises it
            batch.error = exc
        try:
            loop.call_soon_threadsafe(self._landed, batch)
        except RuntimeError:  # the event loop is closed: nobody waits for the batch any more
            pass

    def _landed(self, batch: _Batch) -> None:
        """The writer thread is done with ``batch``: wake its writers, send the next one."""
        batch.landed = True
        for waiter in batch.waiters:
            if not waiter.done():  # (a cancelled writer's; it waits again on a new one)
                waiter.set_result(None)
        self._writing = False
        if self._batch is not None:
            self._send()

    # -- runs -----------------------------------------------------------------------
    async def create_run(self, spec_hash: str, **kwargs: Any) -> str:
        """Create a run (status ``running``, no owner) and return its id."""
        return await self.begin_run(NewRun(spec_hash=spec_hash, **kwargs))

    async def begin_run(self, new: NewRun) -> str:
        """Create a run from ``new``, owned by ``new.owner``; returns its id."""
        run_id, where, ttl = new.run_id or new_run_id(), str(self.path), self.sync.ttl_s
        run_id = await self._write(lambda beat: core.begin_run(_sql, where, new, run_id, ttl))
        if new.owner:
            self.sync.hold_epoch(run_id, 1)
        return run_id  # type: ignore[no-any-return]

    async def get_run(self, run_id: str) -> RunInfo | None:
        """The run with exactly this id, or ``None``."""
        return await self._read(core.get_run(_sql, run_id))  # type: ignore[no-any-return]

    async def resolve(self, run_id: str) -> str:
        """The full id of the run whose id is or starts with ``run_id`` (see ``SQLiteStore.resolve``)."""
        return await self._read(core.resolve(_sql, str(self.path), run_id))  # type: ignore[no-any-return]

    async def list_runs(self, *, status: str | None = None, limit: int | None = None, roots_only: bool = False) -> list[RunInfo]:
        """Runs newest first."""
        return await self._read(core.list_runs(_sql, status, limit, roots_only))  # type: ignore[no-any-return]

    async def search_runs(
        self, *, status: str | None = None, roots_only: bool = False, id_prefix: str | None = None,
        name: str | None = None, before: tuple[str, str] | None = None, limit: int = 50,
    ) -> list[RunInfo]:
        """A page of runs, newest first, narrowed in the database (see :class:`~loomc.store.protocol.RunSearch`)."""
        op = core.list_runs(_sql, status, limit, roots_only, before=before, id_prefix=id_prefix, name=name)
        return await self._read(op)  # type: ignore[no-any-return]

    async def update_run_status(self, run_id: str, status: RunStatus | str) -> None:
        """Set a run's status."""
        await self._write(lambda beat: core.update_run_status(_sql, run_id, status))

    async def acquire(self, run_id: str, owner: str, budget: dict[str, Any] | None = None) -> None:
        """Take the run's lease for ``owner`` (raises :class:`~loomc.RunLocked` if a live process holds it)."""
        where, ttl = str(self.path), self.sync.ttl_s
        epoch = await self._write(lambda beat: core.acquire(_sql, where, run_id, owner, budget, ttl))
        self.sync.hold_epoch(run_id, epoch)

    async def renew_leases(self, owner: str, run_ids: list[str]) -> list[str]:
        """Renew the leases of the runs in ``run_ids`` that ``owner`` still holds; the ids it lost."""
        leases, ttl = [(run_id, self.sync.epoch_of(run_id)) for run_id in run_ids], self.sync.ttl_s
        return await self._write(lambda beat: core.renew_leases(_sql, owner, leases, ttl))  # type: ignore[no-any-return]

    async def commit_step(self, run_id: str, row: p.StepRow) -> None:
        """Write one step and the run's totals in one transaction; returns once it is committed."""
        ttl, epoch = self.sync.ttl_s, self.sync.epoch_of(run_id)
        await self._write(lambda beat: core.commit_step(_sql, run_id, row, ttl, epoch))

    async def finish_run(self, run_id: str, status: RunStatus, stop_reason: str | None, wall_s: float) -> None:
        """Record how an attempt ended."""
        epoch = self.sync.epoch_of(run_id)
        await self._write(lambda beat: core.finish_run(_sql, run_id, status, stop_reason, wall_s, epoch))

    async def set_meta(self, run_id: str, meta: dict[str, Any]) -> None:
        """Replace the run's free-form metadata (JSON)."""
        epoch = self.sync.epoch_of(run_id)
        await self._write(lambda beat: core.set_meta(_sql, run_id, meta, epoch))

    async def add_cost(self, run_id: str, usd: float) -> None:
        """Add to a run's total cost outside a step."""
        epoch = self.sync.epoch_of(run_id)
        await self._write(lambda beat: core.add_cost(_sql, run_id, usd, epoch))

    async def find_child(self, parent_run_id: str, parent_step: int, call_index: int) -> RunInfo | None:
        """The child run a parent step started as its ``call_index``-th nested loop."""
        return await self._read(core.find_child(_sql, parent_run_id, parent_step, call_index))  # type: ignore[no-any-return]

    async def children(self, run_id: str) -> list[RunInfo]:
        """Direct child runs, in the order their parent started them."""
        return await self._read(core.children(_sql, run_id))  # type: ignore[no-any-return]

    async def schema_info(self) -> p.SchemaInfo:
        """The database's schema version and the versions this loomc reads and writes."""
        return await self._read(core.schema_info(_sql))  # type: ignore[no-any-return]

    # -- holds ------------------------------------------------------------------------
    async def put_hold(self, run_id: str, hold_id: int, usd: float) -> None:
        """Commit a reservation of ``run_id`` before the call it pays for is sent (see ``SQLiteStore``)."""
        epoch = self.sync.epoch_of(run_id)
        await self._write(lambda beat: core.put_hold(_sql, run_id, hold_id, usd, epoch))

    async def drop_holds(self, hold_ids: tuple[int, ...]) -> None:
        """Delete holds whose spending is recorded by now (see ``SQLiteStore``)."""
        await self._write(lambda beat: core.drop_holds(_sql, hold_ids))

    async def charge_holds(self, run_id: str) -> HeldCharge | None:
        """Charge the holds left by ``run_id`` and the runs below it to ``run_id`` (see ``SQLiteStore``)."""
        return await self._write(lambda beat: core.charge_holds(_sql, run_id))  # type: ignore[no-any-return]

    # -- steps ----------------------------------------------------------------------
    async def save_step(self, run_id: str, record: StepRecord) -> None:
        """Write a step record and fold it into the run's totals (loomc 0.3.0 API)."""
        where, ttl, epoch = str(self.path), self.sync.ttl_s, self.sync.epoch_of(run_id)
        await self._write(lambda beat: core.save_step(_sql, where, run_id, record, ttl, epoch))

    async def load_steps(self, run_id: str) -> list[StepRecord]:
        """Every step of the run, states included, in order."""
        return await self._read(core.load_steps(_sql, str(self.path), run_id))  # type: ignore[no-any-return]

    async def stored_steps(self, run_id: str) -> list[p.StoredStep]:
        """Every step of the run with its state as stored (deltas made whole), in order."""
        return await self._read(core.stored_steps(_sql, str(self.path), run_id))  # type: ignore[no-any-return]

    async def stored_input(self, run_id: str) -> p.StoredInput | None:
        """The run's input as stored, its state type and next start (``None``: no such run)."""
        return await self._read(core.stored_input(_sql, run_id))  # type: ignore[no-any-return]

    async def stored_state(self, run_id: str, step_n: int) -> str | bytes | None:
        """A step's state as stored, a delta made whole (``None``: no such step; see ``SQLiteStore``)."""
        return await self._read(core.stored_state(_sql, str(self.path), run_id, step_n))  # type: ignore[no-any-return]

    async def load_state(self, run_id: str, step_n: int) -> Any:
        """The state a step committed (``step_n == -1``: the run's input)."""
        return await self._read(core.load_state(_sql, str(self.path), run_id, step_n))

    async def resume_point(self, run_id: str) -> p.ResumePoint:
        """The run's info, its last step and the state to start from (earlier steps: ``step_history``)."""
        loader = StateLoader(self.sync, run_id)
        return await self._read(core.resume_point(_sql, str(self.path), run_id, loader))  # type: ignore[no-any-return]

    async def step_history(self, run_id: str, before: int) -> list[StepRecord]:
        """The run's steps numbered below ``before``, in order (states loaded lazily)."""
        loader = StateLoader(self.sync, run_id)
        return await self._read(core.step_history(_sql, run_id, before, loader))  # type: ignore[no-any-return]

    async def step_window(
        self, run_id: str, after: int = -1, *, first: int | None = None, last: int | None = None,
        error_chars: int | None = None,
    ) -> list[StepRecord]:
        """Step metadata (no state) in step order, reading only the rows asked for (see ``SQLiteStore``)."""
        return await self._read(core.step_window(_sql, run_id, after, first, last, error_chars))  # type: ignore[no-any-return]

    async def step_totals(self, run_id: str, before: int) -> tuple[int, float]:
        """``(steps, cost)`` of a run's steps numbered below ``before``."""
        return await self._read(core.step_totals(_sql, run_id, before))  # type: ignore[no-any-return]


    # -- a run's whole life ---------------------------------------------------------------
    async def questions(self, run_id: str, tree: bool = False) -> list[p.Question]:
        """The questions the run's steps asked (``tree``: and those of the runs below it)."""
        return await self._read(core.questions(_sql, run_id, tree))  # type: ignore[no-any-return]

    async def wait_for_input(self, run_id: str, row: p.WaitRow) -> None:
        """Stop the run to wait for an answer (see ``SQLiteStore.wait_for_input``)."""
        epoch = self.sync.epoch_of(run_id)
        await self._write(lambda beat: core.wait_for_input(_sql, run_id, row, epoch))

    async def answer(self, question: p.Question, answer: str) -> None:
        """Store the answer (JSON text) to ``question`` (see ``SQLiteStore.answer``)."""
        where = str(self.path)
        await self._write(lambda beat: core.answer(_sql, where, question, answer))

    async def fork(
        self, run_id: str, at_step: int, *, new_run_id: str, state_blob: str | bytes | None = None,
        budget: dict[str, Any] | None = None,
    ) -> str:
        """Make run ``new_run_id`` from the history of ``run_id`` up to ``at_step`` (see ``core.fork``)."""
        where = str(self.path)
        return await self._write(lambda beat: core.fork(_sql, where, run_id, at_step, new_run_id, state_blob, budget))  # type: ignore[no-any-return]

    async def prune(self, **options: Any) -> p.PruneReport:
        """``SQLiteStore.prune`` in a worker thread (it runs several transactions)."""
        import anyio.to_thread

        return await anyio.to_thread.run_sync(lambda: self.sync.prune(**options))  # type: ignore[no-any-return]


class _Batch:
    """Writes committed together by :meth:`AsyncSQLiteStore._write`."""

    __slots__ = ("error", "errors", "landed", "ops", "results", "waiters")

    def __init__(self) -> None:
        self.ops: list[WriteOp] = []
        self.results: dict[int, Any] = {}
        self.errors: dict[int, BaseException] = {}
        self.error: BaseException | None = None  # the whole batch failed
        self.landed = False  # committed (or failed): its writers may go on
        self.waiters: list[Any] = []  # the writers' asyncio futures, set when it lands


class ThreadedStore:
    """Async face of a sync store: every method runs in a worker thread (any backend, trio included)."""

    is_async = True

    def __init__(self, store: Any) -> None:
        self.store = store

    async def __aenter__(self) -> ThreadedStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)
        if not callable(method):
            return method

        async def call(*args: Any, **kwargs: Any) -> Any:
            import anyio.to_thread

            return await anyio.to_thread.run_sync(lambda: method(*args, **kwargs))

        return call


# One AsyncSQLiteStore per (event loop, sync store); gone with its loop.
_per_loop: weakref.WeakKeyDictionary[Any, dict[int, AsyncSQLiteStore]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def async_twin(store: Any) -> Any:
    """The async face of ``store`` for the running event loop (``store`` itself when already async).

    A ``SQLiteStore`` under asyncio gets the loop's :class:`AsyncSQLiteStore` on the same file
    and durability, a store with an ``asyncio_twin()`` method (``PostgresStore``) what it
    returns; any other store, or any store under trio, a :class:`ThreadedStore`.
    """
    if getattr(store, "is_async", False):
        return store
    twin_for_asyncio = getattr(store, "asyncio_twin", None)  # a store with an asyncio face of its own
    if twin_for_asyncio is not None and _on_asyncio():
        return twin_for_asyncio()
    if isinstance(store, SQLiteStore) and _on_asyncio():
        loop = _current_loop()
        with _lock:
            twins = _per_loop.setdefault(loop, {})
            twin = twins.get(id(store))
            if twin is None or twin.sync is not store:
                twin = twins[id(store)] = AsyncSQLiteStore(sync=store)
            return twin
    return ThreadedStore(store)


def _on_asyncio() -> bool:
    """True on an asyncio event loop (aiosqlite needs one); False under trio or outside a loop."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
