"""Checkpoint stores: the ``CheckpointStore`` protocol, SQLite (default) and memory.

One connection per store, WAL, one transaction per step. Stores are cached per
database path, so every loop of a process (and every nested loop of a tree) shares
one connection to a given file.
"""

from __future__ import annotations

import bisect
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from loomc._core import events as _step_events
from loomc._core.errors import AmbiguousRunId, LoomcError, RunNotFound, SchemaTooNew, StoreError
from loomc._core.holds import HeldCharge, charge_record
from loomc._core.types import _MISSING, RunInfo, RunStatus, StepRecord
from loomc.store.codec import decode, delta_base, encode, expand
from loomc.store.sqlite import sql as _sql

__all__ = [
    "CheckpointStore",
    "Durability",
    "MemoryStore",
    "NewRun",
    "SQLiteStore",
    "default_db_path",
    "new_run_id",
    "open_store",
]

Durability = Literal["power", "process"]


def default_db_path() -> Path:
    """``$LOOMC_DB``, else ``.loomc/checkpoints.db`` under the working directory."""
    env = os.environ.get("LOOMC_DB")
    return Path(env) if env else Path.cwd() / ".loomc" / "checkpoints.db"


def new_run_id() -> str:
    """A fresh run id: 12 lowercase hex characters."""
    return secrets.token_hex(6)


@dataclass(frozen=True)
class NewRun:
    """What a store needs to create a run."""

    spec_hash: str
    name: str = ""
    kind: str = "loop"
    run_id: str | None = None
    parent_run_id: str | None = None
    parent_step: int | None = None
    call_index: int | None = None
    root_run_id: str | None = None
    state_type: str | None = "json"
    input_blob: str | bytes | None = None
    budget: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None
    owner: str | None = None
    cost_usd: float = 0.0


@dataclass(frozen=True)
class ResumePoint:
    """Where a run picks up: the state the next step starts from and its history.

    With ``partial``, ``history`` holds only the last step; the engine reads the earlier
    ones (``step_history``) when a strategy, a detector or the result first needs them.
    ``in_flight_usd`` is what the children of the step not yet committed have spent: the
    run's stored total includes it (children roll their spending up as they commit), and a
    re-found child's spending is taken from it rather than counted again.
    """

    info: RunInfo
    state_type: str | None
    start_blob: str | bytes | None
    next_from: int
    history: list[StepRecord]
    partial: bool = False
    in_flight_usd: float = 0.0


@runtime_checkable
class CheckpointStore(Protocol):
    """What the engine needs from a checkpoint backend (synchronous).

    The first six methods are loomc 0.3.0's store API; the rest serve the engine.
    """

    def create_run(self, spec_hash: str, **kwargs: Any) -> str: ...
    def get_run(self, run_id: str) -> RunInfo | None: ...
    def list_runs(self, *, status: str | None = None, limit: int | None = None, roots_only: bool = False) -> list[RunInfo]: ...
    def update_run_status(self, run_id: str, status: RunStatus | str) -> None: ...
    def save_step(self, run_id: str, record: StepRecord) -> None: ...
    def load_steps(self, run_id: str) -> list[StepRecord]: ...

    def resolve(self, run_id: str) -> str: ...
    def begin_run(self, new: NewRun) -> str: ...
    def acquire(self, run_id: str, owner: str, budget: dict[str, Any] | None = None) -> None: ...
    def commit_step(self, run_id: str, row: _sql.StepRow) -> None: ...
    def finish_run(self, run_id: str, status: RunStatus, stop_reason: str | None, wall_s: float) -> None: ...
    def resume_point(self, run_id: str) -> ResumePoint: ...
    def load_state(self, run_id: str, step_n: int) -> Any: ...
    def find_child(self, parent_run_id: str, parent_step: int, call_index: int) -> RunInfo | None: ...
    def children(self, run_id: str) -> list[RunInfo]: ...
    def set_meta(self, run_id: str, meta: dict[str, Any]) -> None: ...
    def add_cost(self, run_id: str, usd: float) -> None: ...


# ---------------------------------------------------------------------------------
# SQLite


def _script(conn: sqlite3.Connection, script: str) -> None:
    """Run a multi-statement script inside the current transaction (``executescript`` would commit)."""
    for stmt in script.split(";"):
        if stmt.strip():
            conn.execute(stmt)


