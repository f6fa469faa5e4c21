"""The PostgreSQL store (sync driver): a connection pool, prepared statements, one transaction per step.

The operations are ``loomc.store.core``'s, written once for every store; this module
fulfils their requests on psycopg 3 connections taken from a ``psycopg_pool`` pool and
owns the schema: the first connection checks it, and migrates it forward under an
advisory lock (several processes may open one database at once). Writes are sent in
pipeline mode (:func:`transact`): a step's statements travel to the server together and
commit as one transaction, in one round trip.

psycopg is imported when a store is made, never by ``import loomc``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import threading
import time
import weakref
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from loomc._core.errors import LoomcError, SchemaTooNew, StoreError
from loomc._core.holds import HeldCharge
from loomc._core.policy import EPS
from loomc._core.types import RunInfo, RunStatus, StepRecord
from loomc.store import core
from loomc.store import lease as _lease
from loomc.store import shared as _shared
from loomc.store.core import COUNT, EXEC, EXEC_MANY, INSERT, QUERY, Op, StateLoader
from loomc.store.postgres import is_dsn
from loomc.store.postgres import sql as _sql
from loomc.store.protocol import (
    Durability,
    NewRun,
    PruneReport,
    Question,
    ResumePoint,
    SchemaInfo,
    StepRow,
    StoredInput,
    StoredStep,
    WaitRow,
    new_run_id,
)

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

__all__ = ["PostgresStore", "WriteOp", "display_dsn", "is_dsn", "require_psycopg"]

INSTALL = "pip install 'loomc[postgres]'"

#: A write: given the heartbeat time, the operation to drive.
WriteOp = Callable[[float], Op]


def require_psycopg() -> None:
    """Import psycopg and psycopg_pool, or say how to install them.

    Raises:
        LoomcError: the ``postgres`` extra is not installed.
    """
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        raise LoomcError(
            f"the PostgreSQL store needs psycopg 3 and psycopg_pool ({exc.name} is missing); install them with {INSTALL}"
        ) from None


def display_dsn(dsn: str) -> str:
    """``dsn`` without its password, as messages and ``store.path`` show it."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        parts = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - an unparsable DSN is shown by scheme only
        return dsn.split("://", 1)[0] + "://(unparsable DSN)"
    user = parts.get("user")
    host = str(parts.get("host") or "")
    port = parts.get("port")
    where = (f"{user}@" if user else "") + (host if "/" not in host else "") + (f":{port}" if port else "")
    text = f"postgresql://{where}/{parts.get('dbname') or ''}"
    extra = [f"host={host}"] if "/" in host else []
    extra += [f"{k}={v}" for k, v in parts.items() if k == "options"]
    return text + (f" ({', '.join(extra)})" if extra else "")


