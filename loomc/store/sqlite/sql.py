"""The SQLite schema and statements, shared by the sync and async stores.

Pure data and row conversion: no connection is opened here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from loomc._core.types import RunInfo, RunStatus
from loomc.store.lease import is_alive

__all__ = ["SCHEMA_VERSION", "StepRow"]

SCHEMA_VERSION = 4
#: The oldest schema this loomc reads without migrating it (readers never write).
READS_FROM = 1

#: Forward migrations: MIGRATIONS[v] takes a database at version v to v + 1.
MIGRATIONS: dict[int, str] = {
    0: """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    spec_hash TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL DEFAULT 'loop',
    parent_run_id TEXT,
    parent_step INTEGER,
    call_index INTEGER,
    root_run_id TEXT,
    state_type TEXT,
    budget TEXT,
    cost_usd REAL NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL DEFAULT 0,
    wall_s REAL NOT NULL DEFAULT 0,
    max_step_cost REAL NOT NULL DEFAULT 0,
    next_from INTEGER,
    stop_reason TEXT,
    owner TEXT,
    heartbeat REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    meta TEXT,
    input_blob BLOB
);
CREATE INDEX IF NOT EXISTS runs_roots ON runs(created_at) WHERE parent_run_id IS NULL;
CREATE INDEX IF NOT EXISTS runs_created ON runs(created_at);
CREATE INDEX IF NOT EXISTS runs_children ON runs(parent_run_id, parent_step, call_index);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL,
    step_n INTEGER NOT NULL,
    cost_usd REAL NOT NULL DEFAULT 0,
    score REAL,
    timestamp TEXT NOT NULL,
    error TEXT,
    event TEXT,
    next_from INTEGER,
    duration_s REAL,
    blob_id INTEGER,
    state_blob BLOB,
    PRIMARY KEY (run_id, step_n)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blobs (
    id INTEGER PRIMARY KEY,
    data BLOB NOT NULL
);
""",
    # v2 changes no table: large states may now be zstd keyframes (b"Z") and deltas (b"D"),
    # which a v1 reader could not decode, so the version keeps such readers out.
    1: "",
    # v3: reservations made durable before the call they pay for (see ``loomc._core.holds``).
    # A row lives from ``reserve`` until the step that made it commits; one still here
    # when a run is resumed was in flight when its process died, and is charged in full.
    2: """
