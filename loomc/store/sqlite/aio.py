"""The async twin of a checkpoint store: ``AsyncCheckpointStore``, ``AsyncSQLiteStore`` on aiosqlite.

The async driver never blocks its event loop on SQLite. ``async_twin(store)`` gives it
the async face of the run's store:

- a :class:`~loomc.SQLiteStore` under asyncio gets an :class:`AsyncSQLiteStore` on the
  same file with the same durability: one aiosqlite connection (its own thread) per
  event loop, opened while runs use it and closed when the last one leaves;
- anything else (trio, where aiosqlite cannot run, a ``MemoryStore``, a custom store)
  gets a :class:`ThreadedStore`, which runs each call in a worker thread.

The SQL and the row conversions live in ``_sql`` and are shared with the sync store;
the connection is opened and the schema prepared by the sync store's own code, run in
aiosqlite's thread.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from loomc._core.errors import RunNotFound, StoreError
from loomc._core.holds import HeldCharge
from loomc._core.types import RunInfo, RunStatus, StepRecord
from loomc.store.codec import decode, delta_base, encode, expand
from loomc.store.sqlite import sql as _sql
from loomc.store.sqlite.sync import (
    Durability,
    NewRun,
    ResumePoint,
    SQLiteStore,
    StateLoader,
    _history_record,
    _nearest,
    _sweep,
    expand_rows,
    new_run_id,
)

if TYPE_CHECKING:
    import os
    import sqlite3

    import aiosqlite
    import anyio

__all__ = ["AsyncCheckpointStore", "AsyncSQLiteStore", "ThreadedStore", "async_twin"]


@runtime_checkable
class AsyncCheckpointStore(Protocol):
    """What the async driver needs from a checkpoint backend: ``CheckpointStore``, awaited.

    An implementation is also an async context manager: the driver enters it for the
    length of a run (open connections there, release them on exit).
    """

    is_async: bool

    async def __aenter__(self) -> Any: ...
    async def __aexit__(self, *exc: object) -> None: ...

    async def create_run(self, spec_hash: str, **kwargs: Any) -> str: ...
    async def get_run(self, run_id: str) -> RunInfo | None: ...
    async def list_runs(self, *, status: str | None = None, limit: int | None = None, roots_only: bool = False) -> list[RunInfo]: ...
    async def update_run_status(self, run_id: str, status: RunStatus | str) -> None: ...
    async def save_step(self, run_id: str, record: StepRecord) -> None: ...
    async def load_steps(self, run_id: str) -> list[StepRecord]: ...

    async def resolve(self, run_id: str) -> str: ...
    async def begin_run(self, new: NewRun) -> str: ...
    async def acquire(self, run_id: str, owner: str, budget: dict[str, Any] | None = None) -> None: ...
    async def commit_step(self, run_id: str, row: _sql.StepRow) -> None: ...
    async def finish_run(self, run_id: str, status: RunStatus, stop_reason: str | None, wall_s: float) -> None: ...
    async def resume_point(self, run_id: str) -> ResumePoint: ...
    async def load_state(self, run_id: str, step_n: int) -> Any: ...
    async def find_child(self, parent_run_id: str, parent_step: int, call_index: int) -> RunInfo | None: ...
    async def children(self, run_id: str) -> list[RunInfo]: ...
    async def set_meta(self, run_id: str, meta: dict[str, Any]) -> None: ...
    async def add_cost(self, run_id: str, usd: float) -> None: ...


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
    """The SQLite store for async loops, on aiosqlite: the event loop never waits on SQLite.

    Same file format, methods and semantics as :class:`~loomc.SQLiteStore`, awaited.
    One connection (running in aiosqlite's thread) serves every task of one event loop;
    transactions are serialised on it and shielded from cancellation, so a cancelled
    task never leaves one half done; steps committed by several tasks at once share one
    transaction (a group commit). Use it as an async context manager, or call
    :meth:`aclose` when done; it runs on asyncio only (under trio loomc offloads the
    sync store to worker threads instead).

    Args:
        path: the database file (default ``$LOOMC_DB`` or ``.loomc/checkpoints.db``).
        durability: ``"power"`` or ``"process"``, as for ``SQLiteStore``.
        create: when ``False``, a missing database is a :class:`~loomc.StoreError`.
        sync: the :class:`~loomc.SQLiteStore` to mirror (its path and durability), instead
            of ``path``/``durability``/``create``.
    """

    is_async = True
    supports_deltas = True

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        durability: Durability = "power",
        create: bool = True,
        sync: SQLiteStore | None = None,
    ) -> None:
        # The sync store opens and prepares connections (in aiosqlite's thread) and loads
        # lazily-read history states; its own connection opens only if that happens.
        self.sync = sync if sync is not None else SQLiteStore(path, durability=durability, create=create)
        self._conn: aiosqlite.Connection | None = None
        self._lock: anyio.Lock | None = None  # held while the connection opens
        self._batch: _Batch | None = None  # writes waiting for the next group commit
        self._writing = False  # a batch is in the database thread
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

        lock = self._lock if self._lock is not None and self._loop is loop else anyio.Lock()
        self._lock, self._loop = lock, loop
        async with lock:
            if self._conn is None:
                conn = aiosqlite.Connection(self._open_sync, 64)
                with anyio.CancelScope(shield=True):
                    self._conn = await conn
        assert self._conn is not None
        return self._conn

    def _open_sync(self) -> sqlite3.Connection:
        # Runs in aiosqlite's thread: the sync store's own open + schema check/migration.
        return self.sync._open()

    async def aclose(self) -> None:
        """Close the connection (it reopens on next use)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            import anyio

            with anyio.CancelScope(shield=True):
                await conn.close()
        if self._users == 0 and self._conn is None:  # nobody reopened it meanwhile
            # let go of the event loop, so the per-loop cache entry goes when the loop does
            self._loop = self._lock = None

    async def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        conn = await self._connect()  # one call, one trip: aiosqlite's thread runs them in order
        try:
            return list(await conn.execute_fetchall(sql, args))
        except Exception as exc:
            if _is_db_error(exc):
                raise StoreError(f"cannot read {self.path}: {exc}") from exc
            raise

    def _wrap(self, exc: Exception) -> Exception:
        if not _is_db_error(exc):
            return exc
        return self.sync._wrap(exc)  # type: ignore[arg-type]

    # -- runs -----------------------------------------------------------------------
    async def create_run(self, spec_hash: str, **kwargs: Any) -> str:
        """Create a run (status ``running``, no owner) and return its id."""
        return await self.begin_run(NewRun(spec_hash=spec_hash, **kwargs))

    async def begin_run(self, new: NewRun) -> str:
        """Create a run from ``new``, owned by ``new.owner``; returns its id."""
        run_id = new.run_id or new_run_id()
        where = str(self.path)
        await self._write(lambda execute, beat: _sql.insert_run(execute, new, run_id, beat, where))
        return run_id

    async def get_run(self, run_id: str) -> RunInfo | None:
        """The run with exactly this id, or ``None``."""
        rows = await self._read(_sql.SELECT_RUN, (run_id,))
        return _sql.run_info(rows[0]) if rows else None

    async def resolve(self, run_id: str) -> str:
        """The full id of the run whose id is or starts with ``run_id`` (see ``SQLiteStore.resolve``)."""
        if run_id:
            ids = [r[0] for r in await self._read(_sql.SELECT_PREFIX, _sql.prefix_args(run_id))]
            found = _sql.match_prefix(run_id, ids)
            if found is not None:
                return found
        every = [r[0] for r in await self._read(_sql.SELECT_ALL_IDS)]
        raise RunNotFound(run_id, _nearest(run_id, every) if run_id else None, str(self.path))

    async def list_runs(self, *, status: str | None = None, limit: int | None = None, roots_only: bool = False) -> list[RunInfo]:
        """Runs newest first."""
        st = status.value if isinstance(status, RunStatus) else status
        sql, args = _sql.list_runs_sql(status=st, roots_only=roots_only, limit=limit)
        return _sql.filter_listed([_sql.run_info(r) for r in await self._read(sql, args)], st, limit)

    async def update_run_status(self, run_id: str, status: RunStatus | str) -> None:
        """Set a run's status."""
        args = (RunStatus(status).value, _sql.now_iso(), run_id)
        await self._write(lambda execute, beat: execute(_sql.UPDATE_STATUS, args))

    async def acquire(self, run_id: str, owner: str, budget: dict[str, Any] | None = None) -> None:
        """Take the run's lease for ``owner`` (raises :class:`~loomc.RunLocked` if a live process holds it)."""
        where = str(self.path)

        def take(execute: Any, beat: float) -> None:
            row = execute(_sql.SELECT_LEASE, (run_id,)).fetchone()
            _sql.check_lease(run_id, tuple(row) if row is not None else None, owner, where)
            execute(_sql.ACQUIRE, _sql.acquire_args(run_id, owner, budget, beat))

        await self._write(take)

    async def commit_step(self, run_id: str, row: _sql.StepRow) -> None:
        """Write one step and the run's totals in one transaction; returns once it is committed.

        Steps (and other writes) that tasks of this event loop make while a transaction is
        under way are committed together in the next one: a group commit, one trip to the
        database thread and one fsync for all of them.
        """
        await self._write(lambda execute, beat: row.write(execute, run_id, beat))

    async def _write(self, op: Callable[[Any, float], Any]) -> Any:
        """Run ``op(execute, heartbeat)`` in a write transaction, group-committed; its result.

        One transaction is in the database thread at a time; writes made meanwhile wait in
        the next batch, sent as soon as the current one lands. Each write of a batch runs
        under its own savepoint, so one that fails (a lease held by a live process, a
        duplicate id) fails alone; a failed commit fails them all. The caller waits until
        its batch is committed, even if it is cancelled meanwhile (then it re-raises the
        cancellation): a write is never left half done or unknown.
        """
        import asyncio

        conn = await self._connect()
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch(self._loop.create_future())
        i = len(batch.ops)
        batch.ops.append(op)
        if not self._writing:  # send it on the loop's next turn: writes made in this one join it
            self._writing = True
            self._loop.call_soon(self._send, conn)
        done = batch.done
        cancelled: asyncio.CancelledError | None = None
        while not done.done():
            try:
                await asyncio.shield(done)
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

    def _send(self, conn: aiosqlite.Connection) -> None:
        """Hand the waiting batch to the database thread (on the event loop, no await)."""
        import asyncio
        import functools

        batch, self._batch = self._batch, None
        assert batch is not None
        self._writing = True
        loop = self._loop
        fn = functools.partial(self._commit_batch, conn, batch)
        try:
            if getattr(conn, "_running", False) and getattr(conn, "_connection", None) is not None and hasattr(conn, "_tx"):
                fut = loop.create_future()  # aiosqlite's own hand-off, without a task per batch
                conn._tx.put_nowait((fut, fn))
            else:  # a closed connection (its _execute says so), or an aiosqlite without that queue
                fut = asyncio.ensure_future(conn._execute(fn))  # type: ignore[no-untyped-call]
        except Exception as exc:  # noqa: BLE001 - the batch fails, its writers are woken
            fut = loop.create_future()
            fut.set_exception(exc)
        fut.add_done_callback(functools.partial(self._landed, conn, batch))

    def _landed(self, conn: aiosqlite.Connection, batch: _Batch, fut: Any) -> None:
        """The database thread is done with ``batch``: wake its writers, send the next one."""
        if fut.cancelled():
            batch.error = StoreError(f"the write to {self.path} was abandoned (its event loop is closing)")
        elif fut.exception() is not None:
            batch.error = fut.exception()
        batch.done.set_result(None)
        self._writing = False
        if self._batch is not None:
            self._send(conn)

    def _commit_batch(self, conn: aiosqlite.Connection, batch: _Batch) -> None:
        # Runs in aiosqlite's thread: one BEGIN ... COMMIT for every write of the batch.
        import sqlite3

        db = conn._conn  # the sqlite3 connection aiosqlite drives
        cur = db.cursor()
        execute = cur.execute
        ops, results, errors = batch.ops, batch.results, batch.errors
        try:
            self.sync.check_file_soon(db)
            beat = time.time()
            execute("BEGIN IMMEDIATE")
            try:
                for i, op in enumerate(ops):
                    results[i] = op(execute, beat)
            except Exception:
                if len(ops) == 1:
                    raise
                # One write failed: undo the batch, then give each write its own savepoint
                # so that it fails alone (the common case above pays for no savepoints).
                results.clear()
                if db.in_transaction:
                    execute("ROLLBACK")
                execute("BEGIN IMMEDIATE")
                for i, op in enumerate(ops):
                    execute("SAVEPOINT w")
                    try:
                        results[i] = op(execute, beat)
                    except Exception as exc:  # noqa: BLE001 - this write fails alone
                        execute("ROLLBACK TO w")
                        errors[i] = self.sync._wrap(exc) if isinstance(exc, sqlite3.Error) else exc
                    execute("RELEASE w")
            execute("COMMIT")
        except BaseException as exc:  # noqa: BLE001 - handed to every write of the batch
            if db.in_transaction:
                db.execute("ROLLBACK")
            batch.error = self.sync._wrap(exc) if isinstance(exc, sqlite3.Error) else exc

    async def finish_run(self, run_id: str, status: RunStatus, stop_reason: str | None, wall_s: float) -> None:
        """Record how an attempt ended."""
        await self._write(lambda execute, beat: execute(_sql.FINISH, _sql.finish_args(run_id, status, stop_reason, wall_s, beat)))

    async def set_meta(self, run_id: str, meta: dict[str, Any]) -> None:
        """Replace the run's free-form metadata (JSON)."""
        import json

        args = (json.dumps(meta), run_id)
        await self._write(lambda execute, beat: execute(_sql.UPDATE_META, args))

    async def add_cost(self, run_id: str, usd: float) -> None:
        """Add to a run's total cost outside a step."""
        args = (usd, _sql.now_iso(), run_id)
        await self._write(lambda execute, beat: execute(_sql.ADD_COST, args))

    async def put_hold(self, run_id: str, hold_id: int, usd: float) -> None:
        """Commit a reservation of ``run_id`` before the call it pays for is sent (see ``SQLiteStore``)."""
        args = (hold_id, run_id, usd, _sql.now_iso())
        await self._write(lambda execute, beat: execute(_sql.INSERT_HOLD, args))

    async def drop_holds(self, hold_ids: tuple[int, ...]) -> None:
        """Delete holds whose spending is recorded by now (see ``SQLiteStore``)."""

        def drop(execute: Any, beat: float) -> None:
            for hold_id in hold_ids:
                execute(_sql.DELETE_HOLD, (hold_id,))

        await self._write(drop)

    async def charge_holds(self, run_id: str) -> HeldCharge | None:
        """Charge the holds left by ``run_id`` and the runs below it to ``run_id`` (see ``SQLiteStore``)."""
        return await self._write(lambda execute, beat: _sweep(execute, run_id))  # type: ignore[no-any-return]

    # -- steps ----------------------------------------------------------------------
    async def save_step(self, run_id: str, record: StepRecord) -> None:
        """Write a step record and fold it into the run's totals (loomc 0.3.0 API)."""
        info = await self.get_run(run_id)
        if info is None:
            raise RunNotFound(run_id, where=str(self.path))
        await self.commit_step(run_id, _sql.legacy_step_row(info, record, encode(record.state)))

    async def load_steps(self, run_id: str) -> list[StepRecord]:
        """Every step of the run, states included, in order."""
        type_rows = await self._read(_sql.SELECT_STATE_TYPE, (run_id,))
        ref = type_rows[0][0] if type_rows else "json"
        rows = await self._read(_sql.SELECT_STEPS_FULL, (run_id,))
        return [_sql.step_record(r, ref) for r in expand_rows(rows, run_id, str(self.path))]

    async def stored_state(self, run_id: str, step_n: int) -> str | bytes | None:
        """A step's state as stored, a delta made whole (``None``: no such step; see ``SQLiteStore``)."""
        rows = await self._read(_sql.SELECT_STATE, (run_id, step_n))
        if not rows:
            return None
        blob = rows[0][0]
        if blob is None:
            raise _sql.missing_state(run_id, step_n, str(self.path), row=True)
        base = delta_base(blob)
        if base is not None:
            key = await self._read(_sql.SELECT_STATE, (run_id, base))
            blob = expand(blob, key[0][0] if key else None)
        return blob  # type: ignore[no-any-return]

    async def load_state(self, run_id: str, step_n: int) -> Any:
        """The state a step committed (``step_n == -1``: the run's input)."""
        if step_n < 0:
            rows = await self._read(_sql.SELECT_RESUME, (run_id,))
            return decode(rows[0][1], rows[0][0]) if rows else None
        ref_rows = await self._read(_sql.SELECT_STATE_TYPE, (run_id,))
        blob = await self.stored_state(run_id, step_n)
        if blob is None:
            raise _sql.missing_state(run_id, step_n, str(self.path), row=False)
        return decode(blob, ref_rows[0][0] if ref_rows else "json")

    async def resume_point(self, run_id: str) -> ResumePoint:
        """The run's info, its last step and the state to start from (earlier steps: ``step_history``)."""
        info = await self.get_run(run_id)
        if info is None:
            raise RunNotFound(run_id, where=str(self.path))
        state_type, input_blob, stored_next = (await self._read(_sql.SELECT_RESUME, (run_id,)))[0]
        loader = StateLoader(self.sync, run_id)
        history = [_history_record(r, loader) for r in await self._read(_sql.SELECT_LAST_STEP_META, (run_id,))]
        _sql.check_last_step(run_id, info.steps, history[-1].step_n if history else None, str(self.path))
        next_from = _sql.start_point(stored_next, history[-1].step_n if history else None)
        blob = input_blob
        if next_from >= 0:
            stored = await self.stored_state(run_id, next_from)
            if stored is None:  # never fall back to the input: the run's spending says otherwise
                raise _sql.missing_state(run_id, next_from, str(self.path), row=False)
            blob = stored
        in_flight = (await self._read(_sql.IN_FLIGHT, (run_id, history[-1].step_n + 1 if history else 0)))[0][0]
        return ResumePoint(
            info, state_type, blob, next_from, history, partial=bool(history) and history[0].step_n > 0,
            in_flight_usd=float(in_flight),
        )

    async def step_history(self, run_id: str, before: int) -> list[StepRecord]:
        """The run's steps numbered below ``before``, in order (states loaded lazily)."""
        loader = StateLoader(self.sync, run_id)
        return [_history_record(r, loader) for r in await self._read(_sql.SELECT_STEP_META_BEFORE, (run_id, before))]

    async def find_child(self, parent_run_id: str, parent_step: int, call_index: int) -> RunInfo | None:
        """The child run a parent step started as its ``call_index``-th nested loop."""
        rows = await self._read(_sql.SELECT_CHILD, (parent_run_id, parent_step, call_index))
        return _sql.run_info(rows[0]) if rows else None

    async def children(self, run_id: str) -> list[RunInfo]:
        """Direct child runs, in the order their parent started them."""
        return [_sql.run_info(r) for r in await self._read(_sql.SELECT_CHILDREN, (run_id,))]


def _is_db_error(exc: BaseException) -> bool:
    import sqlite3

    return isinstance(exc, sqlite3.Error)


class _Batch:
    """Writes committed together by :meth:`AsyncSQLiteStore._write`."""

    __slots__ = ("done", "error", "errors", "ops", "results")

    def __init__(self, done: Any) -> None:
        self.ops: list[Callable[[Any, float], Any]] = []
        self.results: dict[int, Any] = {}
        self.errors: dict[int, BaseException] = {}
        self.error: BaseException | None = None  # the whole batch failed
        self.done = done  # an asyncio future, set when the batch has landed


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

        async def call(*args: Any) -> Any:
            import anyio.to_thread

            return await anyio.to_thread.run_sync(lambda: method(*args))

        return call


# One AsyncSQLiteStore per (event loop, sync store); gone with its loop.
_per_loop: weakref.WeakKeyDictionary[Any, dict[int, AsyncSQLiteStore]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def async_twin(store: Any) -> Any:
    """The async face of ``store`` for the running event loop (``store`` itself when already async).

    A ``SQLiteStore`` under asyncio gets the loop's :class:`AsyncSQLiteStore` on the same file
    and durability; any other store, or any store under trio, a :class:`ThreadedStore`.
    """
    if getattr(store, "is_async", False):
        return store
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
