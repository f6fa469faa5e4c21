"""The async PostgreSQL store: ``AsyncPostgresStore`` on psycopg's async pool (asyncio).

Same operations (``loomc.store.core``), statements and semantics as
:class:`~loomc.store.postgres.sync.PostgresStore`, awaited on an
``psycopg_pool.AsyncConnectionPool``: the event loop never waits on the server. A write
runs shielded from cancellation, in one pipelined transaction, so a cancelled task never
leaves one half done. The pool belongs to one event loop; ``asyncio_twin`` gives each
loop its own. Under trio, loomc runs the sync store in worker threads instead (as it
does for SQLite).
"""

from __future__ import annotations

import functools
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loomc._core.errors import StoreError
from loomc._core.holds import HeldCharge
from loomc._core.types import RunInfo, RunStatus, StepRecord
from loomc.store import core
from loomc.store import protocol as p
from loomc.store.core import COUNT, EXEC, EXEC_MANY, INSERT, QUERY, Op, StateLoader
from loomc.store.postgres import sql as _sql
from loomc.store.postgres.sync import (
    PostgresStore,
    WriteOp,
    _has_nul_text,
    _races,
    _scrub,
    connection_error,
    fenced_out,
    register_state_loaders,
    session_settings,
    text_input,
    without_nul,
)
from loomc.store.protocol import NewRun, new_run_id

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

__all__ = ["AsyncPostgresStore", "asyncio_twin"]


async def adrive(op: Op, cur: Any, clean: bool = False) -> Any:
    """Run ``op`` on a psycopg async cursor; its result (``clean``: as for ``sync.drive``)."""
    send: Any = None
    try:
        while True:
            kind, sql, args = op.send(send)
            if clean:
                args = without_nul(args)
            if kind == EXEC:
                await cur.execute(sql, args)
                send = None
            elif kind == QUERY:
                await cur.execute(sql, args)
                send = await cur.fetchall()
            elif kind == INSERT:
                await cur.execute(sql, args)
                send = (await cur.fetchone())[0]
            elif kind == COUNT:
                await cur.execute(sql, args)
                send = cur.rowcount
            elif kind == EXEC_MANY:
                if args:
                    await cur.executemany(sql, args)
                send = None
    except StopIteration as done:
        return done.value


async def atransact(conn: Any, op: Op, clean: bool = False, ahead: bool = True) -> Any:
    """Drive the write ``op`` as one pipelined transaction on ``conn`` (see ``sync.transact``)."""
    import psycopg

    async with conn.pipeline() as pipeline:
        cur = conn.cursor()
        began = False
        send: Any = None
        try:
            while True:
                kind, sql, args = op.send(send)
                if clean:
                    args = without_nul(args)
                if kind == EXEC:
                    await cur.execute(sql, args)
                    send = None
                elif kind == EXEC_MANY:
                    if args:
                        await cur.executemany(sql, args)
                    send = None
                elif kind == COUNT and ahead and not began and sql in _sql.FENCED:
                    await cur.execute(_sql.FENCED[sql], args)
                    send = 1
                else:
                    if not began:
                        await cur.execute(_sql.BEGIN, prepare=False)
                        began = True
                    await cur.execute(sql, args)
                    if kind == COUNT:
                        await pipeline.sync()
                        send = cur.rowcount
                    else:
                        send = await cur.fetchall() if kind == QUERY else (await cur.fetchone())[0]
        except StopIteration as done:
            if began:
                await cur.execute(_sql.COMMIT, prepare=False)
            return done.value
        except BaseException:
            try:
                if not began:
                    await cur.execute(_sql.BEGIN, prepare=False)
                await cur.execute(_sql.ROLLBACK, prepare=False)
                await pipeline.sync()  # see ``sync.transact``
                await cur.execute(_sql.AFTER_ROLLBACK, prepare=False)
            except psycopg.Error:
                pass
            raise


def _current_loop() -> Any:
    import asyncio

    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise StoreError(
            "AsyncPostgresStore runs on asyncio only; under trio or outside an event loop use PostgresStore "
            "— async loops drive it from worker threads by themselves"
        ) from None