def _migrate_0(conn: sqlite3.Connection) -> None:
    """Create the schema, or bring a loomc 0.3.0 database up to it."""
    cols = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
    if not cols:
        _script(conn, _sql.MIGRATIONS[0])
        return
    # A 0.3.0 database: add what it lacks, then fill the totals from its steps.
    run_cols = {
        "name": "TEXT NOT NULL DEFAULT ''", "kind": "TEXT NOT NULL DEFAULT 'loop'",
        "parent_run_id": "TEXT", "parent_step": "INTEGER", "call_index": "INTEGER",
        "root_run_id": "TEXT", "state_type": "TEXT", "input_blob": "BLOB", "budget": "TEXT",
        "cost_usd": "REAL NOT NULL DEFAULT 0", "steps": "INTEGER NOT NULL DEFAULT 0",
        "wall_s": "REAL NOT NULL DEFAULT 0", "max_step_cost": "REAL NOT NULL DEFAULT 0",
        "next_from": "INTEGER", "stop_reason": "TEXT", "owner": "TEXT", "heartbeat": "REAL",
        "attempts": "INTEGER NOT NULL DEFAULT 0", "meta": "TEXT",
    }
    for name, decl in run_cols.items():
        if name not in cols:
            conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {decl}")
    step_cols = {r[1] for r in conn.execute("PRAGMA table_info(steps)")}
    if not step_cols:
        _script(conn, _sql.MIGRATIONS[0])
    conn.execute("CREATE TABLE IF NOT EXISTS blobs (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
    for name, decl in {"event": "TEXT", "next_from": "INTEGER", "duration_s": "REAL", "blob_id": "INTEGER"}.items():
        if name not in step_cols:
            conn.execute(f"ALTER TABLE steps ADD COLUMN {name} {decl}")
    if "breaker_event" in step_cols:
        conn.execute("UPDATE steps SET event = breaker_event WHERE event IS NULL")
    conn.execute(
        "UPDATE runs SET cost_usd = (SELECT COALESCE(SUM(cost_usd), 0) FROM steps WHERE run_id = runs.id), "
        "steps = (SELECT COUNT(*) FROM steps WHERE run_id = runs.id), "
        "max_step_cost = (SELECT COALESCE(MAX(cost_usd), 0) FROM steps WHERE run_id = runs.id), "
        "next_from = (SELECT MAX(step_n) FROM steps WHERE run_id = runs.id), state_type = 'json'"
    )
    _script(
        conn,
        "CREATE INDEX IF NOT EXISTS runs_roots ON runs(created_at) WHERE parent_run_id IS NULL;"
        "CREATE INDEX IF NOT EXISTS runs_created ON runs(created_at);"
        "CREATE INDEX IF NOT EXISTS runs_children ON runs(parent_run_id, parent_step, call_index);"
    )


def _sweep(execute: Any, run_id: str) -> HeldCharge | None:
    """The body of ``charge_holds`` (inside the caller's transaction), shared with the async store."""
    rows = execute(_sql.SELECT_TREE_HOLDS, (run_id,)).fetchall()
    if not rows:
        return None
    charge = HeldCharge(round(sum(usd for _, usd in rows), 12), len(rows), _sql.now_iso())
    meta_row = execute(_sql.SELECT_META, (run_id,)).fetchone()
    meta = json.loads(meta_row[0]) if meta_row and meta_row[0] else {}
    for hold_id, _ in rows:
        execute(_sql.DELETE_HOLD, (hold_id,))
    execute(_sql.CHARGE_HELD, (charge.usd, json.dumps(charge_record(meta, charge)), charge.at, run_id))
    execute(_sql.ROLL_UP_HELD, (run_id, charge.usd))
    return charge


def _history_record(row: tuple[Any, ...], loader: Any) -> StepRecord:
    # Called once per step of a resumed run (10,000 times for a long one): kept lean.
    # The row is (step_n, cost_usd, score, timestamp text, error, event).
    rec = _new_record(StepRecord)
    rec.step_n, rec.cost_usd, rec.score, rec._ts, rec.error, rec.event = row
    rec._state, rec._loader = _MISSING_STATE, loader
    return rec


_new_record = StepRecord.__new__
_MISSING_STATE = _MISSING


class SQLiteStore:
    """The embedded default store: one SQLite file in WAL mode, one transaction per step.

    Args:
        path: the database file (default ``$LOOMC_DB`` or ``.loomc/checkpoints.db``).
            Created, with its directory, at first use unless ``create=False``.
        durability: ``"power"`` (``synchronous=FULL``: a committed step survives a power
            cut) or ``"process"`` (``synchronous=NORMAL``: survives any process crash).
        create: when ``False``, a missing database is a :class:`StoreError` (readers).
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
    ) -> None:
        if durability not in _sql.SYNCHRONOUS:
            raise ValueError(f"durability={durability!r}: use 'power' or 'process'")
        chosen = path if path is not None else db_path
        self.path = Path(chosen) if chosen is not None else default_db_path()
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
                conn.execute("ROLLBACK")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _prepare(self, conn: sqlite3.Connection) -> None:
        path = self.path
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > _sql.SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"{path} was written by a newer loomc (schema v{version}; this loomc reads up to "
                    f"v{_sql.SCHEMA_VERSION}); upgrade loomc to use it — the file was not changed"
                )
            if version == 0:
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if tables and "runs" not in tables:
                    raise StoreError(
                        f"{path} is a SQLite database but not a loomc one (tables: "
                        f"{', '.join(sorted(tables)[:5])}); point LOOMC_DB / --db at another file"
                    )
            # Readers do not migrate; an empty/old file is shown as it is.
            if (
                version < _sql.SCHEMA_VERSION and not self.create and version == 0
                and not conn.execute("SELECT 1 FROM sqlite_master WHERE name='runs'").fetchone()
            ):
                raise StoreError(f"{path} holds no loomc runs yet; run a loop first")
            for pragma in _sql.PRAGMAS:
                conn.execute(pragma)
            conn.execute(f"PRAGMA synchronous={_sql.SYNCHRONOUS[self.durability]}")
            if version < _sql.SCHEMA_VERSION and self.create:
                conn.create_function("loomc_events_v4", 1, _step_events.migrate, deterministic=True)
                conn.execute("BEGIN IMMEDIATE")
                try:
                    version = conn.execute("PRAGMA user_version").fetchone()[0]
                    while version < _sql.SCHEMA_VERSION:
                        if version == 0:
                            _migrate_0(conn)
                        else:
                            _script(conn, _sql.MIGRATIONS[version])
                        version += 1
                        conn.execute(f"PRAGMA user_version={version}")
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
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
                conn.execute("ROLLBACK")
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
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

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self.conn
            self.check_file_soon()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._wrap(exc) from exc
            try:
                yield conn
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._wrap(exc) from exc
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise self._wrap(exc) from exc

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

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            try:
                return self.conn.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"cannot read {self.path}: {exc}") from exc

    # -- runs ---------------------------------------------------------------------
    def create_run(self, spec_hash: str, **kwargs: Any) -> str:
        """Create a run (status ``running``, no owner) and return its id."""
        return self.begin_run(NewRun(spec_hash=spec_hash, **kwargs))

    def begin_run(self, new: NewRun) -> str:
        """Create a run from ``new``, owned by ``new.owner``; returns its id."""
        run_id = new.run_id or new_run_id()
        with self._tx() as conn:
            _sql.insert_run(conn.execute, new, run_id, time.time(), str(self.path))
        return run_id

    def get_run(self, run_id: str) -> RunInfo | None:
        """The run with exactly this id, or ``None``."""
        rows = self._read(_sql.SELECT_RUN, (run_id,))
        return _sql.run_info(rows[0]) if rows else None

    def resolve(self, run_id: str) -> str:
        """The full id of the run whose id is or starts with ``run_id``.

        Raises:
            RunNotFound: listing the nearest ids.
            AmbiguousRunId: when several runs share the prefix.
        """
        if not run_id:
            raise RunNotFound(run_id, where=str(self.path))
        found = _sql.match_prefix(run_id, [r[0] for r in self._read(_sql.SELECT_PREFIX, _sql.prefix_args(run_id))])
        if found is not None:
            return found
        raise RunNotFound(run_id, _nearest(run_id, [r[0] for r in self._read(_sql.SELECT_ALL_IDS)]), str(self.path))

    def list_runs(self, *, status: str | None = None, limit: int | None = None, roots_only: bool = False) -> list[RunInfo]:
        """Runs newest first (all of them by default, as in loomc 0.3.0)."""
        st = status.value if isinstance(status, RunStatus) else status
        sql, args = _sql.list_runs_sql(status=st, roots_only=roots_only, limit=limit)
        return _sql.filter_listed([_sql.run_info(r) for r in self._read(sql, args)], st, limit)

    def update_run_status(self, run_id: str, status: RunStatus | str) -> None:
        """Set a run's status."""
        with self._tx() as conn:
            conn.execute(_sql.UPDATE_STATUS, (RunStatus(status).value, _sql.now_iso(), run_id))

    def acquire(self, run_id: str, owner: str, budget: dict[str, Any] | None = None) -> None:
        """Take the run's lease for ``owner`` (raises :class:`RunLocked` if a live process holds it)."""
        with self._tx() as conn:
            row = conn.execute(_sql.SELECT_LEASE, (run_id,)).fetchone()
            _sql.check_lease(run_id, row, owner, str(self.path))
            conn.execute(_sql.ACQUIRE, _sql.acquire_args(run_id, owner, budget, time.time()))

    def renew_leases(self, owner: str, run_ids: list[str]) -> None:
        """Refresh the heartbeat of the runs in ``run_ids`` that ``owner`` still holds (the heartbeat thread)."""
        beat = time.time()
        with self._tx() as conn:
            conn.executemany(_sql.RENEW_LEASE, [(beat, run_id, owner) for run_id in run_ids])

    def commit_step(self, run_id: str, row: _sql.StepRow) -> None:
        """Write one step and the run's totals in one transaction."""
        # What ``_tx`` does, spelled out: this runs once per step, and is the hot path.
        with self._lock:
            cur = self._cur
            if cur is None:
                cur = self._cur = self.conn.cursor()  # Connection.execute makes a cursor per call
            conn = self.conn
            self.check_file_soon()
            try:
                cur.execute("BEGIN IMMEDIATE")
                row.write(cur.execute, run_id, time.time())
                cur.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._wrap(exc) from exc
                raise

    def finish_run(self, run_id: str, status: RunStatus, stop_reason: str | None, wall_s: float) -> None:
        """Record how an attempt ended."""
        with self._tx() as conn:
            conn.execute(_sql.FINISH, _sql.finish_args(run_id, status, stop_reason, wall_s, time.time()))

    def set_meta(self, run_id: str, meta: dict[str, Any]) -> None:
        """Replace the run's free-form metadata (JSON)."""
        with self._tx() as conn:
            conn.execute(_sql.UPDATE_META, (json.dumps(meta), run_id))

    def add_cost(self, run_id: str, usd: float) -> None:
        """Add to a run's total cost outside a step (e.g. a graph run's node costs)."""
        with self._tx() as conn:
            conn.execute(_sql.ADD_COST, (usd, _sql.now_iso(), run_id))

    # -- holds (``loomc._core.holds``) ---------------------------------------------------
    def put_hold(self, run_id: str, hold_id: int, usd: float) -> None:
        """Commit a reservation of ``run_id`` before the call it pays for is sent."""
        with self._tx() as conn:
            conn.execute(_sql.INSERT_HOLD, (hold_id, run_id, usd, _sql.now_iso()))

    def drop_holds(self, hold_ids: tuple[int, ...]) -> None:
        """Delete holds whose spending is recorded by now (outside a step's commit)."""
        with self._tx() as conn:
            for hold_id in hold_ids:
                conn.execute(_sql.DELETE_HOLD, (hold_id,))

    def charge_holds(self, run_id: str) -> HeldCharge | None:
        """Charge every hold left by ``run_id`` and the runs below it to ``run_id``, in full.

        The holds are deleted, the run's cost raised and the charge noted in its
        ``meta["held_charges"]``, in one transaction. Returns ``None`` when there were none.
        """
        with self._tx() as conn:
            return _sweep(conn.execute, run_id)

    # -- steps --------------------------------------------------------------------
    def save_step(self, run_id: str, record: StepRecord) -> None:
        """Write a step record and fold it into the run's totals (loomc 0.3.0 API)."""
        info = self.get_run(run_id)
        if info is None:
            raise RunNotFound(run_id, where=str(self.path))
        self.commit_step(run_id, _sql.legacy_step_row(info, record, encode(record.state)))

    def load_steps(self, run_id: str) -> list[StepRecord]:
        """Every step of the run, states included, in order."""
        type_rows = self._read(_sql.SELECT_STATE_TYPE, (run_id,))
        ref = type_rows[0][0] if type_rows else "json"
        rows = self._read(_sql.SELECT_STEPS_FULL, (run_id,))
        return [_sql.step_record(r, ref) for r in expand_rows(rows, run_id, str(self.path))]

    def stored_state(self, run_id: str, step_n: int) -> str | bytes | None:
        """A step's state as stored, a delta made whole (``None``: no such step).

        Raises:
            StoreError: the step's row is there but its state is not (a damaged file).
        """
        rows = self._read(_sql.SELECT_STATE, (run_id, step_n))
        if not rows:
            return None
        blob = rows[0][0]
        if blob is None:
            raise _sql.missing_state(run_id, step_n, str(self.path), row=True)
        base = delta_base(blob)
        if base is not None:
            key = self._read(_sql.SELECT_STATE, (run_id, base))
            blob = expand(blob, key[0][0] if key else None)
        return blob  # type: ignore[no-any-return]

    def load_state(self, run_id: str, step_n: int) -> Any:
        """The state a step committed (``step_n == -1``: the run's input)."""
        if step_n < 0:
            rows = self._read(_sql.SELECT_RESUME, (run_id,))
            return decode(rows[0][1], rows[0][0]) if rows else None
        ref_rows = self._read(_sql.SELECT_STATE_TYPE, (run_id,))
        blob = self.stored_state(run_id, step_n)
        if blob is None:
            raise _sql.missing_state(run_id, step_n, str(self.path), row=False)
        return decode(blob, ref_rows[0][0] if ref_rows else "json")

    def resume_point(self, run_id: str) -> ResumePoint:
        """The run's info, its last step and the state to start from (earlier steps: ``step_history``)."""
        info = self.get_run(run_id)
        if info is None:
            raise RunNotFound(run_id, where=str(self.path))
        state_type, input_blob, next_from = self._read(_sql.SELECT_RESUME, (run_id,))[0]
        loader = StateLoader(self, run_id)
        history = [_history_record(r, loader) for r in self._read(_sql.SELECT_LAST_STEP_META, (run_id,))]
        _sql.check_last_step(run_id, info.steps, history[-1].step_n if history else None, str(self.path))
        next_from = _sql.start_point(next_from, history[-1].step_n if history else None)
        if next_from < 0:
            blob = input_blob
        else:
            blob = self.stored_state(run_id, next_from)
            if blob is None:  # never fall back to the input: the run's spending says otherwise
                raise _sql.missing_state(run_id, next_from, str(self.path), row=False)
        in_flight = self._read(_sql.IN_FLIGHT, (run_id, history[-1].step_n + 1 if history else 0))[0][0]
        return ResumePoint(
            info, state_type, blob, next_from, history, partial=bool(history) and history[0].step_n > 0,
            in_flight_usd=float(in_flight),
        )

    def step_history(self, run_id: str, before: int) -> list[StepRecord]:
        """The run's steps numbered below ``before``, in order (states loaded lazily)."""
        loader = StateLoader(self, run_id)
        return [_history_record(r, loader) for r in self._read(_sql.SELECT_STEP_META_BEFORE, (run_id, before))]

    def find_child(self, parent_run_id: str, parent_step: int, call_index: int) -> RunInfo | None:
        """The child run a parent step started as its ``call_index``-th nested loop."""
        rows = self._read(_sql.SELECT_CHILD, (parent_run_id, parent_step, call_index))
        return _sql.run_info(rows[0]) if rows else None

    def children(self, run_id: str) -> list[RunInfo]:
        """Direct child runs, in the order their parent started them."""
        return [_sql.run_info(r) for r in self._read(_sql.SELECT_CHILDREN, (run_id,))]


#: How often (seconds) a writing store checks that its database file is still there.
FILE_CHECK_S = 0.1


def _file_ident(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``, or ``None`` when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def expand_rows(rows: list[Any], run_id: str = "", where: str = "the database") -> list[Any]:
    """All of a run's step rows ``(step_n, stored state, ...)``, in order, deltas made whole.

    Raises:
        StoreError: a step's state is missing (a damaged file).
    """
    keys: dict[int, Any] = {}
    out = []
    for r in rows:
        blob = r[1]
        if blob is None:
            raise _sql.missing_state(run_id or "?", r[0], where, row=True)
        base = delta_base(blob)
        if base is not None:
            r = (r[0], expand(blob, keys.get(base)), *r[2:])
        elif isinstance(blob, (bytes, bytearray)):
            keys[r[0]] = blob
        out.append(r)
    return out


class StateLoader:
    """Loads a run's committed states on demand (shared by its lazy history records)."""

    __slots__ = ("run_id", "store")

    def __init__(self, store: Any, run_id: str) -> None:
        self.store, self.run_id = store, run_id

    def __call__(self, step_n: int) -> Any:
        return self.store.load_state(self.run_id, step_n)


def _nearest(run_id: str, ids: list[str]) -> list[str]:
    import difflib

    close = difflib.get_close_matches(run_id, ids, n=3, cutoff=0.3)
    if close:
        return close
    ids = sorted(ids)
    i = bisect.bisect_left(ids, run_id)
    return ids[max(0, i - 1) : i + 2]


# ---------------------------------------------------------------------------------
# Memory


_MEMORY_WHERE = "this memory store"
_MEMORY_HINT = (
    "runs in a memory store live only in the process (and the loop or store object) that ran them; "
    'use checkpoint="sqlite" or a file path to resume a run later or from another process'
)


class MemoryStore:
    """A store that keeps runs in memory (``checkpoint="memory"``): nothing survives the process."""

    supports_deltas = True

    def __init__(self) -> None:
        self._runs: dict[str, dict[str, Any]] = {}
        self._steps: dict[str, dict[int, _sql.StepRow]] = {}
        self._holds: dict[int, tuple[str, float]] = {}  # hold id -> (run id, usd)
        self._lock = threading.RLock()
        self.path = None
        self.db_path = ":memory:"
        self.durability = "process"

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._runs)} runs)"

    def _info(self, r: dict[str, Any]) -> RunInfo:
        status = RunStatus(r["status"])
        return RunInfo(
            id=r["id"], spec_hash=r["spec_hash"], status=status, created_at=r["created_at"],
            updated_at=r["updated_at"], name=r["name"], kind=r["kind"], parent_run_id=r["parent_run_id"],
            cost_usd=r["cost_usd"], steps=r["steps"], parent_step=r["parent_step"], call_index=r["call_index"],
            wall_s=r["wall_s"], max_step_cost=r["max_step_cost"], budget=dict(r["budget"] or {}),
            stop_reason=r["stop_reason"], owner=r["owner"], meta=dict(r["meta"] or {}),
        )

    def create_run(self, spec_hash: str, **kwargs: Any) -> str:
        """Create a run and return its id."""
        return self.begin_run(NewRun(spec_hash=spec_hash, **kwargs))

    def begin_run(self, new: NewRun) -> str:
        """Create a run from ``new``."""
        run_id = new.run_id or new_run_id()
        now = _sql.now_iso()
        with self._lock:
            if run_id in self._runs:
                raise LoomcError(
                    f"run id {run_id!r} already exists in this memory store; resume it or choose another id"
                )
            self._runs[run_id] = {
                "id": run_id, "spec_hash": new.spec_hash, "status": RunStatus.RUNNING.value,
                "created_at": now, "updated_at": now, "name": new.name, "kind": new.kind,
                "parent_run_id": new.parent_run_id, "parent_step": new.parent_step,
                "call_index": new.call_index, "state_type": new.state_type, "input_blob": new.input_blob,
                "budget": new.budget, "cost_usd": new.cost_usd, "steps": 0, "wall_s": 0.0, "max_step_cost": 0.0,
                "next_from": None, "stop_reason": None, "owner": new.owner, "meta": new.meta,
            }
            self._steps[run_id] = {}
        return run_id

    def get_run(self, run_id: str) -> RunInfo | None:
        """The run with exactly this id, or ``None``."""
        with self._lock:
            r = self._runs.get(run_id)
            return self._info(r) if r else None

    def resolve(self, run_id: str) -> str:
        """The full id for an id or unique prefix."""
        with self._lock:
            ids = sorted(self._runs)
        if run_id in ids:
            return run_id
        matches = [i for i in ids if i.startswith(run_id)] if run_id else []
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise AmbiguousRunId(run_id, matches)
        raise RunNotFound(run_id, _nearest(run_id, ids), _MEMORY_WHERE, hint=_MEMORY_HINT)

    def list_runs(self, *, status: str | None = None, limit: int | None = None, roots_only: bool = False) -> list[RunInfo]:
        """Runs newest first."""
        with self._lock:
            runs = [self._info(r) for r in self._runs.values()]
        runs.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        st = status.value if isinstance(status, RunStatus) else status
        runs = [r for r in runs if (not roots_only or r.parent_run_id is None) and (st is None or r.status.value == st)]
        return runs[:limit] if limit is not None else runs

    def update_run_status(self, run_id: str, status: RunStatus | str) -> None:
        """Set a run's status."""
        with self._lock:
            self._runs[run_id]["status"] = RunStatus(status).value

    def acquire(self, run_id: str, owner: str, budget: dict[str, Any] | None = None) -> None:
        """Take the run's lease."""
        with self._lock:
            r = self._runs.get(run_id)
            if r is None:
                raise RunNotFound(run_id, where=_MEMORY_WHERE, hint=_MEMORY_HINT)
            r.update(status=RunStatus.RUNNING.value, owner=owner, stop_reason=None)
            if budget is not None:
                r["budget"] = budget

    def commit_step(self, run_id: str, row: _sql.StepRow) -> None:
        """Record one step and the run's totals (the cost increase rolled up to its ancestors)."""
        with self._lock:
            if row.ancestors:
                rise = row.total_cost - self._runs[run_id]["cost_usd"]
                for up in row.ancestors:
                    if up in self._runs:
                        self._runs[up]["cost_usd"] = round(self._runs[up]["cost_usd"] + rise, 12)
            self._steps[run_id][row.step_n] = row
            if row.holds:
                for hold_id in row.holds:
                    self._holds.pop(hold_id, None)
            self._runs[run_id].update(
                cost_usd=row.total_cost, steps=row.total_steps, wall_s=row.total_wall_s,
                max_step_cost=row.max_step_cost, next_from=row.next_from, status=row.status,
                stop_reason=row.stop_reason, updated_at=row.timestamp,
            )

    def finish_run(self, run_id: str, status: RunStatus, stop_reason: str | None, wall_s: float) -> None:
        """Record how an attempt ended."""
        with self._lock:
            r = self._runs[run_id]
            r.update(status=status.value, stop_reason=stop_reason, wall_s=max(r["wall_s"], wall_s), updated_at=_sql.now_iso())

    def set_meta(self, run_id: str, meta: dict[str, Any]) -> None:
        """Replace the run's metadata."""
        with self._lock:
            self._runs[run_id]["meta"] = dict(meta)

    def add_cost(self, run_id: str, usd: float) -> None:
        """Add to a run's total cost outside a step."""
        with self._lock:
            self._runs[run_id]["cost_usd"] += usd

    def put_hold(self, run_id: str, hold_id: int, usd: float) -> None:
        """Keep a reservation of ``run_id`` until the step that made it commits."""
        with self._lock:
            self._holds[hold_id] = (run_id, usd)

    def drop_holds(self, hold_ids: tuple[int, ...]) -> None:
        """Delete holds whose spending is recorded by now."""
        with self._lock:
            for hold_id in hold_ids:
                self._holds.pop(hold_id, None)

    def charge_holds(self, run_id: str) -> HeldCharge | None:
        """Charge the holds left by ``run_id`` and the runs below it to ``run_id`` (see ``SQLiteStore``)."""
        with self._lock:
            tree, frontier = {run_id}, [run_id]
            while frontier:
                kids = [r["id"] for r in self._runs.values() if r["parent_run_id"] in frontier]
                frontier = [k for k in kids if k not in tree]
                tree.update(frontier)
            found = [(h, usd) for h, (rid, usd) in self._holds.items() if rid in tree]
            if not found:
                return None
            charge = HeldCharge(round(sum(usd for _, usd in found), 12), len(found), _sql.now_iso())
            for hold_id, _ in found:
                del self._holds[hold_id]
            run = self._runs[run_id]
            run["meta"] = charge_record(run["meta"], charge)
            run["updated_at"] = charge.at
            up: dict[str, Any] | None = run
            while up is not None:  # the run and every run above it
                up["cost_usd"] = round(up["cost_usd"] + charge.usd, 12)
                up = self._runs.get(up["parent_run_id"]) if up["parent_run_id"] else None
            return charge

    def save_step(self, run_id: str, record: StepRecord) -> None:
        """Write a step record (loomc 0.3.0 API)."""
        with self._lock:
            r = self._runs[run_id]
            row = _sql.StepRow(
                record.step_n, encode(record.state), record.cost_usd, record.score, record.timestamp.isoformat(),
                record.error, record.event, record.step_n, 0.0, r["cost_usd"] + record.cost_usd,
                max(r["steps"], record.step_n + 1), r["wall_s"], max(r["max_step_cost"], record.cost_usd),
                r["status"], r["stop_reason"],
            )
            self.commit_step(run_id, row)

    def load_steps(self, run_id: str) -> list[StepRecord]:
        """Every step of the run, states included."""

        with self._lock:
            ref = self._runs[run_id]["state_type"] if run_id in self._runs else "json"
            rows = sorted(self._steps.get(run_id, {}).values(), key=lambda s: s.step_n)
        whole = expand_rows([(r.step_n, r.state_blob) for r in rows], run_id, "the memory store")
        return [
            StepRecord(
                r.step_n, decode(w[1], ref), r.cost_usd, r.score,
                datetime.fromisoformat(r.timestamp), r.error, r.event,
            )
            for r, w in zip(rows, whole, strict=True)
        ]

    def load_state(self, run_id: str, step_n: int) -> Any:
        """The state a step committed (``-1``: the input)."""
        with self._lock:
            r = self._runs.get(run_id)
            if r is None:
                raise RunNotFound(run_id, where=_MEMORY_WHERE, hint=_MEMORY_HINT)
            blob = r["input_blob"] if step_n < 0 else self._whole(run_id, step_n)
            return decode(blob, r["state_type"])

    def _whole(self, run_id: str, step_n: int) -> Any:
        """A committed step's stored state, a delta made whole."""
        steps = self._steps[run_id]
        row = steps.get(step_n)
        if row is None or row.state_blob is None:
            raise _sql.missing_state(run_id, step_n, "the memory store", row=row is not None)
        blob = row.state_blob
        base = delta_base(blob)
        if base is None or isinstance(blob, str):
            return blob
        key = steps.get(base)
        return expand(blob, key.state_blob if key is not None else None)

    def resume_point(self, run_id: str) -> ResumePoint:
        """The run's info, its history and the state to start from."""
        with self._lock:
            r = self._runs.get(run_id)
            if r is None:
                raise RunNotFound(run_id, where=_MEMORY_WHERE, hint=_MEMORY_HINT)
            rows = sorted(self._steps[run_id].values(), key=lambda s: s.step_n)
            _sql.check_last_step(run_id, r["steps"], rows[-1].step_n if rows else None, "the memory store")
            next_from = r["next_from"] if r["next_from"] is not None else (rows[-1].step_n if rows else -1)
            blob = r["input_blob"] if next_from < 0 else self._whole(run_id, next_from)
            info = self._info(r)
            state_type = r["state_type"]
            first_open = rows[-1].step_n + 1 if rows else 0
            in_flight = sum(
                k["cost_usd"] for k in self._runs.values()
                if k["parent_run_id"] == run_id and k["parent_step"] is not None and k["parent_step"] >= first_open
            )
        loader = StateLoader(self, run_id)
        history = [_history_record((s.step_n, s.cost_usd, s.score, s.timestamp, s.error, s.event), loader) for s in rows]
        return ResumePoint(info, state_type, blob, next_from, history, in_flight_usd=in_flight)

    def step_history(self, run_id: str, before: int) -> list[StepRecord]:
        """The run's steps numbered below ``before``, in order."""
        return [h for h in self.resume_point(run_id).history if h.step_n < before]

    def find_child(self, parent_run_id: str, parent_step: int, call_index: int) -> RunInfo | None:
        """The child run keyed by (parent, parent step, call order)."""
        with self._lock:
            for r in self._runs.values():
                if (r["parent_run_id"], r["parent_step"], r["call_index"]) == (parent_run_id, parent_step, call_index):
                    return self._info(r)
        return None

    def children(self, run_id: str) -> list[RunInfo]:
        """Direct child runs in call order."""
        with self._lock:
            kids = [self._info(r) for r in self._runs.values() if r["parent_run_id"] == run_id]
        return sorted(kids, key=lambda r: (r.parent_step or 0, r.call_index or 0, r.created_at))

    def close(self) -> None:
        """Nothing to close."""


# ---------------------------------------------------------------------------------

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