def _scrub(message: str, dsn: str) -> str:
    """A driver message with the DSN's password (if any) blanked out."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        password = conninfo_to_dict(dsn).get("password")
    except Exception:  # noqa: BLE001 - nothing to scrub in what cannot be parsed
        password = None
    message = " ".join(str(message).split())
    if password:
        message = message.replace(str(password), "***")
    # a DSN the driver could not parse may be quoted whole: blank what looks like a password in it
    return _URI_PASSWORD.sub(r"\1***@", _KV_PASSWORD.sub("password=***", message))


_URI_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_KV_PASSWORD = re.compile(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")


def load_state_bytes(data: bytes) -> str | bytes:
    """A ``bytea`` state as SQLite gives it back: compressed forms as bytes, JSON as text."""
    return data if data[:1] in _TAGGED else data.decode()


_TAGGED = (b"Z", b"z", b"D", b"J")


def make_state_loader(binary: bool) -> type[Any]:
    """A psycopg loader for ``bytea`` that gives states back as :func:`load_state_bytes` does."""
    from psycopg.types.string import ByteaBinaryLoader, ByteaLoader

    base: Any = ByteaBinaryLoader if binary else ByteaLoader

    class BytesOrText(base):  # type: ignore[misc, valid-type]
        def load(self, data: Any) -> str | bytes:
            return load_state_bytes(bytes(super().load(bytes(data))))

    return BytesOrText


def register_state_loaders(adapters: Any) -> None:
    """Make ``bytea`` columns read as states on connections configured with ``adapters``."""
    adapters.register_loader("bytea", make_state_loader(False))
    adapters.register_loader("bytea", make_state_loader(True))


def session_settings(durability: Durability, idle_in_transaction_s: float) -> tuple[str, ...]:
    """The ``SET`` statements every connection of a store runs once."""
    return (
        _sql.SET_SYNCHRONOUS.format(_sql.SYNCHRONOUS[durability]),
        _sql.SET_IDLE_TIMEOUT.format(int(idle_in_transaction_s * 1000)),
        _sql.SET_LOCK_TIMEOUT.format(int(_sql.LOCK_TIMEOUT_S * 1000)),
    )


def connection_error(exc: BaseException, dsn: str, doing: str) -> StoreError:
    """One clear line for a failure to reach or use the server (never the password)."""
    return StoreError(
        f"cannot {doing} PostgreSQL at {display_dsn(dsn)}: {_scrub(str(exc), dsn)}; check the DSN "
        "(--db / LOOMC_DB / checkpoint=) and that the server is running and reachable"
    )


def without_nul(args: Any) -> Any:
    """Statement parameters with every NUL character of their text written as ``\\x00``.

    PostgreSQL's text cannot hold NUL (SQLite's can): a step error or a name carrying one
    is stored with it made visible, as ``storable`` does for a lone surrogate.
    """
    if isinstance(args, list):  # EXEC_MANY: a list of parameter tuples
        return [without_nul(a) for a in args]
    return tuple(a.replace("\x00", "\\x00") if isinstance(a, str) else a for a in args)


def _races() -> tuple[type[BaseException], ...]:
    """The errors of a transaction that lost to a concurrent one (rolled back whole: safe to run again)."""
    from psycopg import errors

    return (errors.UniqueViolation, errors.DeadlockDetected, errors.SerializationFailure)


def _has_nul_text(exc: BaseException) -> bool:
    """Whether psycopg refused a parameter for holding a NUL character."""
    import psycopg

    return isinstance(exc, psycopg.DataError) and "NUL" in str(exc)


def fenced_out(exc: BaseException) -> bool:
    """Whether ``exc`` is a fenced write sent ahead of its check that changed no row (``sql.FENCED``)."""
    return getattr(exc, "sqlstate", None) == _sql.FENCE_SQLSTATE


def drive(op: Op, cur: Any, clean: bool = False) -> Any:
    """Run ``op`` on a psycopg cursor (its result); ``INSERT`` reads the id its ``RETURNING`` gives.

    ``clean``: pass every parameter through :func:`without_nul` first.
    """
    send: Any = None
    try:
        while True:
            kind, sql, args = op.send(send)
            if clean:
                args = without_nul(args)
            if kind == EXEC:
                cur.execute(sql, args)
                send = None
            elif kind == QUERY:
                cur.execute(sql, args)
                send = cur.fetchall()
            elif kind == INSERT:
                cur.execute(sql, args)
                send = cur.fetchone()[0]
            elif kind == COUNT:
                cur.execute(sql, args)
                send = cur.rowcount
            elif kind == EXEC_MANY:
                if args:
                    cur.executemany(sql, args)
                send = None
    except StopIteration as done:
        return done.value


def transact(conn: Any, op: Op, clean: bool = False, ahead: bool = True) -> Any:
    """Drive the write ``op`` as one transaction on ``conn`` (autocommit), in pipeline mode.

    The statements are queued and sent together; what the server runs between two
    pipeline syncs is one implicit transaction, so a write that reads nothing back (a
    step) is atomic in one round trip, without ``BEGIN`` and ``COMMIT``. Before the
    first read a write needs (a ``QUERY``, an ``INSERT ... RETURNING``), ``BEGIN`` is
    sent: it opens an explicit transaction that takes in the statements already sent
    (the server's rule for a ``BEGIN`` inside an implicit block), kept across the wait
    for the result and ended by ``COMMIT``. An error rolls everything back. ``clean``:
    as for :func:`drive`.

    A fenced write (``COUNT`` of a statement in ``sql.FENCED``) is sent, when nothing has
    been read yet and ``ahead`` is true, in the form that fails on the server if it
    changes no row, and taken as having changed one: a step still commits in one round
    trip. If it did fail (:func:`fenced_out`: nothing was kept), the caller runs the write
    again with ``ahead=False``, reading every count, so the store core sees the refusal.
    """
    import psycopg

    with conn.pipeline() as pipeline:
        cur = conn.cursor()
        began = False
        send: Any = None
        try:
            while True:
                kind, sql, args = op.send(send)
                if clean:
                    args = without_nul(args)
                if kind == EXEC:
                    cur.execute(sql, args)
                    send = None
                elif kind == EXEC_MANY:
                    if args:
                        cur.executemany(sql, args)
                    send = None
                elif kind == COUNT and ahead and not began and sql in _sql.FENCED:
                    cur.execute(_sql.FENCED[sql], args)
                    send = 1
                else:
                    if not began:
                        cur.execute(_sql.BEGIN, prepare=False)
                        began = True
                    cur.execute(sql, args)
                    if kind == COUNT:
                        pipeline.sync()  # the count is known once the server has answered
                        send = cur.rowcount
                    else:
                        send = cur.fetchall() if kind == QUERY else cur.fetchone()[0]
        except StopIteration as done:
            if began:
                cur.execute(_sql.COMMIT, prepare=False)
            return done.value
        except BaseException:
            try:
                if not began:
                    cur.execute(_sql.BEGIN, prepare=False)  # takes in what was sent, so that it is rolled back too
                cur.execute(_sql.ROLLBACK, prepare=False)
                # psycopg forgets its prepared statements after a ROLLBACK and drops them on
                # the server with the next statement it sends; in a pipeline that statement
                # would be prepared first, and dropped. Send an unprepared one now.
                pipeline.sync()
                cur.execute(_sql.AFTER_ROLLBACK, prepare=False)
            except psycopg.Error:
                pass  # the server already aborted it: nothing of it is kept
            raise


def text_input(new: NewRun) -> NewRun:
    """``new`` with a JSON-text input as UTF-8 bytes: every state column is ``bytea``."""
    if isinstance(new.input_blob, str):
        return dataclasses.replace(new, input_blob=new.input_blob.encode())
    return new


def check_schema(conn: Any, dsn: str, *, create: bool) -> int:
    """Check (and, when ``create``, migrate) the schema on ``conn``; the version it is at.

    Raises:
        SchemaTooNew: a newer loomc wrote it (nothing is changed).
        StoreError: it is not a loomc schema, or (readers) holds no runs yet.
    """
    where = display_dsn(dsn)
    has_version, has_runs = conn.execute(_sql.HAS_TABLES).fetchone()
    version = int(conn.execute(_sql.SELECT_VERSION).fetchone()[0]) if has_version else 0
    if version > _sql.SCHEMA_VERSION:
        raise SchemaTooNew(
            f"{where} was written by a newer loomc (schema v{version}; this loomc reads up to "
            f"v{_sql.SCHEMA_VERSION}); upgrade loomc to use it — the database was not changed"
        )
    if has_runs and not has_version:
        raise StoreError(
            f"{where} has a table named runs that loomc did not make; point --db / LOOMC_DB at another "
            "database, or at another schema (options=-csearch_path=NAME in the DSN)"
        )
    if not create and version < _sql.READS_FROM:
        raise StoreError(f"{where} holds no loomc runs yet; run a loop first")
    if version < _sql.SCHEMA_VERSION and create:
        with conn.transaction():
            conn.execute(_sql.LOCK_MIGRATIONS)
            conn.execute(_sql.CREATE_VERSION)
            conn.execute(_sql.INIT_VERSION)
            version = int(conn.execute(_sql.SELECT_VERSION).fetchone()[0])
            while version < _sql.SCHEMA_VERSION:
                _sql.migrate(conn, version)
                version += 1
            conn.execute(_sql.SET_VERSION, (version,))
    return version


class PostgresStore(_lease.LeaseEpochs):
    """A store many processes and machines share: one PostgreSQL database, one transaction per step.

    Same operations, schema versions and semantics as :class:`~loomc.SQLiteStore`
    (``loomc.store.core``), on a pool of psycopg 3 connections with prepared statements.

    Args:
        dsn: a libpq connection string or URI (``postgresql://user@host/db``). A schema
            other than ``public`` is chosen in the DSN (``options=-csearch_path=NAME``).
        durability: ``"power"`` (``synchronous_commit=on``: a committed step is on the
            server's disk) or ``"process"`` (``synchronous_commit=off``: the server
            acknowledges before its disk does; a server crash can lose the last commits,
            never corrupt the database).
        create: when ``False`` (readers), a database without loomc's tables is an error,
            and nothing is created or migrated.
        min_size, max_size: the pool's connections (one is opened at first use).
        idle_in_transaction_s: the server ends a connection idle inside a transaction
            this long (``idle_in_transaction_session_timeout``).
        connect_timeout: seconds to wait for the server when connecting.
        lease_ttl: how long (seconds) a run's lease lasts without being renewed, by the
            server's clock; the owner renews it every third of that. ``None``:
            ``$LOOMC_HEARTBEAT_STALE_S``, else 30.
        shared_budget: enforce the usd caps of this store's runs in the database
            (``loomc.store.shared``), so runs of one tree in several processes share them.
    """

    supports_deltas = True

    def __init__(
        self,
        dsn: str,
        *,
        durability: Durability = "power",
        create: bool = True,
        min_size: int = 1,
        max_size: int = 8,
        idle_in_transaction_s: float = _sql.IDLE_IN_TRANSACTION_S,
        connect_timeout: float = 10.0,
        lease_ttl: float | None = None,
        shared_budget: bool = False,
    ) -> None:
        if durability not in _sql.SYNCHRONOUS:
            raise ValueError(f"durability={durability!r}: use 'power' or 'process'")
        self.lease_ttl = _lease.check_ttl(lease_ttl)
        require_psycopg()
        self.shared_budget = bool(shared_budget)
        self.dsn = dsn
        #: What names this database's runs in ``loomc.store.lease`` (claims and epochs).
        self.lease_key = self._epochs_key = dsn
        self.durability: Durability = durability
        self.create = create
        self.min_size, self.max_size = min_size, max_size
        self.idle_in_transaction_s = idle_in_transaction_s
        self.connect_timeout = connect_timeout
        self.path = display_dsn(dsn)
        self._pool: psycopg_pool.ConnectionPool[Any] | None = None
        self._lock = threading.Lock()
        _open_stores.add(self)

    @property
    def db_path(self) -> str:
        """Where the store is, as messages show it (the DSN without its password)."""
        return self.path

    def __repr__(self) -> str:
        return f"PostgresStore({self.path!r}, durability={self.durability!r})"


    # -- connections --------------------------------------------------------------
    def connect_kwargs(self) -> dict[str, Any]:
        """What every connection of the store is opened with."""
        return {"autocommit": True, "prepare_threshold": 0, "connect_timeout": max(1, round(self.connect_timeout))}

    def configure(self, conn: psycopg.Connection[Any]) -> None:
        """Set up a new connection of the pool: durability, idle timeout, state loaders."""
        for stmt in session_settings(self.durability, self.idle_in_transaction_s):
            conn.execute(stmt)  # type: ignore[call-overload]
        register_state_loaders(conn.adapters)

    @property
    def pool(self) -> psycopg_pool.ConnectionPool[Any]:
        """The store's connection pool, opened (and the schema checked) on first use."""
        pool = self._pool
        if pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = self._open()
                pool = self._pool
        return pool

    def asyncio_twin(self) -> Any:
        """The running asyncio loop's :class:`~loomc.store.postgres.aio.AsyncPostgresStore` on this store."""
        from loomc.store.postgres.aio import asyncio_twin

        return asyncio_twin(self)

    def open(self) -> None:
        """Connect now (checking and migrating the schema), so a bad DSN is reported at once."""
        self.pool  # noqa: B018 - the property opens it

    def _open(self) -> psycopg_pool.ConnectionPool[Any]:
        import psycopg
        from psycopg_pool import ConnectionPool

        try:
            with psycopg.connect(self.dsn, **self.connect_kwargs()) as conn:
                check_schema(conn, self.dsn, create=self.create)
        except psycopg.Error as exc:
            raise connection_error(exc, self.dsn, "open") from None
        pool: ConnectionPool[Any] = ConnectionPool(
            self.dsn, min_size=self.min_size, max_size=self.max_size, kwargs=self.connect_kwargs(),
            configure=self.configure, open=False, name="loomc", timeout=max(self.connect_timeout, 30.0),
            num_workers=1,  # the pool's background thread (new connections, health); the caller's own do the work
        )
        pool.open(wait=False)
        return pool

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the pool (it reopens on next use). ``with PostgresStore(dsn) as store:`` closes it at the end."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def _run(self, op_for: Callable[[], Op], write: bool, retry: bool) -> Any:
        """Drive ``op_for()`` on a pooled connection (a write in one pipelined transaction).

        Run again, from a fresh ``op_for()``, when nothing of the failed attempt was kept:

        - a connection the server dropped (it restarted, or ended an idle one) is replaced
          and the operation run once more when ``retry`` (reads, and writes that land
          the same way twice; another write may have landed before the drop);
        - a write that lost a race (a unique key another transaction inserted first, a
          deadlock, a serialisation failure) was rolled back whole: run again, it sees
          the winner's row (two processes starting one run id get what SQLite gives them);
        - text holding NUL is refused before it is sent: run again, made storable.

        Any other failure is a :class:`StoreError` (a connection failure names the server).
        """
        import psycopg
        from psycopg_pool import PoolTimeout

        pool = self.pool
        clean, reconnected, races, ahead = False, False, 0, True
        while True:
            conn: Any = None
            dropped = False
            try:
                with pool.connection() as conn:
                    try:
                        if not write:
                            return drive(op_for(), conn.cursor(), clean)
                        return transact(conn, op_for(), clean, ahead)
                    except psycopg.Error:
                        dropped = conn.broken or conn.closed
                        conn.close()  # its session (what it prepared) is not trusted now: the pool replaces it
                        raise
            except PoolTimeout as exc:
                raise connection_error(exc, self.dsn, "connect to") from None
            except psycopg.Error as exc:
                if isinstance(exc, psycopg.OperationalError) and (dropped or conn is None):
                    if retry and not reconnected:
                        reconnected = True
                        pool.check()  # let go of the other dropped connections too
                        continue
                    raise connection_error(exc, self.dsn, "write to" if write else "read from") from None
                if write and ahead and fenced_out(exc):
                    ahead = False  # rolled back whole: run again, reading the fenced writes' counts
                    continue
                if write and isinstance(exc, _races()) and races < 3:
                    races += 1
                    continue
                if not clean and _has_nul_text(exc):
                    clean = True
                    continue
                raise StoreError(
                    f"PostgreSQL at {self.path} refused a {'write' if write else 'read'}: {_scrub(str(exc), self.dsn)}"
                ) from None

    def _write(self, op: WriteOp, *, retry: bool = False) -> Any:
        return self._run(lambda: op(time.time()), True, retry)

    # -- any operation (``loomc.store.transfer``: whole-database tools) -------------
    def run_read(self, op_for: Callable[[], Op]) -> Any:
        """Drive the read operation ``op_for()`` makes (``loomc.store.core`` style) on this store."""
        return self._read(op_for)

    def run_write(self, op: WriteOp) -> Any:
        """Drive the write ``op(heartbeat)`` in one transaction of this store; its result."""
        return self._write(op)

    # -- runs ---------------------------------------------------------------------
    def create_run(self, spec_hash: str, **kwargs: Any) -> str:
        """Create a run (status ``running``, no owner) and return its id."""
        return self.begin_run(NewRun(spec_hash=spec_hash, **kwargs))

    def begin_run(self, new: NewRun) -> str:
        """Create a run from ``new``, owned by ``new.owner`` (epoch 1); returns its id."""
        run_id, where, new, ttl = new.run_id or new_run_id(), self.path, text_input(new), self.ttl_s
        run_id = self._write(lambda beat: core.begin_run(_sql, where, new, run_id, ttl))
        if new.owner:
            self.hold_epoch(run_id, 1)
        return run_id  # type: ignore[no-any-return]

    def get_run(self, run_id: str) -> RunInfo | None:
        """The run with exactly this id, or ``None``."""
        return self._read(lambda: core.get_run(_sql, run_id))  # type: ignore[no-any-return]

    def resolve(self, run_id: str) -> str:
        """The full id of the run whose id is or starts with ``run_id`` (see ``SQLiteStore.resolve``)."""
        return self._read(lambda: core.resolve(_sql, self.path, run_id))  # type: ignore[no-any-return]

    def list_runs(self, *, status: str | None = None, limit: int | None = None, roots_only: bool = False) -> list[RunInfo]:
        """Runs newest first (all of them by default)."""
        return self._read(lambda: core.list_runs(_sql, status, limit, roots_only))  # type: ignore[no-any-return]

    def search_runs(
        self, *, status: str | None = None, roots_only: bool = False, id_prefix: str | None = None,
        name: str | None = None, before: tuple[str, str] | None = None, limit: int = 50,
    ) -> list[RunInfo]:
        """A page of runs, newest first, narrowed in the database (see :class:`~loomc.store.protocol.RunSearch`)."""
        return self._read(  # type: ignore[no-any-return]
            lambda: core.list_runs(_sql, status, limit, roots_only, before=before, id_prefix=id_prefix, name=name)
        )

    def update_run_status(self, run_id: str, status: RunStatus | str) -> None:
        """Set a run's status."""
        self._write(lambda beat: core.update_run_status(_sql, run_id, status), retry=True)

    def acquire(self, run_id: str, owner: str, budget: dict[str, Any] | None = None) -> None:
        """Take the run's lease for ``owner`` (raises :class:`~loomc.RunLocked` if a live process holds it).

        One transaction: the run's row is read ``FOR UPDATE`` and taken by an ``UPDATE``
        conditional on the epoch read, which it increments.
        """
        where, ttl = self.path, self.ttl_s
        self.hold_epoch(run_id, self._write(lambda beat: core.acquire(_sql, where, run_id, owner, budget, ttl)))

    def renew_leases(self, owner: str, run_ids: list[str]) -> list[str]:
        """Renew the leases of the runs in ``run_ids`` that ``owner`` still holds (the heartbeat thread).

        Returns the ids of those it no longer holds (taken over by another process).
        """
        # One transaction per lease: a transaction holding one run's row lock while it waits for
        # another's could close a cycle with a step's commit (which locks the run's ancestors,
        # then the run), and the server would abort one of them as a deadlock.
        ttl, lost = self.ttl_s, []
        for run_id in run_ids:
            lease = [(run_id, self.epoch_of(run_id))]
            lost += self._write(functools.partial(_renew, owner, lease, ttl), retry=True)
        return lost

    def commit_step(self, run_id: str, row: StepRow) -> None:
        """Write one step and the run's totals in one transaction (fenced by the run's epoch).

        Retried once on a fresh connection when the server dropped the one used: the step
        lands the same way twice (its row is replaced, its totals are absolute).
        """
        ttl, epoch = self.ttl_s, self.epoch_of(run_id)
        self._write(lambda beat: core.commit_step(_sql, run_id, row, ttl, epoch), retry=True)

    def finish_run(self, run_id: str, status: RunStatus, stop_reason: str | None, wall_s: float) -> None:
        """Record how an attempt ended."""
        epoch = self.epoch_of(run_id)
        self._write(lambda beat: core.finish_run(_sql, run_id, status, stop_reason, wall_s, epoch), retry=True)

    def set_meta(self, run_id: str, meta: dict[str, Any]) -> None:
        """Replace the run's free-form metadata (JSON)."""
        epoch = self.epoch_of(run_id)
        self._write(lambda beat: core.set_meta(_sql, run_id, meta, epoch), retry=True)

    def add_cost(self, run_id: str, usd: float) -> None:
        """Add to a run's total cost outside a step."""
        epoch = self.epoch_of(run_id)
        self._write(lambda beat: core.add_cost(_sql, run_id, usd, epoch))

    def find_child(self, parent_run_id: str, parent_step: int, call_index: int) -> RunInfo | None:
        """The child run a parent step started as its ``call_index``-th nested loop."""
        return self._read(lambda: core.find_child(_sql, parent_run_id, parent_step, call_index))  # type: ignore[no-any-return]

    def children(self, run_id: str) -> list[RunInfo]:
        """Direct child runs, in the order their parent started them."""
        return self._read(lambda: core.children(_sql, run_id))  # type: ignore[no-any-return]

    def schema_info(self) -> SchemaInfo:
        """The database's schema version and the versions this loomc reads and writes."""
        return self._read(lambda: core.schema_info(_sql))  # type: ignore[no-any-return]

    # -- holds ----------------------------------------------------------------------
    def put_hold(self, run_id: str, hold_id: int, usd: float) -> None:
        """Commit a reservation of ``run_id`` before the call it pays for is sent."""
        epoch = self.epoch_of(run_id)
        self._write(lambda beat: core.put_hold(_sql, run_id, hold_id, usd, epoch))

    def drop_holds(self, hold_ids: tuple[int, ...]) -> None:
        """Delete holds whose spending is recorded by now (outside a step's commit)."""
        self._write(lambda beat: core.drop_holds(_sql, hold_ids), retry=True)

    def charge_holds(self, run_id: str) -> HeldCharge | None:
        """Charge every hold left by ``run_id`` and the runs below it to ``run_id``, in full (one transaction)."""
        return self._write(lambda beat: core.charge_holds(_sql, run_id))  # type: ignore[no-any-return]

    # -- the shared budget (``loomc.store.shared``) ------------------------------------------
    def reserve_shared(self, chain: tuple[str, ...], hold_id: int, usd: float) -> None:
        """Hold ``usd`` for ``chain[0]`` against the caps of every run in ``chain``, in the database.

        Raises:
            BudgetExhausted: a cap cannot take it (nothing is held).
            LeaseLost: this process no longer holds ``chain[0]``.
        """
        epoch = self.epoch_of(chain[0])
        self._write(lambda beat: core.reserve_shared(_sql, chain, hold_id, usd, epoch, EPS))

    def shared_view(self, run_id: str) -> tuple[float, float, float | None] | None:
        """``(spent, reserved, cap)`` of a run as the database holds them."""
        return self._read(lambda: core.shared_view(_sql, run_id))  # type: ignore[no-any-return]

    #: A run's ledger: a shared one (``loomc.store.shared``) with ``shared_budget`` or under a shared parent.
    open_ledger = _shared.open_ledger

    # -- steps ----------------------------------------------------------------------
    def save_step(self, run_id: str, record: StepRecord) -> None:
        """Write a step record and fold it into the run's totals (loomc 0.3.0 API)."""
        ttl, epoch = self.ttl_s, self.epoch_of(run_id)
        self._write(lambda beat: core.save_step(_sql, self.path, run_id, record, ttl, epoch))

    def load_steps(self, run_id: str) -> list[StepRecord]:
        """Every step of the run, states included, in order."""
        return self._read(lambda: core.load_steps(_sql, self.path, run_id))  # type: ignore[no-any-return]

    def stored_steps(self, run_id: str) -> list[StoredStep]:
        """Every step of the run with its state as stored (deltas made whole), in order."""
        return self._read(lambda: core.stored_steps(_sql, self.path, run_id))  # type: ignore[no-any-return]

    def stored_input(self, run_id: str) -> StoredInput | None:
        """The run's input as stored, its state type and next start (``None``: no such run)."""
        return self._read(lambda: core.stored_input(_sql, run_id))  # type: ignore[no-any-return]

    def stored_state(self, run_id: str, step_n: int) -> str | bytes | None:
        """A step's state as stored, a delta made whole (``None``: no such step)."""
        return self._read(lambda: core.stored_state(_sql, self.path, run_id, step_n))  # type: ignore[no-any-return]

    def load_state(self, run_id: str, step_n: int) -> Any:
        """The state a step committed (``step_n == -1``: the run's input)."""
        return self._read(lambda: core.load_state(_sql, self.path, run_id, step_n))

    def resume_point(self, run_id: str) -> ResumePoint:
        """The run's info, its last step and the state to start from (earlier steps: ``step_history``)."""
        loader = StateLoader(self, run_id)
        return self._read(lambda: core.resume_point(_sql, self.path, run_id, loader))  # type: ignore[no-any-return]

    def step_history(self, run_id: str, before: int) -> list[StepRecord]:
        """The run's steps numbered below ``before``, in order (states loaded lazily)."""
        loader = StateLoader(self, run_id)
        return self._read(lambda: core.step_history(_sql, run_id, before, loader))  # type: ignore[no-any-return]

    def step_window(
        self, run_id: str, after: int = -1, *, first: int | None = None, last: int | None = None,
        error_chars: int | None = None,
    ) -> list[StepRecord]:
        """Step metadata (no state) in step order, reading only the rows asked for (see ``core.step_window``)."""
        return self._read(lambda: core.step_window(_sql, run_id, after, first, last, error_chars))  # type: ignore[no-any-return]

    def step_totals(self, run_id: str, before: int) -> tuple[int, float]:
        """``(steps, cost)`` of a run's steps numbered below ``before``."""
        return self._read(lambda: core.step_totals(_sql, run_id, before))  # type: ignore[no-any-return]

    # -- a run's whole life: questions, forks, pruning ----------------------------------
    def questions(self, run_id: str, tree: bool = False) -> list[Question]:
        """The questions the run's steps asked (``tree``: and those of the runs below it)."""
        return self._read(lambda: core.questions(_sql, run_id, tree))  # type: ignore[no-any-return]

    def wait_for_input(self, run_id: str, row: WaitRow) -> None:
        """Stop the run to wait for an answer (status ``waiting``, the question stored) in one transaction."""
        epoch = self.epoch_of(run_id)
        self._write(lambda beat: core.wait_for_input(_sql, run_id, row, epoch), retry=True)

    def answer(self, question: Question, answer: str) -> None:
        """Store the answer (JSON text) to ``question``; an answer already given is never replaced."""
        self._write(lambda beat: core.answer(_sql, self.path, question, answer))

    def fork(
        self, run_id: str, at_step: int, *, new_run_id: str, state_blob: str | bytes | None = None,
        budget: dict[str, Any] | None = None,
    ) -> str:
        """Make run ``new_run_id`` from the history of ``run_id`` up to ``at_step`` (see ``core.fork``)."""
        where = self.path
        return self._write(lambda beat: core.fork(_sql, where, run_id, at_step, new_run_id, state_blob, budget))  # type: ignore[no-any-return]

    def prune(
        self, *, older_than: str | float | timedelta | None = None, status: str | list[str] | None = None,
        name: str | None = None, keep_last: int | None = None, dry_run: bool = False, now: float | None = None,
    ) -> PruneReport:
        """Delete whole run trees that match (never a running or waiting one); what was removed.

        The arguments are :meth:`SQLiteStore.prune <loomc.SQLiteStore.prune>`'s. A few
        hundred trees go per transaction, so loops committing meanwhile go on; the
        tables keep their size until :meth:`vacuum` (and the server's autovacuum) reuse it.
        """
        request = core.prune_request(older_than, status, name, keep_last, now)
        chosen = core.prune_choice(request, self._read(lambda: core.prune_roots(_sql)), request.now or time.time())
        parts = [
            self._read(lambda part=part: core.prune_trees(_sql, part, True)) if dry_run  # type: ignore[misc]
            else self._write(lambda beat, part=part: core.prune_trees(_sql, part, False))  # type: ignore[misc]
            for part in core.prune_chunks(chosen)
        ]
        return core.merge_reports(parts, dry_run)

    def table_bytes(self) -> int:
        """The space loomc's tables take in the schema (tables, indexes, TOAST), in bytes."""
        return int(self._read(lambda: _one_value(_sql.TABLES_SIZE)))

    def vacuum(self) -> tuple[int, int]:
        """Run PostgreSQL's ``VACUUM`` on loomc's tables; the space they take ``(before, after)``, in bytes.

        ``VACUUM`` (outside a transaction; other sessions keep reading and writing) makes
        the space of deleted rows free for new ones and gives the pages at the end of a
        table back to the file system. It does not rewrite the tables: ``VACUUM FULL``
        (by hand, with its exclusive lock) shrinks them to their live rows.
        """
        import psycopg

        before = self.table_bytes()
        try:
            with self.pool.connection() as conn:
                for stmt in _sql.VACUUM:
                    conn.execute(stmt, prepare=False)  # type: ignore[call-overload]
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL at {self.path} refused VACUUM: {_scrub(str(exc), self.dsn)}") from None
        return before, self.table_bytes()

    def _read(self, op_for: Callable[[], Op]) -> Any:
        """A read, run again on a fresh connection if the server dropped the first one."""
        return self._run(op_for, False, True)


def _one_value(sql: str) -> Op:
    """The first column of the one row ``sql`` reads."""
    return (yield QUERY, sql, ())[0][0]




# A forked child (multiprocessing, a process pool) must not use its parent's connections,
# nor the pool's threads, which did not survive the fork: it opens its own on first use.
_open_stores: weakref.WeakSet[PostgresStore] = weakref.WeakSet()


def _forget_pools_in_child() -> None:
    for store in list(_open_stores):
        store._pool = None  # abandoned, not closed: closing would end the parent's sessions
        store._lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools_in_child)


def _renew(owner: str, lease: list[tuple[str, int | None]], ttl: float, beat: float) -> core.Op:
    """The store core's lease renewal for one lease (a write's op, given the writer's clock it ignores)."""
    return core.renew_leases(_sql, owner, lease, ttl)