class AsyncPostgresStore:
    """The PostgreSQL store for async loops on asyncio (psycopg's async pool).

    Use it as an async context manager, or call :meth:`aclose` when done.

    Args:
        dsn: as for :class:`~loomc.PostgresStore`, with the same keyword options.
        sync: the :class:`~loomc.PostgresStore` to mirror (its DSN and options), instead.
    """

    is_async = True
    supports_deltas = True

    def __init__(self, dsn: str | None = None, *, sync: PostgresStore | None = None, **options: Any) -> None:
        if sync is None:
            if dsn is None:
                raise ValueError("AsyncPostgresStore needs a dsn (or sync=PostgresStore(...))")
            sync = PostgresStore(dsn, **options)
        self._owns_sync = dsn is not None
        self.sync = sync
        self._pool: psycopg_pool.AsyncConnectionPool[Any] | None = None
        self._loop: Any = None
        self._users = 0

    @property
    def path(self) -> str:
        """Where the store is (the DSN without its password)."""
        return self.sync.path

    @property
    def db_path(self) -> str:
        """Where the store is, as a string."""
        return self.sync.path

    @property
    def durability(self) -> p.Durability:
        """``"power"`` or ``"process"``."""
        return self.sync.durability

    def __repr__(self) -> str:
        return f"AsyncPostgresStore({self.path!r}, durability={self.durability!r})"

    async def __aenter__(self) -> AsyncPostgresStore:
        self._users += 1
        try:
            await self._connect()
        except BaseException:
            self._users -= 1
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._users -= 1
        if self._users <= 0:
            self._users = 0
            await self.aclose()

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        for stmt in session_settings(self.sync.durability, self.sync.idle_in_transaction_s):
            await conn.execute(stmt)  # type: ignore[call-overload]
        register_state_loaders(conn.adapters)

    async def _connect(self) -> psycopg_pool.AsyncConnectionPool[Any]:
        loop = _current_loop()
        if self._pool is not None:
            if self._loop is not loop:
                raise StoreError(
                    f"{self!r} is open in another event loop; use one AsyncPostgresStore per event loop "
                    "(loomc's async loops do this by themselves)"
                )
            return self._pool
        import anyio
        import anyio.to_thread
        from psycopg_pool import AsyncConnectionPool

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.sync.open)  # the schema: checked and migrated once
            if self._pool is None:
                s = self.sync
                pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
                    s.dsn, min_size=s.min_size, max_size=s.max_size, kwargs=s.connect_kwargs(),
                    configure=self._configure, open=False, name="loomc-async", timeout=max(s.connect_timeout, 30.0),
                    num_workers=1,
                )
                await pool.open(wait=False)
                self._pool, self._loop = pool, loop
        assert self._pool is not None
        return self._pool

    async def aclose(self) -> None:
        """Close the pool (it reopens on next use)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            import anyio

            with anyio.CancelScope(shield=True):
                await pool.close()
        if self._owns_sync:
            self.sync.close()
        self._loop = None

    async def _run(self, op_for: Callable[[], Op], write: bool, retry: bool) -> Any:
        """Drive ``op_for()`` on a pooled connection, run again as ``PostgresStore._run`` says; a write is shielded."""
        import anyio
        import psycopg
        from psycopg_pool import PoolTimeout

        pool = await self._connect()
        clean, reconnected, races, ahead = False, False, 0, True
        while True:
            conn: Any = None
            dropped = False
            try:
                with anyio.CancelScope(shield=write):  # a write is never left half done
                    async with pool.connection() as conn:
                        try:
                            if not write:
                                return await adrive(op_for(), conn.cursor(), clean)
                            return await atransact(conn, op_for(), clean, ahead)
                        except psycopg.Error:
                            dropped = conn.broken or conn.closed
                            await conn.close()
                            raise
            except PoolTimeout as exc:
                raise connection_error(exc, self.sync.dsn, "connect to") from None
            except psycopg.Error as exc:
                if isinstance(exc, psycopg.OperationalError) and (dropped or conn is None):
                    if retry and not reconnected:
                        reconnected = True
                        await pool.check()
                        continue
                    raise connection_error(exc, self.sync.dsn, "write to" if write else "read from") from None
                if write and ahead and fenced_out(exc):
                    ahead = False
                    continue
                if write and isinstance(exc, _races()) and races < 3:
                    races += 1
                    continue
                if not clean and _has_nul_text(exc):
                    clean = True
                    continue
                raise StoreError(
                    f"PostgreSQL at {self.path} refused a {'write' if write else 'read'}: {_scrub(str(exc), self.sync.dsn)}"
                ) from None

    async def _read(self, op_for: Callable[[], Op]) -> Any:
        return await self._run(op_for, False, True)

    async def _write(self, op: WriteOp, *, retry: bool = False) -> Any:
        return await self._run(lambda: op(time.time()), True, retry)

    # -- runs -----------------------------------------------------------------------
    async def create_run(self, spec_hash: str, **kwargs: Any) -> str:
        """Create a run (status ``running``, no owner) and return its id."""
        return await self.begin_run(NewRun(spec_hash=spec_hash, **kwargs))

    async def begin_run(self, new: NewRun) -> str:
        """Create a run from ``new``, owned by ``new.owner`` (epoch 1); returns its id."""
        run_id, where, new, ttl = new.run_id or new_run_id(), self.path, text_input(new), self.sync.ttl_s
        run_id = await self._write(lambda beat: core.begin_run(_sql, where, new, run_id, ttl))
        if new.owner:
            self.sync.hold_epoch(run_id, 1)
        return run_id  # type: ignore[no-any-return]

    async def get_run(self, run_id: str) -> RunInfo | None:
        """The run with exactly this id, or ``None``."""
        return await self._read(lambda: core.get_run(_sql, run_id))  # type: ignore[no-any-return]

    async def resolve(self, run_id: str) -> str:
        """The full id of the run whose id is or starts with ``run_id``."""
        return await self._read(lambda: core.resolve(_sql, self.path, run_id))  # type: ignore[no-any-return]

    async def list_runs(self, *, status: str | None = None, limit: int | None = None, roots_only: bool = False) -> list[RunInfo]:
        """Runs newest first."""
        return await self._read(lambda: core.list_runs(_sql, status, limit, roots_only))  # type: ignore[no-any-return]

    async def search_runs(
        self, *, status: str | None = None, roots_only: bool = False, id_prefix: str | None = None,
        name: str | None = None, before: tuple[str, str] | None = None, limit: int = 50,
    ) -> list[RunInfo]:
        """A page of runs, newest first, narrowed in the database (see ``PostgresStore.search_runs``)."""
        return await self._read(  # type: ignore[no-any-return]
            lambda: core.list_runs(_sql, status, limit, roots_only, before=before, id_prefix=id_prefix, name=name)
        )

    async def update_run_status(self, run_id: str, status: RunStatus | str) -> None:
        """Set a run's status."""
        await self._write(lambda beat: core.update_run_status(_sql, run_id, status), retry=True)

    async def acquire(self, run_id: str, owner: str, budget: dict[str, Any] | None = None) -> None:
        """Take the run's lease for ``owner`` (raises :class:`~loomc.RunLocked` if a live process holds it)."""
        where, ttl = self.path, self.sync.ttl_s
        epoch = await self._write(lambda beat: core.acquire(_sql, where, run_id, owner, budget, ttl))
        self.sync.hold_epoch(run_id, epoch)

    async def renew_leases(self, owner: str, run_ids: list[str]) -> list[str]:
        """Renew the leases of the runs in ``run_ids`` that ``owner`` still holds; the ids it lost."""
        ttl, lost = self.sync.ttl_s, []  # one transaction per lease (see ``PostgresStore.renew_leases``)
        for run_id in run_ids:
            lease = [(run_id, self.sync.epoch_of(run_id))]
            lost += await self._write(functools.partial(_renew, owner, lease, ttl), retry=True)
        return lost

    async def commit_step(self, run_id: str, row: p.StepRow) -> None:
        """Write one step and the run's totals in one transaction (retried as ``PostgresStore.commit_step``)."""
        ttl, epoch = self.sync.ttl_s, self.sync.epoch_of(run_id)
        await self._write(lambda beat: core.commit_step(_sql, run_id, row, ttl, epoch), retry=True)

    async def finish_run(self, run_id: str, status: RunStatus, stop_reason: str | None, wall_s: float) -> None:
        """Record how an attempt ended."""
        epoch = self.sync.epoch_of(run_id)
        await self._write(lambda beat: core.finish_run(_sql, run_id, status, stop_reason, wall_s, epoch), retry=True)

    async def set_meta(self, run_id: str, meta: dict[str, Any]) -> None:
        """Replace the run's free-form metadata (JSON)."""
        epoch = self.sync.epoch_of(run_id)
        await self._write(lambda beat: core.set_meta(_sql, run_id, meta, epoch), retry=True)

    async def add_cost(self, run_id: str, usd: float) -> None:
        """Add to a run's total cost outside a step."""
        epoch = self.sync.epoch_of(run_id)
        await self._write(lambda beat: core.add_cost(_sql, run_id, usd, epoch))

    async def find_child(self, parent_run_id: str, parent_step: int, call_index: int) -> RunInfo | None:
        """The child run a parent step started as its ``call_index``-th nested loop."""
        return await self._read(lambda: core.find_child(_sql, parent_run_id, parent_step, call_index))  # type: ignore[no-any-return]

    async def children(self, run_id: str) -> list[RunInfo]:
        """Direct child runs, in the order their parent started them."""
        return await self._read(lambda: core.children(_sql, run_id))  # type: ignore[no-any-return]

    async def schema_info(self) -> p.SchemaInfo:
        """The database's schema version and the versions this loomc reads and writes."""
        return await self._read(lambda: core.schema_info(_sql))  # type: ignore[no-any-return]

    # -- holds ------------------------------------------------------------------------
    async def put_hold(self, run_id: str, hold_id: int, usd: float) -> None:
        """Commit a reservation of ``run_id`` before the call it pays for is sent."""
        epoch = self.sync.epoch_of(run_id)
        await self._write(lambda beat: core.put_hold(_sql, run_id, hold_id, usd, epoch))

    async def drop_holds(self, hold_ids: tuple[int, ...]) -> None:
        """Delete holds whose spending is recorded by now."""
        await self._write(lambda beat: core.drop_holds(_sql, hold_ids), retry=True)

    async def charge_holds(self, run_id: str) -> HeldCharge | None:
        """Charge the holds left by ``run_id`` and the runs below it to ``run_id``, in full."""
        return await self._write(lambda beat: core.charge_holds(_sql, run_id))  # type: ignore[no-any-return]

    # -- steps ----------------------------------------------------------------------
    async def save_step(self, run_id: str, record: StepRecord) -> None:
        """Write a step record and fold it into the run's totals (loomc 0.3.0 API)."""
        ttl, epoch = self.sync.ttl_s, self.sync.epoch_of(run_id)
        await self._write(lambda beat: core.save_step(_sql, self.path, run_id, record, ttl, epoch))

    async def load_steps(self, run_id: str) -> list[StepRecord]:
        """Every step of the run, states included, in order."""
        return await self._read(lambda: core.load_steps(_sql, self.path, run_id))  # type: ignore[no-any-return]

    async def stored_steps(self, run_id: str) -> list[p.StoredStep]:
        """Every step of the run with its state as stored (deltas made whole), in order."""
        return await self._read(lambda: core.stored_steps(_sql, self.path, run_id))  # type: ignore[no-any-return]

    async def stored_input(self, run_id: str) -> p.StoredInput | None:
        """The run's input as stored, its state type and next start (``None``: no such run)."""
        return await self._read(lambda: core.stored_input(_sql, run_id))  # type: ignore[no-any-return]

    async def stored_state(self, run_id: str, step_n: int) -> str | bytes | None:
        """A step's state as stored, a delta made whole (``None``: no such step)."""
        return await self._read(lambda: core.stored_state(_sql, self.path, run_id, step_n))  # type: ignore[no-any-return]

    async def load_state(self, run_id: str, step_n: int) -> Any:
        """The state a step committed (``step_n == -1``: the run's input)."""
        return await self._read(lambda: core.load_state(_sql, self.path, run_id, step_n))

    async def resume_point(self, run_id: str) -> p.ResumePoint:
        """The run's info, its last step and the state to start from (earlier states load lazily)."""
        loader = StateLoader(self.sync, run_id)
        return await self._read(lambda: core.resume_point(_sql, self.path, run_id, loader))  # type: ignore[no-any-return]

    async def step_history(self, run_id: str, before: int) -> list[StepRecord]:
        """The run's steps numbered below ``before``, in order (states loaded lazily)."""
        loader = StateLoader(self.sync, run_id)
        return await self._read(lambda: core.step_history(_sql, run_id, before, loader))  # type: ignore[no-any-return]

    async def step_window(
        self, run_id: str, after: int = -1, *, first: int | None = None, last: int | None = None,
        error_chars: int | None = None,
    ) -> list[StepRecord]:
        """Step metadata (no state) in step order, reading only the rows asked for."""
        return await self._read(lambda: core.step_window(_sql, run_id, after, first, last, error_chars))  # type: ignore[no-any-return]

    async def step_totals(self, run_id: str, before: int) -> tuple[int, float]:
        """``(steps, cost)`` of a run's steps numbered below ``before``."""
        return await self._read(lambda: core.step_totals(_sql, run_id, before))  # type: ignore[no-any-return]

    # -- a run's whole life -------------------------------------------------------------
    async def questions(self, run_id: str, tree: bool = False) -> list[p.Question]:
        """The questions the run's steps asked (``tree``: and those of the runs below it)."""
        return await self._read(lambda: core.questions(_sql, run_id, tree))  # type: ignore[no-any-return]

    async def wait_for_input(self, run_id: str, row: p.WaitRow) -> None:
        """Stop the run to wait for an answer (see ``PostgresStore.wait_for_input``)."""
        epoch = self.sync.epoch_of(run_id)
        await self._write(lambda beat: core.wait_for_input(_sql, run_id, row, epoch), retry=True)

    async def answer(self, question: p.Question, answer: str) -> None:
        """Store the answer (JSON text) to ``question``; an answer already given is never replaced."""
        await self._write(lambda beat: core.answer(_sql, self.path, question, answer))

    async def fork(
        self, run_id: str, at_step: int, *, new_run_id: str, state_blob: str | bytes | None = None,
        budget: dict[str, Any] | None = None,
    ) -> str:
        """Make run ``new_run_id`` from the history of ``run_id`` up to ``at_step`` (see ``core.fork``)."""
        where = self.path
        return await self._write(lambda beat: core.fork(_sql, where, run_id, at_step, new_run_id, state_blob, budget))  # type: ignore[no-any-return]

    async def prune(self, **options: Any) -> p.PruneReport:
        """``PostgresStore.prune`` in a worker thread (it runs several transactions)."""
        import anyio.to_thread

        return await anyio.to_thread.run_sync(lambda: self.sync.prune(**options))  # type: ignore[no-any-return]


# One AsyncPostgresStore per (event loop, sync store); gone with its loop.
_per_loop: weakref.WeakKeyDictionary[Any, dict[int, AsyncPostgresStore]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def asyncio_twin(store: PostgresStore) -> AsyncPostgresStore:
    """The running asyncio event loop's :class:`AsyncPostgresStore` for ``store``."""
    loop = _current_loop()
    with _lock:
        twins = _per_loop.setdefault(loop, {})
        twin = twins.get(id(store))
        if twin is None or twin.sync is not store:
            twin = twins[id(store)] = AsyncPostgresStore(sync=store)
        return twin


def _renew(owner: str, lease: list[tuple[str, int | None]], ttl: float, beat: float) -> core.Op:
    """The store core's lease renewal for one lease (a write's op, given the writer's clock it ignores)."""
    return core.renew_leases(_sql, owner, lease, ttl)