CREATE TABLE IF NOT EXISTS holds (
    hold_id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    usd REAL NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS holds_run ON holds(run_id);
""",
    # v4: a step's events are a JSON list of records (``loomc._core.events``), no longer
    # "; "-joined text. ``loomc_events_v4`` is registered by the migrating connection.
    3: """
UPDATE steps SET event = loomc_events_v4(event) WHERE event IS NOT NULL
""",
}

PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA foreign_keys=OFF")
SYNCHRONOUS = {"power": "FULL", "process": "NORMAL"}
BUSY_TIMEOUT_S = 60.0

RUN_COLS = (
    "id, spec_hash, status, created_at, updated_at, name, kind, parent_run_id, parent_step, "
    "call_index, cost_usd, steps, wall_s, max_step_cost, budget, stop_reason, owner, heartbeat, meta"
)

INSERT_RUN = (
    "INSERT INTO runs (id, spec_hash, status, created_at, updated_at, name, kind, parent_run_id, "
    "parent_step, call_index, root_run_id, state_type, input_blob, budget, owner, heartbeat, meta, "
    "attempts, cost_usd) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
SELECT_RUN = f"SELECT {RUN_COLS} FROM runs WHERE id = ?"
SELECT_RESUME = "SELECT state_type, input_blob, next_from FROM runs WHERE id = ?"
SELECT_PREFIX = "SELECT id FROM runs WHERE id >= ? AND id < ? ORDER BY id LIMIT 20"
SELECT_ALL_IDS = "SELECT id FROM runs"
SELECT_CHILD = f"SELECT {RUN_COLS} FROM runs WHERE parent_run_id = ? AND parent_step = ? AND call_index = ?"
SELECT_CHILDREN = f"SELECT {RUN_COLS} FROM runs WHERE parent_run_id = ? ORDER BY parent_step, call_index, created_at"
UPDATE_STATUS = "UPDATE runs SET status = ?, updated_at = ? WHERE id = ?"
ACQUIRE = (
    "UPDATE runs SET status = 'running', owner = ?, heartbeat = ?, updated_at = ?, "
    "attempts = attempts + 1, stop_reason = NULL, budget = COALESCE(?, budget) WHERE id = ?"
)
SELECT_LEASE = "SELECT status, owner, heartbeat FROM runs WHERE id = ?"
RENEW_LEASE = "UPDATE runs SET heartbeat = ? WHERE id = ? AND owner = ? AND status = 'running'"
INSERT_STEP = (
    "INSERT OR REPLACE INTO steps (run_id, step_n, state_blob, cost_usd, score, timestamp, error, "
    "event, next_from, duration_s, blob_id) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
)
INSERT_BLOB = "INSERT INTO blobs (data) VALUES (?)"
#: A step's stored state, wherever it lives: inline JSON, or a compressed blob in ``blobs``.
STATE_OF = "COALESCE(s.state_blob, (SELECT data FROM blobs WHERE id = s.blob_id))"
UPDATE_TOTALS = (
    "UPDATE runs SET cost_usd = ?, steps = ?, wall_s = ?, max_step_cost = ?, next_from = ?, "
    "status = ?, stop_reason = ?, updated_at = ?, heartbeat = ? WHERE id = ?"
)
FINISH = (
    "UPDATE runs SET status = ?, stop_reason = ?, wall_s = MAX(wall_s, ?), updated_at = ?, "
    "heartbeat = ? WHERE id = ?"
)
UPDATE_META = "UPDATE runs SET meta = ? WHERE id = ?"
ADD_COST = "UPDATE runs SET cost_usd = cost_usd + ?, updated_at = ? WHERE id = ?"
#: What children started by a step not yet committed have spent (``runs_children`` index).
IN_FLIGHT = "SELECT COALESCE(SUM(cost_usd), 0) FROM runs WHERE parent_run_id = ? AND parent_step >= ?"
_roll_up: dict[int, str] = {}


def roll_up_sql(depth: int) -> str:
    """``UPDATE`` adding a run's cost increase to its ``depth`` ancestors' totals.

    Parameters: the run's new total, its id, ``updated_at``, then the ancestors' ids. It
    runs before the run's own ``UPDATE_TOTALS``, so the subquery reads the total before
    this step: the increase not yet rolled up (its children's commits rolled up theirs).
    """
    sql = _roll_up.get(depth)
    if sql is None:
        sql = _roll_up[depth] = (
            "UPDATE runs SET cost_usd = ROUND(cost_usd + ? - (SELECT cost_usd FROM runs WHERE id = ?), 12), "
            f"updated_at = ? WHERE id IN ({', '.join('?' * depth)})"
        )
    return sql
SELECT_STEP_META = (
    "SELECT step_n, cost_usd, score, timestamp, error, event FROM steps WHERE run_id = ? ORDER BY step_n"
)
SELECT_LAST_STEP_META = (
    "SELECT step_n, cost_usd, score, timestamp, error, event FROM steps WHERE run_id = ? ORDER BY step_n DESC LIMIT 1"
)
SELECT_STEP_META_BEFORE = (
    "SELECT step_n, cost_usd, score, timestamp, error, event FROM steps WHERE run_id = ? AND step_n < ? ORDER BY step_n"
)
#: Step metadata for the CLI, windowed so a long run is never read whole: ``{error}`` is
#: the error column, or ``substr(error, 1, N)`` to read only as much as a table shows.
STEP_META_WINDOW = "SELECT step_n, cost_usd, score, timestamp, {error}, event FROM steps WHERE run_id = ? "
STEP_META_AFTER = STEP_META_WINDOW + "AND step_n > ? ORDER BY step_n LIMIT ?"
STEP_META_LAST = STEP_META_WINDOW + "ORDER BY step_n DESC LIMIT ?"
STEP_TOTALS_BEFORE = "SELECT COUNT(*), COALESCE(SUM(cost_usd), 0) FROM steps WHERE run_id = ? AND step_n < ?"
SELECT_STEPS_FULL = (
    f"SELECT s.step_n, {STATE_OF}, s.cost_usd, s.score, s.timestamp, s.error, s.event FROM steps s "
    "WHERE s.run_id = ? ORDER BY s.step_n"
)
SELECT_STATE = f"SELECT {STATE_OF} FROM steps s WHERE s.run_id = ? AND s.step_n = ?"
SELECT_STATE_TYPE = "SELECT state_type FROM runs WHERE id = ?"
INSERT_HOLD = "INSERT INTO holds (hold_id, run_id, usd, created_at) VALUES (?,?,?,?)"
DELETE_HOLD = "DELETE FROM holds WHERE hold_id = ?"
#: The holds of a run and of every run below it (a run tree is swept as one).
SELECT_TREE_HOLDS = (
    "WITH RECURSIVE tree(id) AS (SELECT ? UNION SELECT r.id FROM runs r JOIN tree t ON r.parent_run_id = t.id) "
    "SELECT hold_id, usd FROM holds WHERE run_id IN (SELECT id FROM tree)"
)
SELECT_META = "SELECT meta FROM runs WHERE id = ?"
CHARGE_HELD = "UPDATE runs SET cost_usd = cost_usd + ?, meta = ?, updated_at = ? WHERE id = ?"
#: Add to the stored totals of every run above one (they hold their descendants' spending).
ROLL_UP_HELD = (
    "WITH RECURSIVE up(id) AS (SELECT parent_run_id FROM runs WHERE id = ? "
    "UNION SELECT r.parent_run_id FROM runs r JOIN up ON r.id = up.id) "
    "UPDATE runs SET cost_usd = cost_usd + ? WHERE id IN (SELECT id FROM up)"
)


def list_runs_sql(*, status: str | None, roots_only: bool, limit: int | None) -> tuple[str, tuple[Any, ...]]:
    """The query behind ``list_runs``: newest first, optionally roots only."""
    where: list[str] = []
    args: list[Any] = []
    if roots_only:
        # "+" keeps SQLite from picking runs_children (an equality match on NULL) and
        # sorting every root run; walking runs_created newest first stops at LIMIT.
        where.append("+parent_run_id IS NULL")
    if status is not None and status != RunStatus.CRASHED.value:
        where.append("status = ?")
        args.append(status)
    elif status == RunStatus.CRASHED.value:
        where.append("status = 'running'")
    sql = f"SELECT {RUN_COLS} FROM runs"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY created_at DESC, id DESC"
    if limit is not None and status != RunStatus.CRASHED.value:
        sql += " LIMIT ?"
        args.append(int(limit))
    return sql, tuple(args)


_last_us = [0]
_second_text: dict[int, str] = {}


def now_iso() -> str:
    """The current UTC time as stored in the database, strictly increasing within a process.

    Runs are listed newest first by ``created_at``; two runs created in the same
    microsecond must still sort in creation order. (Called on every step: the text of the
    current second is formatted once.)
    """
    us = time.time_ns() // 1000
    if us <= _last_us[0]:
        us = _last_us[0] + 1
    _last_us[0] = us
    sec, frac = divmod(us, 1_000_000)
    head = _second_text.get(sec)
    if head is None:
        _second_text.clear()
        head = _second_text[sec] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{head}.{frac:06d}+00:00"


def run_info(row: tuple[Any, ...] | Any) -> RunInfo:
    """Build a :class:`RunInfo` from a row of ``RUN_COLS``; a dead owner reads as crashed."""
    status = RunStatus(row[2])
    if status is RunStatus.RUNNING and row[16] and not is_alive(row[16], row[17]):
        status = RunStatus.CRASHED
    return RunInfo(
        id=row[0],
        spec_hash=row[1],
        status=status,
        created_at=row[3],
        updated_at=row[4],
        name=row[5],
        kind=row[6],
        parent_run_id=row[7],
        parent_step=row[8],
        call_index=row[9],
        cost_usd=row[10],
        steps=row[11],
        wall_s=row[12],
        max_step_cost=row[13],
        budget=json.loads(row[14]) if row[14] else {},
        stop_reason=row[15],
        owner=row[16],
        meta=json.loads(row[18]) if row[18] else {},
    )


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~1.3 us per step more
class StepRow:
    """One step as committed: the step row and the run totals after it (treat as read-only)."""

    step_n: int
    state_blob: str | bytes | None
    cost_usd: float
    score: float | None
    timestamp: str
    error: str | None
    event: str | None
    next_from: int
    duration_s: float
    # run totals after this step
    total_cost: float
    total_steps: int
    total_wall_s: float
    max_step_cost: float
    status: str
    stop_reason: str | None
    #: The runs above this one (parent first): the step's cost is added to their totals as
    #: it commits, so a parent's stored total never lags what its descendants committed.
    ancestors: tuple[str, ...] = ()
    #: ids of the durable holds this step's cost now accounts for (removed with the step)
    holds: tuple[int, ...] | None = None

    def step_args(self, run_id: str, blob_id: int | None = None) -> tuple[Any, ...]:
        """Parameters of ``INSERT_STEP`` (with ``blob_id``, the state lives in ``blobs``)."""
        error, event = self.error, self.event
        return (
            run_id, self.step_n, None if blob_id is not None else self.state_blob, self.cost_usd, self.score,
            self.timestamp, error if error is None else storable(error), event if event is None else storable(event),
            self.next_from, self.duration_s, blob_id,
        )

    def write(self, execute: Any, run_id: str, heartbeat: float) -> None:
        """Write the step and the run's totals with ``execute`` (inside the caller's transaction).

        A compressed state goes to ``blobs`` and the step row points at it, so ``steps``
        rows stay small: the history of a long run is read without touching its states.
        A nested run's cost increase is rolled up into its ancestors' totals here too.
        """
        blob_id = None
        if isinstance(self.state_blob, (bytes, bytearray)):
            blob_id = execute(INSERT_BLOB, (self.state_blob,)).lastrowid
        execute(INSERT_STEP, self.step_args(run_id, blob_id))
        if self.ancestors:
            execute(roll_up_sql(len(self.ancestors)), (self.total_cost, run_id, self.timestamp, *self.ancestors))
        execute(UPDATE_TOTALS, self.totals_args(run_id, heartbeat))
        if self.holds:  # only steps that reserved: the step's cost now counts what they held
            for hold_id in self.holds:
                execute(DELETE_HOLD, (hold_id,))

    def totals_args(self, run_id: str, heartbeat: float) -> tuple[Any, ...]:
        """Parameters of ``UPDATE_TOTALS``."""
        reason = self.stop_reason
        return (
            self.total_cost, self.total_steps, self.total_wall_s, self.max_step_cost, self.next_from,
            self.status, reason if reason is None else storable(reason), self.timestamp, heartbeat, run_id,
        )


# -- pure parts of the store methods, shared by the sync and async SQLite stores ----------


def storable(text: str) -> str:
    """``text`` as SQLite can store it: a lone surrogate (``"\\udcff"``) becomes its escape.

    Python strings may hold lone surrogates (an exception message built from undecodable
    bytes, a file name); UTF-8 cannot. Every text column loomc writes goes through here.
    """
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _opt_text(text: str | None) -> str | None:
    return None if text is None else storable(text)


def insert_run(execute: Any, new: Any, run_id: str, heartbeat: float, where: str) -> None:
    """Insert the row of a new run, inside the caller's write transaction.

    Raises:
        RunLocked: a run with this id is running in a live process.
        LoomcError: a run with this id already exists (it is not changed).
    """
    from loomc._core.errors import LoomcError, RunLocked

    row = execute(SELECT_LEASE, (run_id,)).fetchone()
    if row is not None:
        status, held_by, beat = row
        if status == RunStatus.RUNNING.value and held_by and is_alive(held_by, beat):
            raise RunLocked(run_id, held_by)
        raise LoomcError(
            f"run id {run_id!r} already exists in {where} (status {status}); resume it "
            f"(fn.resume({run_id!r}) or `loomc resume {run_id}`) or choose another id"
        )
    execute(INSERT_RUN, begin_run_args(new, run_id, heartbeat))


def begin_run_args(new: Any, run_id: str, heartbeat: float) -> tuple[Any, ...]:
    """Parameters of ``INSERT_RUN`` for a ``NewRun``."""
    now = now_iso()
    return (
        run_id, new.spec_hash, RunStatus.RUNNING.value, now, now, storable(new.name), new.kind,
        new.parent_run_id, new.parent_step, new.call_index, new.root_run_id, new.state_type,
        new.input_blob, json.dumps(new.budget) if new.budget is not None else None, new.owner,
        heartbeat, json.dumps(new.meta) if new.meta else None, 1 if new.owner else 0, new.cost_usd,
    )


def prefix_args(run_id: str) -> tuple[str, str]:
    """Parameters of ``SELECT_PREFIX``: every id starting with ``run_id``."""
    return (run_id, run_id + "\U0010ffff")


def match_prefix(run_id: str, ids: list[str]) -> str | None:
    """The one id that ``run_id`` names among the ids starting with it (``None``: none does).

    Raises:
        AmbiguousRunId: several ids share the prefix.
    """
    from loomc._core.errors import AmbiguousRunId

    if run_id in ids:
        return run_id
    if len(ids) == 1:
        return ids[0]
    if ids:
        raise AmbiguousRunId(run_id, ids)
    return None


def filter_listed(runs: list[RunInfo], status: str | None, limit: int | None) -> list[RunInfo]:
    """Apply the status filter after ``run_info`` (a ``crashed`` run is stored as ``running``)."""
    if status is None:
        return runs
    runs = [r for r in runs if r.status.value == status]
    return runs[:limit] if limit is not None else runs


def check_lease(run_id: str, row: tuple[Any, ...] | None, owner: str, where: str) -> None:
    """May ``owner`` take the lease of a run whose ``SELECT_LEASE`` row is ``row``?

    Another thread or task of this process is kept out before this, by the process's
    claim on the run (``_lease.claim``): a row naming ``owner`` itself is a lease this
    process left behind, and is taken over.

    Raises:
        RunNotFound: no such run.
        RunLocked: another live process holds the run.
    """
    from loomc._core.errors import RunLocked, RunNotFound

    if row is None:
        raise RunNotFound(run_id, where=where)
    status, held_by, heartbeat = row
    if status == RunStatus.RUNNING.value and held_by and held_by != owner and is_alive(held_by, heartbeat):
        raise RunLocked(run_id, held_by)


def acquire_args(run_id: str, owner: str, budget: dict[str, Any] | None, heartbeat: float) -> tuple[Any, ...]:
    """Parameters of ``ACQUIRE``."""
    return (owner, heartbeat, now_iso(), json.dumps(budget) if budget is not None else None, run_id)


def finish_args(run_id: str, status: RunStatus, stop_reason: str | None, wall_s: float, heartbeat: float) -> tuple[Any, ...]:
    """Parameters of ``FINISH``."""
    return (status.value, _opt_text(stop_reason), wall_s, now_iso(), heartbeat, run_id)


def legacy_step_row(info: RunInfo, record: Any, blob: str | bytes | None) -> StepRow:
    """The ``StepRow`` that folds a 0.3.0-style ``save_step(record)`` into the run's totals."""
    status = RunStatus.RUNNING.value if info.status is RunStatus.CRASHED else info.status.value
    return StepRow(
        record.step_n, blob, record.cost_usd, record.score, record.timestamp.isoformat(), record.error,
        record.event, record.step_n, 0.0, info.cost_usd + record.cost_usd, max(info.steps, record.step_n + 1),
        info.wall_s, max(info.max_step_cost, record.cost_usd), status, info.stop_reason,
    )


def start_point(next_from: int | None, last_step: int | None) -> int:
    """The step whose state the next step starts from (``-1``: the input)."""
    if next_from is not None:
        return int(next_from)
    return last_step if last_step is not None else -1


def missing_state(run_id: str, step_n: int, where: str, *, row: bool) -> Any:
    """The :class:`~loomc.StoreError` for a committed step whose stored state is gone.

    ``row``: the step's row is there but its state (or the blob it points at) is not.
    """
    from loomc._core.errors import StoreError

    what = "its state is missing (the blob it points at was deleted)" if row else "its row is missing"
    return StoreError(
        f"run {run_id} committed step {step_n}, but {what} in {where}: the database file is damaged. "
        "Restore the file from a backup, or start the run again; loomc will not resume it from an "
        "older state (its spending and step count would no longer match)"
    )


def check_last_step(run_id: str, steps: int, last_step: int | None, where: str) -> None:
    """Refuse a run whose counted steps reach past its last step row (its last rows are gone).

    Every counted step commits its row in the same transaction as the run's totals, so
    ``steps`` is the last step number + 1; more counted steps than rows reach means the
    file lost rows (a resume would renumber over them and forget their spending).

    Raises:
        StoreError: naming the first missing step.
    """
    if steps > (last_step if last_step is not None else -1) + 1:
        raise missing_state(run_id, steps - 1, where, row=False)


def step_record(row: tuple[Any, ...], ref: str | None) -> Any:
    """A ``StepRecord`` (state decoded) from a ``SELECT_STEPS_FULL`` row."""
    from loomc._core.types import StepRecord
    from loomc.store.codec import decode

    return StepRecord(
        step_n=row[0], state=decode(row[1], ref), cost_usd=row[2], score=row[3],
        timestamp=datetime.fromisoformat(row[4]), error=row[5], event=row[6],
    )
