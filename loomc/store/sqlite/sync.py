"""The SQLite store (sync driver): one connection per store, WAL, one transaction per step.

The operations are ``loomc.store.core``'s, written once for every store and driver; this
module fulfils their requests on ``sqlite3`` and owns the connection: opening, schema
checks and migrations (``loomc.store.sqlite.sql``), and noticing a deleted file. Stores
are cached per database path (``open_store``), so every loop of a process (and every
nested loop of a tree) shares one connection to a given file.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from loomc._core import events as _step_events
from loomc._core.errors import SchemaTooNew, StoreError
from loomc._core.holds import HeldCharge
from loomc._core.policy import EPS
from loomc._core.types import RunInfo, RunStatus, StepRecord
from loomc.store import core
from loomc.store import lease as _lease
from loomc.store import shared as _shared
from loomc.store.core import Op, StateLoader, drive, expand_rows
from loomc.store.protocol import (
    CheckpointStore,
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
    default_db_path,
    new_run_id,
)
from loomc.store.sqlite import sql as _sql

__all__ = [
    "CheckpointStore",
    "Durability",
    "MemoryStore",
    "NewRun",
    "ResumePoint",
    "SQLiteStore",
    "StateLoader",
    "default_db_path",
    "expand_rows",
    "new_run_id",
    "open_store",
]



# ---------------------------------------------------------------------------------
# SQLite


class SQLiteStore(_lease.LeaseEpochs):
    """The embedded default store: one SQLite file in WAL mode, one transaction per step.

    Args:
        path: the database file (default ``$LOOMC_DB`` or ``.loomc/checkpoints.db``).
            Created, with its directory, at first use unless ``create=False``.
        durability: ``"power"`` (``synchronous=FULL``: a committed step survives a power
            cut) or ``"process"`` (``synchronous=NORMAL``: survives any process crash).
        create: when ``False``, a missing database is a :class:`StoreError` (readers).
        lease_ttl: how long (seconds) a run's lease lasts without being renewed; the owner
            renews it every third of that. ``None``: ``$LOOMC_HEARTBEAT_STALE_S``, else 30.
        shared_budget: enforce the usd caps of this store's runs in the database
            (``loomc.store.shared``), so runs of one tree in several processes share them.
    """

    #: Large states may be stored as deltas against an earlier step (see ``_codec``).
    supports_deltas = True

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        durability: Durability = "power",
        create: bool = True,
        db_path: str | os.PathLike[str] | None = None,
        lease_ttl: float | None = None,
        shared_budget: bool = False,
    ) -> None:
        if durability not in _sql.SYNCHRONOUS:
            raise ValueError(f"durability={durability!r}: use 'power' or 'process'")
        chosen = path if path is not None else db_path
        self.path = Path(chosen) if chosen is not None else default_db_path()
        self.lease_ttl = _lease.check_ttl(lease_ttl)
        self.shared_budget = bool(shared_budget)
        self._key = self._epochs_key = _lease.store_key(self)  # this database's runs in ``lease.epochs``
        self.durability: Durability = durability
        self.create = create
        self._conn: sqlite3.Connection | None = None
        self._cur: sqlite3.Cursor | None = None  # the commit path's cursor (one per connection)
        self._ident: tuple[int, int] | None = None
        self._wal_ident: tuple[int, int] | None = None
        self._wal_path = Path(f"{self.path}-wal")
        self._next_check = 0.0  # monotonic time of the next file-identity check
        self._lock = threading.RLock()

    # -- connection ---------------------------------------------------------------
    @property
    def db_path(self) -> str:
        """The database file path (loomc 0.3.0 attribute)."""
        return str(self.path)

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r}, durability={self.durability!r})"


    @property
    def conn(self) -> sqlite3.Connection:
        """The store's one connection, opened (and the schema checked) on first use."""
        if self._conn is None:
            with self._lock:
                if self._conn is None:
                    self._conn = self._open()
        return self._conn

    def open(self) -> None:
        """Open the database now (checking and migrating its schema), so a bad file is reported at once."""
        self.conn  # noqa: B018 - the property opens it

    def _open(self) -> sqlite3.Connection:
        path = self.path
        if not self.create and not path.exists():
            raise StoreError(f"no loomc database at {path}: run a loop first, or pass --db / set LOOMC_DB")
        if self.create:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot create the database directory {path.parent}: {exc.strerror or exc}; "
                    "set LOOMC_DB or checkpoint= to a writable path"
                ) from exc
        try:
            uri = f"file:{path}?mode={'rwc' if self.create else 'rw'}"
            conn = sqlite3.connect(
                uri, uri=True, isolation_level=None, check_same_thread=False, timeout=_sql.BUSY_TIMEOUT_S
            )
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot open the database {path}: {exc}; check the path and its permissions, "
                "or set LOOMC_DB / checkpoint= to a writable path"
            ) from exc
        try:
            self._prepare_when_free(conn)
            self._ident = _file_ident(path)
            self._wal_ident = _file_ident(self._wal_path)  # WAL mode made it; it lives while we are open
            self._next_check = 0.0
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare_when_free(self, conn: sqlite3.Connection) -> None:
        """``_prepare``, retried while another process holds a lock it needs (e.g. both create the file)."""
        deadline = time.monotonic() + _sql.BUSY_TIMEOUT_S
        delay = 0.001
        while True:
            try:
                self._prepare(conn)
                return
            except StoreError as exc:
                cause = exc.__cause__
                busy = isinstance(cause, sqlite3.OperationalError) and ("locked" in str(cause) or "busy" in str(cause))
                if not busy or time.monotonic() > deadline:
                    raise
            if conn.in_transaction:
                conn.execute(_sql.ROLLBACK)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _prepare(self, conn: sqlite3.Connection) -> None:
        path = self.path
        try:
            version = conn.execute(_sql.SELECT_VERSION).fetchone()[0]
            if version > _sql.SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"{path} was written by a newer loomc (schema v{version}; this loomc reads up to "
                    f"v{_sql.SCHEMA_VERSION}); upgrade loomc to use it — the file was not changed"
                )
            if version == 0:
                tables = {r[0] for r in conn.execute(_sql.SELECT_TABLES)}
                if tables and "runs" not in tables:
                    raise StoreError(
                        f"{path} is a SQLite database but not a loomc one (tables: "
                        f"{', '.join(sorted(tables)[:5])}); point LOOMC_DB / --db at another file"
                    )
            # Readers never migrate (nor set a pragma that writes) a file: one older than
            # they read is refused untouched, an empty one is reported.
            if not self.create and version < _sql.READS_FROM:
                if conn.execute(_sql.HAS_RUNS).fetchone():
                    raise StoreError(
                        f"{path} was written by an older loomc (schema v{version}, this loomc uses "
                        f"v{_sql.SCHEMA_VERSION}); upgrade it once by opening it for writing, e.g. "
                        f'python -c "import loomc; loomc.SQLiteStore({str(path)!r}).list_runs()"'
                    )
                raise StoreError(f"{path} holds no loomc runs yet; run a loop first")
            for pragma in _sql.PRAGMAS:
                conn.execute(pragma)
            conn.execute(_sql.SET_SYNCHRONOUS.format(_sql.SYNCHRONOUS[self.durability]))
            if version < _sql.SCHEMA_VERSION and self.create:
                conn.create_function("loomc_events_v4", 1, _step_events.migrate, deterministic=True)
                conn.execute(_sql.BEGIN_WRITE)
                try:
                    version = conn.execute(_sql.SELECT_VERSION).fetchone()[0]
                    while version < _sql.SCHEMA_VERSION:
                        _sql.migrate(conn, version)
                        version += 1
                        conn.execute(_sql.SET_VERSION.format(version))
                    conn.execute(_sql.COMMIT)
                except BaseException:
                    conn.execute(_sql.ROLLBACK)
                    raise
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{path} is not a usable loomc database ({exc}); move it away or point "
                "LOOMC_DB / --db at another file"
            ) from exc

    def close(self) -> None:
        """Close the connection (it reopens on next use)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = self._cur = None

    def check_file(self, conn: sqlite3.Connection | None = None) -> None:
        """Raise :class:`StoreError` if the open database file or its WAL was deleted or replaced.

        SQLite keeps writing to a deleted file's inode, so without this check a loop would
        go on "committing" steps that vanish when the process exits. The same holds for
        the ``-wal`` file, which holds every step committed since the last checkpoint: when
        it is gone, ``conn`` (the connection that wrote it, still holding it open) first
        copies those steps into the database file, so that none is lost, then the write stops.
        """
        if self._ident is None:
            return
        if _file_ident(self.path) != self._ident:
            self.close()
            raise StoreError(
                f"the database {self.path} was deleted or replaced while this process was writing to it; "
                "its runs are gone with it. Restore the file from a backup, or start the run again "
                "(a new database is created on the next run)"
            )
        if self._wal_ident is not None and _file_ident(self._wal_path) != self._wal_ident:
            # Until this connection is reopened (with a new WAL), every write must fail: an
            # async store's connection stays open, and would write into the deleted file.
            self._next_check = 0.0
            saved = self._save_deleted_wal(conn if conn is not None else self._conn)
            self.close()
            raise StoreError(
                f"the write-ahead log {self._wal_path} was deleted or replaced while this process was writing "
                f"to {self.path}; "
                + (
                    "the steps it held were copied into the database file, so none is lost: resume the run "
                    "(and do not delete -wal files of a database in use)"
                    if saved
                    else "the steps committed since the last checkpoint could not be copied back and may be "
                    "lost: check the run with `loomc show` before resuming it"
                )
            )

    @staticmethod
    def _save_deleted_wal(conn: sqlite3.Connection | None) -> bool:
        """Checkpoint a deleted WAL (still open in ``conn``) into the database file; did it work?"""
        if conn is None:
            return False
        try:
            if conn.in_transaction:
                conn.execute(_sql.ROLLBACK)
            busy, _, _ = conn.execute(_sql.CHECKPOINT_WAL).fetchone()
        except sqlite3.Error:
            return False
        return not busy

    def check_file_soon(self, conn: sqlite3.Connection | None = None) -> None:
        """:meth:`check_file`, at most every ``FILE_CHECK_S`` seconds (on the commit path).

        A ``stat`` right after an fsync costs ~25 us on a journaling filesystem, a tenth of
        a durable step; checked at most 10 times a second, a deleted database is still
        reported within 0.1 s.
        """
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + FILE_CHECK_S
            self.check_file(conn)

    def write_batch(self, ops: list[WriteOp]) -> tuple[dict[int, Any], dict[int, BaseException]]:
        """Run every write of ``ops`` in one transaction; their results and errors by position.

        The group commit of the async store sends its batches here (from a worker thread).
        Each write of a batch of several runs under its own savepoint once one has failed,
        so that it fails alone (a lease held by a live process, a duplicate id); a failed
        commit fails them all (raised). A single write's error is raised.
        """
        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}
        with self._lock:
            conn = self.conn
            cur = conn.cursor()
            execute, many = cur.execute, cur.executemany
            self.check_file_soon(conn)
            beat = time.time()

            def run_all() -> None:
                try:
                    for i, op in enumerate(ops):
                        results[i] = drive(op(beat), execute, many)
                except Exception:
                    if len(ops) == 1:
                        raise
                    # One write failed: undo the batch, then give each write its own
                    # savepoint (the common case above pays for no savepoints).
                    results.clear()
                    if conn.in_transaction:
                        execute(_sql.ROLLBACK)
                    execute(_sql.BEGIN_WRITE)
                    for i, op in enumerate(ops):
                        execute(_sql.SAVEPOINT)
                        try:
                            results[i] = drive(op(beat), execute, many)
                        except Exception as exc:  # noqa: BLE001 - this write fails alone
                            execute(_sql.ROLLBACK_SAVEPOINT)
                            errors[i] = self._wrap(exc) if isinstance(exc, sqlite3.Error) else exc
                        execute(_sql.RELEASE_SAVEPOINT)

            self._transact(cur, run_all)
        return results, errors

    def _transact(self, cur: sqlite3.Cursor, run: Callable[[], object]) -> None:
        """``run()`` between BEGIN and COMMIT on ``cur`` (under ``_lock``); rolled back and wrapped if it fails."""
        try:
            cur.execute(_sql.BEGIN_WRITE)
            run()
            cur.execute(_sql.COMMIT)
        except BaseException as exc:
            self._undo(cur, exc)
            raise

    def _undo(self, cur: sqlite3.Cursor, exc: BaseException) -> None:
        """Roll back the transaction ``exc`` broke; raise a database error as a :class:`StoreError`."""
        conn = cur.connection
        if conn.in_transaction:
            conn.execute(_sql.ROLLBACK)
        if isinstance(exc, sqlite3.Error):
            raise self._wrap(exc) from exc

    def _write(self, op: WriteOp) -> Any:
        return self.write_batch([op])[0][0]

    def _read(self, op: Op) -> Any:
        with self._lock:
            conn = self.conn
            try:
                return drive(op, conn.execute, conn.executemany)
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"cannot read {self.path}: {exc}") from exc

    def _wrap(self, exc: sqlite3.Error) -> StoreError:
        msg = str(exc)
        if "full" in msg:
            hint = "free disk space, then resume the run"
        elif "readonly" in msg or "read-only" in msg:
            hint = "the database or its directory is read-only; fix permissions or set LOOMC_DB"
        elif "locked" in msg or "busy" in msg:
            hint = "another process held the database too long; retry or resume the run"
        else:
            hint = "check the database file; committed steps are kept"
        return StoreError(f"cannot write to {self.path}: {msg}; {hint}")


    # -- any operation (``loomc.store.transfer``: whole-database tools) -------------
    def run_read(self, op_for: Callable[[], Op]) -> Any:
        """Drive the read operation ``op_for()`` makes (``loomc.store.core`` style) on this store."""
        return self._read(op_for())

    def run_write(self, op: WriteOp) -> Any:
        """Drive the write ``op(heartbeat)`` in one transaction of this store; its result."""
        return self._write(op)

    # -- runs ---------------------------------------------------------------------
    def create_run(self, spec_hash: str, **kwargs: Any) -> str:
        """Create a run (status ``running``, no owner) and return its id."""
        return self.begin_run(NewRun(spec_hash=spec_hash, **kwargs))

    def begin_run(self, new: NewRun) -> str:
        """Create a run from ``new``, owned by ``new.owner``; returns its id."""
        run_id, where, ttl = new.run_id or new_run_id(), str(self.path), self.ttl_s
        run_id = self._write(lambda beat: core.begin_run(_sql, where, new, run_id, ttl))
        if new.owner:
            self.hold_epoch(run_id, 1)
        return run_id  # type: ignore[no-any-return]

    def get_run(self, run_id: str) -> RunInfo | None:
        """The run with exactly this id, or ``None``."""
        return self._read(core.get_run(_sql, run_id))  # type: ignore[no-any-return]

    def resolve(self, run_id: str) -> str:
        """The full id of the run whose id is or starts with ``run_id``.

        Raises:
            RunNotFound: listing the nearest ids.
            AmbiguousRunId: when several runs share the prefix.
        """
        return self._read(core.resolve(_sql, str(self.path), run_id))  # type: ignore[no-any-return]

    def list_runs(self, *, status: str | None = None, limit: int | None = None, roots_only: bool = False) -> list[RunInfo]:
        """Runs newest first (all of them by default, as in loomc 0.3.0)."""
        return self._read(core.list_runs(_sql, status, limit, roots_only))  # type: ignore[no-any-return]

    def search_runs(
        self, *, status: str | None = None, roots_only: bool = False, id_prefix: str | None = None,
        name: str | None = None, before: tuple[str, str] | None = None, limit: int = 50,
    ) -> list[RunInfo]:
        """A page of runs, newest first, narrowed in the database (see :class:`~loomc.store.protocol.RunSearch`)."""
        op = core.list_runs(_sql, status, limit, roots_only, before=before, id_prefix=id_prefix, name=name)
        return self._read(op)  # type: ignore[no-any-return]

    def update_run_status(self, run_id: str, status: RunStatus | str) -> None:
        """Set a run's status."""
        self._write(lambda beat: core.update_run_status(_sql, run_id, status))

    def acquire(self, run_id: str, owner: str, budget: dict[str, Any] | None = None) -> None:
        """Take the run's lease for ``owner`` (raises :class:`RunLocked` if a live process holds it)."""
        where, ttl = str(self.path), self.ttl_s
        self.hold_epoch(run_id, self._write(lambda beat: core.acquire(_sql, where, run_id, owner, budget, ttl)))

    def renew_leases(self, owner: str, run_ids: list[str]) -> list[str]:
        """Renew the leases of the runs in ``run_ids`` that ``owner`` still holds (the heartbeat thread).

        Returns the ids of those it no longer holds (taken over by another process).
        """
        leases, ttl = [(run_id, self.epoch_of(run_id)) for run_id in run_ids], self.ttl_s
        return self._write(lambda beat: core.renew_leases(_sql, owner, leases, ttl))  # type: ignore[no-any-return]

    def commit_step(self, run_id: str, row: StepRow) -> None:
        """Write one step and the run's totals in one transaction."""
        # ``write_batch`` for one write, without the batch: this runs once per step, the hot path.
        with self._lock:
            cur = self._cur
            if cur is None:
                cur = self._cur = self.conn.cursor()  # Connection.execute makes a cursor per call
            if time.monotonic() >= self._next_check:  # (:meth:`check_file_soon` without its call)
                self.check_file_soon()
            # ``_transact`` spelled out: one call frame less per step
            execute = cur.execute
            try:
                execute(_sql.BEGIN_WRITE)
                op = core.commit_step(_sql, run_id, row, self.lease_ttl or _lease.HEARTBEAT_STALE_S,
                                      _lease.epochs.get((self._key, run_id)))
                drive(op, execute, cur.executemany)
                execute(_sql.COMMIT)
            except BaseException as exc:
                self._undo(cur, exc)
                raise

    def finish_run(self, run_id: str, status: RunStatus, stop_reason: str | None, wall_s: float) -> None:
        """Record how an attempt ended."""
        epoch = self.epoch_of(run_id)
        self._write(lambda beat: core.finish_run(_sql, run_id, status, stop_reason, wall_s, epoch))

    def set_meta(self, run_id: str, meta: dict[str, Any]) -> None:
        """Replace the run's free-form metadata (JSON)."""
        epoch = self.epoch_of(run_id)
        self._write(lambda beat: core.set_meta(_sql, run_id, meta, epoch))

    def add_cost(self, run_id: str, usd: float) -> None:
        """Add to a run's total cost outside a step (e.g. a graph run's node costs)."""
        epoch = self.epoch_of(run_id)
        self._write(lambda beat: core.add_cost(_sql, run_id, usd, epoch))

    def find_child(self, parent_run_id: str, parent_step: int, call_index: int) -> RunInfo | None:
        """The child run a parent step started as its ``call_index``-th nested loop."""
        return self._read(core.find_child(_sql, parent_run_id, parent_step, call_index))  # type: ignore[no-any-return]

    def children(self, run_id: str) -> list[RunInfo]:
        """Direct child runs, in the order their parent started them."""
        return self._read(core.children(_sql, run_id))  # type: ignore[no-any-return]

    def schema_info(self) -> SchemaInfo:
        """The database's schema version and the versions this loomc reads and writes."""
        return self._read(core.schema_info(_sql))  # type: ignore[no-any-return]

    # -- holds (``loomc._core.holds``) ---------------------------------------------------
    def put_hold(self, run_id: str, hold_id: int, usd: float) -> None:
        """Commit a reservation of ``run_id`` before the call it pays for is sent."""
        epoch = self.epoch_of(run_id)
        self._write(lambda beat: core.put_hold(_sql, run_id, hold_id, usd, epoch))

    def drop_holds(self, hold_ids: tuple[int, ...]) -> None:
        """Delete holds whose spending is recorded by now (outside a step's commit)."""
        self._write(lambda beat: core.drop_holds(_sql, hold_ids))

    def charge_holds(self, run_id: str) -> HeldCharge | None:
        """Charge every hold left by ``run_id`` and the runs below it to ``run_id``, in full.

        The holds are deleted, the run's cost raised and the charge noted in its
        ``meta["held_charges"]``, in one transaction. Returns ``None`` when there were none.
        """
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
        return self._read(core.shared_view(_sql, run_id))  # type: ignore[no-any-return]

    #: A run's ledger: a shared one (``loomc.store.shared``) with ``shared_budget`` or under a shared parent.
    open_ledger = _shared.open_ledger

    # -- steps --------------------------------------------------------------------
    def save_step(self, run_id: str, record: StepRecord) -> None:
        """Write a step record and fold it into the run's totals (loomc 0.3.0 API)."""
        where, ttl, epoch = str(self.path), self.ttl_s, self.epoch_of(run_id)
        self._write(lambda beat: core.save_step(_sql, where, run_id, record, ttl, epoch))

    def load_steps(self, run_id: str) -> list[StepRecord]:
        """Every step of the run, states included, in order."""
        return self._read(core.load_steps(_sql, str(self.path), run_id))  # type: ignore[no-any-return]

    def stored_steps(self, run_id: str) -> list[StoredStep]:
        """Every step of the run with its state as stored (deltas made whole), in order."""
        return self._read(core.stored_steps(_sql, str(self.path), run_id))  # type: ignore[no-any-return]

    def stored_input(self, run_id: str) -> StoredInput | None:
        """The run's input as stored, its state type and next start (``None``: no such run)."""
        return self._read(core.stored_input(_sql, run_id))  # type: ignore[no-any-return]

    def stored_state(self, run_id: str, step_n: int) -> str | bytes | None:
        """A step's state as stored, a delta made whole (``None``: no such step).

        Raises:
            StoreError: the step's row is there but its state is not (a damaged file).
        """
        return self._read(core.stored_state(_sql, str(self.path), run_id, step_n))  # type: ignore[no-any-return]

    def load_state(self, run_id: str, step_n: int) -> Any:
        """The state a step committed (``step_n == -1``: the run's input)."""
        return self._read(core.load_state(_sql, str(self.path), run_id, step_n))

    def resume_point(self, run_id: str) -> ResumePoint:
        """The run's info, its last step and the state to start from (earlier steps: ``step_history``)."""
        return self._read(core.resume_point(_sql, str(self.path), run_id, StateLoader(self, run_id)))  # type: ignore[no-any-return]

    def step_history(self, run_id: str, before: int) -> list[StepRecord]:
        """The run's steps numbered below ``before``, in order (states loaded lazily)."""
        return self._read(core.step_history(_sql, run_id, before, StateLoader(self, run_id)))  # type: ignore[no-any-return]

    def step_window(
        self, run_id: str, after: int = -1, *, first: int | None = None, last: int | None = None,
        error_chars: int | None = None,
    ) -> list[StepRecord]:
        """Step metadata (no state) in step order, reading only the rows asked for (see ``core.step_window``)."""
        return self._read(core.step_window(_sql, run_id, after, first, last, error_chars))  # type: ignore[no-any-return]

    def step_totals(self, run_id: str, before: int) -> tuple[int, float]:
        """``(steps, cost)`` of a run's steps numbered below ``before``: what a window leaves out."""
        return self._read(core.step_totals(_sql, run_id, before))  # type: ignore[no-any-return]


    # -- a run's whole life: questions, forks, pruning ----------------------------------
    def questions(self, run_id: str, tree: bool = False) -> list[Question]:
        """The questions the run's steps asked (``tree``: and those of the runs below it)."""
        return self._read(core.questions(_sql, run_id, tree))  # type: ignore[no-any-return]

    def wait_for_input(self, run_id: str, row: WaitRow) -> None:
        """Stop the run to wait for an answer (status ``waiting``, the question stored) in one transaction."""
        epoch = self.epoch_of(run_id)
        self._write(lambda beat: core.wait_for_input(_sql, run_id, row, epoch))

    def answer(self, question: Question, answer: str) -> None:
        """Store the answer (JSON text) to ``question``; an answer already given is never replaced."""
        where = str(self.path)
        self._write(lambda beat: core.answer(_sql, where, question, answer))

    def fork(
        self, run_id: str, at_step: int, *, new_run_id: str, state_blob: str | bytes | None = None,
        budget: dict[str, Any] | None = None,
    ) -> str:
        """Make run ``new_run_id`` from the history of ``run_id`` up to ``at_step`` (see ``core.fork``)."""
        where = str(self.path)
        return self._write(lambda beat: core.fork(_sql, where, run_id, at_step, new_run_id, state_blob, budget))  # type: ignore[no-any-return]

    def prune(
        self, *, older_than: str | float | timedelta | None = None, status: str | list[str] | None = None,
        name: str | None = None, keep_last: int | None = None, dry_run: bool = False, now: float | None = None,
    ) -> PruneReport:
        """Delete whole run trees that match (never a running or waiting one); what was removed.

        Args:
            older_than: only runs not updated for this long (``"30d"``, seconds, a ``timedelta``).
            status: only runs with these statuses (a list, or ``"failed,completed"``).
            name: only runs whose name matches this glob pattern (``"app:*"``).
            keep_last: of each name, keep the newest this many runs that match.
            dry_run: report what would go, remove nothing.
            now: the time ages count from (``time.time()``).

        Deletes runs, steps, questions, holds and the blobs no other run (a fork) shares,
        a few hundred trees per transaction, so loops committing meanwhile go on. The
        file does not shrink until :meth:`vacuum`.
        """
        request = core.prune_request(older_than, status, name, keep_last, now)
        chosen = core.prune_choice(request, self._read(core.prune_roots(_sql)), request.now or time.time())
        parts = [
            self._read(core.prune_trees(_sql, part, True)) if dry_run
            else self._write(lambda beat, part=part: core.prune_trees(_sql, part, False))  # type: ignore[misc]
            for part in core.prune_chunks(chosen)
        ]
        return core.merge_reports(parts, dry_run)

    def vacuum(self) -> tuple[int, int]:
        """Return the space freed by deleted runs to the file system; the file's size ``(before, after)``.

        SQLite's ``VACUUM`` rewrites the file (it needs as much free disk again, and waits
        for other processes' writes to finish); the write-ahead log is emptied first.
        """
        with self._lock:
            conn = self.conn
            before = _size(self.path)
            try:
                for stmt in _sql.VACUUM:
                    conn.execute(stmt)
            except sqlite3.Error as exc:
                raise self._wrap(exc) from exc
            return before, _size(self.path)


def _size(path: Path) -> int:
    """Bytes on disk of a database and its write-ahead log."""
    total = 0
    for p in (path, Path(f"{path}-wal")):
        try:
            total += p.stat().st_size
        except OSError:
            pass
    return total


#: How often (seconds) a writing store checks that its database file is still there.
FILE_CHECK_S = 0.1


def _file_ident(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``, or ``None`` when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


#: A write for ``SQLiteStore.write_batch``: given the heartbeat time, the operation to drive.
WriteOp = Callable[[float], Op]

# The memory store and ``open_store`` lived here before 0.6; the names still import from here.
from loomc.store.memory import MemoryStore  # noqa: E402
from loomc.store.open import _stores, open_store  # noqa: E402, F401 - the cache, for tests written before 0.6
