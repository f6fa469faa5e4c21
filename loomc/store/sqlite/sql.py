"""The SQLite dialect: the schema, its migrations and every statement the store core runs.

No connection is opened here (the migrations run on the one the driver passes). The
operations in ``loomc.store.core`` name these statements; another database provides a
module (or object) with the same names, and a driver for its client library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Names kept here for code written against the 0.4/0.5 layout; they live in the core now.
from loomc.store.core import now_iso, run_info, runs_query, storable
from loomc.store.protocol import StepRow

if TYPE_CHECKING:
    import sqlite3

__all__ = ["SCHEMA_VERSION", "StepRow", "now_iso", "run_info", "storable"]

SCHEMA_VERSION = 6
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
    # v5: fenced leases and a budget shared by processes. ``epoch`` counts the run's
    # owners (every acquire increments it; a write carrying an older one is refused);
    # ``lease_until`` is when the lease ends, on the database's clock (``NOW``). ``usd_cap``
    # is the run's own usd limit and ``reserved`` what is held against it by holds of the
    # run and the runs below it that count in the database (``holds.counted``: made by a
    # shared ledger, ``loomc.store.shared``).
    4: """
ALTER TABLE runs ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN lease_until REAL;
ALTER TABLE runs ADD COLUMN usd_cap REAL;
ALTER TABLE runs ADD COLUMN reserved REAL NOT NULL DEFAULT 0;
ALTER TABLE holds ADD COLUMN counted INTEGER NOT NULL DEFAULT 0;
UPDATE runs SET lease_until = heartbeat + 30 WHERE heartbeat IS NOT NULL;
UPDATE runs SET usd_cap = json_extract(budget, '$.usd') WHERE budget IS NOT NULL AND json_valid(budget)
""",
    # v6: a run's whole life. ``questions``: what a step asked a person (``loomc.ask``),
    # keyed by (run, step, call order), and the answer once given. ``runs.forked_from`` /
    # ``forked_step``: the run and step a fork continues. ``steps_blob``: which steps use a
    # blob, so a prune deletes only the blobs no other run (a fork) still shares.
    5: """
CREATE TABLE IF NOT EXISTS questions (
    run_id TEXT NOT NULL,
    step_n INTEGER NOT NULL,
    call_index INTEGER NOT NULL,
    question TEXT NOT NULL,
    schema_ref TEXT,
    json_schema TEXT,
    asked_at TEXT NOT NULL,
    answer TEXT,
    answered_at TEXT,
    PRIMARY KEY (run_id, step_n, call_index)
) WITHOUT ROWID;
ALTER TABLE runs ADD COLUMN forked_from TEXT;
ALTER TABLE runs ADD COLUMN forked_step INTEGER;
CREATE INDEX IF NOT EXISTS steps_blob ON steps(blob_id) WHERE blob_id IS NOT NULL
""",
}

PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA foreign_keys=OFF")
SYNCHRONOUS = {"power": "FULL", "process": "NORMAL"}
BUSY_TIMEOUT_S = 60.0

#: The database's clock, in seconds since 1970 (leases expire by it, never by a writer's clock).
NOW = "((julianday('now') - 2440587.5) * 86400.0)"
#: Whether a run's lease has ended (no lease at all counts as ended).
EXPIRED = f"(lease_until IS NULL OR lease_until < {NOW})"

RUN_COLS = (
    "id, spec_hash, status, created_at, updated_at, name, kind, parent_run_id, parent_step, "
    f"call_index, cost_usd, steps, wall_s, max_step_cost, budget, stop_reason, owner, heartbeat, meta, epoch, {EXPIRED}, "
    "forked_from, forked_step"
)

#: A new run's owner holds epoch 1 and a lease of the given length.
INSERT_RUN = (
    "INSERT INTO runs (id, spec_hash, status, created_at, updated_at, name, kind, parent_run_id, "
    "parent_step, call_index, root_run_id, state_type, input_blob, budget, owner, heartbeat, meta, "
    "attempts, cost_usd, usd_cap, epoch, lease_until) "
    f"VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,{NOW},?,?,?,?,1,{NOW} + ?)"
)
SELECT_RUN = f"SELECT {RUN_COLS} FROM runs WHERE id = ?"
SELECT_RESUME = "SELECT state_type, input_blob, next_from FROM runs WHERE id = ?"
SELECT_PREFIX = "SELECT id FROM runs WHERE id >= ? AND id < ? ORDER BY id LIMIT 20"
# What a mistyped id is compared with (``core.NEAREST_POOL``): the ids next to it in sort
# order (those sharing its longest prefix), then the newest runs. Both walk an index.
SELECT_IDS_AROUND = (
    "SELECT id FROM (SELECT id FROM runs WHERE id < ? ORDER BY id DESC LIMIT 3) "
    "UNION ALL SELECT id FROM (SELECT id FROM runs WHERE id > ? ORDER BY id LIMIT 3)"
)
SELECT_RECENT_IDS = "SELECT id FROM runs ORDER BY created_at DESC LIMIT ?"
SELECT_CHILD = f"SELECT {RUN_COLS} FROM runs WHERE parent_run_id = ? AND parent_step = ? AND call_index = ?"
SELECT_CHILDREN = f"SELECT {RUN_COLS} FROM runs WHERE parent_run_id = ? ORDER BY parent_step, call_index, created_at"
UPDATE_STATUS = "UPDATE runs SET status = ?, updated_at = ? WHERE id = ?"
#: Take the run for a new owner: the next epoch, if nobody took it since the lease was read
#: (parameters: owner, ttl, updated_at, budget, whether a new budget is given, its usd cap, id, epoch read).
ACQUIRE = (
    f"UPDATE runs SET status = 'running', owner = ?, heartbeat = {NOW}, lease_until = {NOW} + ?, updated_at = ?, "
    "attempts = attempts + 1, stop_reason = NULL, budget = COALESCE(?, budget), "
    "usd_cap = CASE WHEN ? THEN ? ELSE usd_cap END, epoch = epoch + 1 WHERE id = ? AND epoch = ?"
)
SELECT_LEASE = f"SELECT status, owner, heartbeat, epoch, {EXPIRED} FROM runs WHERE id = ?"
#: Renew one lease (parameters: ttl, id, owner, epoch): no row changed means it was taken over.
RENEW_LEASE = (
    f"UPDATE runs SET heartbeat = {NOW}, lease_until = {NOW} + ? WHERE id = ? AND owner = ? AND epoch = COALESCE(?, epoch)"
)
#: Who holds a run now, when a fenced write changed nothing.
SELECT_EPOCH = "SELECT epoch, owner FROM runs WHERE id = ?"
INSERT_STEP = (
    "INSERT OR REPLACE INTO steps (run_id, step_n, state_blob, cost_usd, score, timestamp, error, "
    "event, next_from, duration_s, blob_id) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
)
INSERT_BLOB = "INSERT INTO blobs (data) VALUES (?)"
#: A step's stored state, wherever it lives: inline JSON, or a compressed blob in ``blobs``.
STATE_OF = "COALESCE(s.state_blob, (SELECT data FROM blobs WHERE id = s.blob_id))"
# The writes of a run carry the writer's epoch as their last parameter, ``NULL`` for an
# unfenced (administrative) write: ``epoch = COALESCE(?, epoch)``. A fenced write that
# changes no row was taken over; the driver's transaction is rolled back whole.
#: The run's totals after a step, its lease renewed (the step's one fenced statement).
UPDATE_TOTALS = (
    "UPDATE runs SET cost_usd = ?, steps = ?, wall_s = ?, max_step_cost = ?, next_from = ?, "
    f"status = ?, stop_reason = ?, updated_at = ?, heartbeat = {NOW}, lease_until = {NOW} + ? "
    "WHERE id = ? AND epoch = COALESCE(?, epoch)"
)
FINISH = (
    "UPDATE runs SET status = ?, stop_reason = ?, wall_s = MAX(wall_s, ?), updated_at = ?, "
    f"heartbeat = {NOW} WHERE id = ? AND epoch = COALESCE(?, epoch)"
)
UPDATE_META = "UPDATE runs SET meta = ? WHERE id = ? AND epoch = COALESCE(?, epoch)"
ADD_COST = "UPDATE runs SET cost_usd = cost_usd + ?, updated_at = ? WHERE id = ? AND epoch = COALESCE(?, epoch)"
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
#: A hold of a run, written only while the writer's epoch is the run's (parameters: hold id,
#: run id, usd, created_at, counted, run id, epoch).
INSERT_HOLD = (
    "INSERT INTO holds (hold_id, run_id, usd, created_at, counted) SELECT ?,?,?,?,? "
    "WHERE EXISTS (SELECT 1 FROM runs WHERE id = ? AND epoch = COALESCE(?, epoch))"
)
DELETE_HOLD = "DELETE FROM holds WHERE hold_id = ?"
#: The holds of a run and of every run below it (a run tree is swept as one).
SELECT_TREE_HOLDS = (
    "WITH RECURSIVE tree(id) AS (SELECT ? UNION SELECT r.id FROM runs r JOIN tree t ON r.parent_run_id = t.id) "
    "SELECT hold_id, usd, run_id, counted FROM holds WHERE run_id IN (SELECT id FROM tree)"
)
#: A hold that counts in ``runs.reserved`` (parameter: its id): its run and amount.
SELECT_COUNTED_HOLD = "SELECT run_id, usd FROM holds WHERE hold_id = ? AND counted = 1"
#: Give back ``usd`` held by a run on it and every run above it (parameters: run id, usd).
RELEASE_RESERVED = (
    "WITH RECURSIVE up(id) AS (SELECT ? UNION SELECT r.parent_run_id FROM runs r JOIN up ON r.id = up.id "
    "WHERE r.parent_run_id IS NOT NULL) "
    "UPDATE runs SET reserved = MAX(0.0, ROUND(reserved - ?, 12)) WHERE id IN (SELECT id FROM up)"
)
_reserve: dict[int, str] = {}


def reserve_sql(depth: int) -> str:
    """``UPDATE`` holding an amount on ``depth`` runs (a run and those above it) if every cap allows it.

    Parameters: the amount, then ``depth`` run ids, then the amount again and the slack
    (``loomc._core.policy.EPS``). Changes ``depth`` rows, or fewer when a cap refuses (the
    caller then rolls back): ``cost_usd + reserved + amount <= usd_cap`` on each.
    """
    sql = _reserve.get(depth)
    if sql is None:
        sql = _reserve[depth] = (
            f"UPDATE runs SET reserved = ROUND(reserved + ?, 12) WHERE id IN ({', '.join('?' * depth)}) "
            "AND (usd_cap IS NULL OR cost_usd + reserved + ? <= usd_cap + ?)"
        )
    return sql


def caps_sql(depth: int) -> str:
    """What ``depth`` runs have spent and hold, and their caps (to say which refused a hold)."""
    return f"SELECT id, cost_usd, reserved, usd_cap FROM runs WHERE id IN ({', '.join('?' * depth)})"


SELECT_META = "SELECT meta FROM runs WHERE id = ?"
CHARGE_HELD = "UPDATE runs SET cost_usd = cost_usd + ?, meta = ?, updated_at = ? WHERE id = ?"
#: What a run's tree has spent and holds in the database, and its cap (a shared ledger's view).
SELECT_SHARED = "SELECT cost_usd, reserved, usd_cap FROM runs WHERE id = ?"
#: Add to the stored totals of every run above one (they hold their descendants' spending).
ROLL_UP_HELD = (
    "WITH RECURSIVE up(id) AS (SELECT parent_run_id FROM runs WHERE id = ? "
    "UNION SELECT r.parent_run_id FROM runs r JOIN up ON r.id = up.id) "
    "UPDATE runs SET cost_usd = cost_usd + ? WHERE id IN (SELECT id FROM up)"
)


# -- questions (``loomc.ask``) --------------------------------------------------------------

QUESTION_COLS = "run_id, step_n, call_index, question, schema_ref, json_schema, asked_at, answer, answered_at"
INSERT_QUESTION = (
    "INSERT OR REPLACE INTO questions (run_id, step_n, call_index, question, schema_ref, json_schema, asked_at) "
    "VALUES (?,?,?,?,?,?,?)"
)
SELECT_QUESTIONS = f"SELECT {QUESTION_COLS} FROM questions WHERE run_id = ? ORDER BY step_n, call_index"
#: The questions of a run and of every run below it.
SELECT_TREE_QUESTIONS = (
    "WITH RECURSIVE tree(id) AS (SELECT ? UNION SELECT r.id FROM runs r JOIN tree t ON r.parent_run_id = t.id) "
    f"SELECT {QUESTION_COLS} FROM questions WHERE run_id IN (SELECT id FROM tree) ORDER BY asked_at, run_id"
)
SELECT_QUESTION = f"SELECT {QUESTION_COLS} FROM questions WHERE run_id = ? AND step_n = ? AND call_index = ?"
ANSWER = (
    "UPDATE questions SET answer = ?, answered_at = ? "
    "WHERE run_id = ? AND step_n = ? AND call_index = ? AND answer IS NULL"
)
#: The run stops to wait for an answer: its totals (the discarded step's charges kept) and status.
WAIT = (
    "UPDATE runs SET cost_usd = ?, status = 'waiting', stop_reason = ?, wall_s = MAX(wall_s, ?), "
    f"updated_at = ?, heartbeat = {NOW} WHERE id = ? AND epoch = COALESCE(?, epoch)"
)

# -- fork -----------------------------------------------------------------------------------

#: ``(steps, cost, max step cost, active seconds, last step)`` of a run's steps up to a step.
FORK_TOTALS = (
    "SELECT COUNT(*), COALESCE(SUM(cost_usd), 0), COALESCE(MAX(cost_usd), 0), COALESCE(SUM(duration_s), 0), "
    "MAX(step_n) FROM steps WHERE run_id = ? AND step_n <= ?"
)
SELECT_LAST_STEP_N = "SELECT MAX(step_n) FROM steps WHERE run_id = ?"
SELECT_STEP_NEXT = "SELECT next_from FROM steps WHERE run_id = ? AND step_n = ?"
#: The fork's row: the original's name, type, input and meta; its own totals and status.
FORK_RUN = (
    "INSERT INTO runs (id, spec_hash, status, created_at, updated_at, name, kind, state_type, input_blob, budget, "
    "cost_usd, steps, wall_s, max_step_cost, next_from, stop_reason, meta, attempts, forked_from, forked_step) "
    "SELECT ?, spec_hash, ?, ?, ?, name, kind, state_type, input_blob, COALESCE(?, budget), ?, ?, ?, ?, ?, ?, meta, "
    "0, id, ? FROM runs WHERE id = ?"
)
#: The fork's history: the original's step rows up to the fork step. A compressed state is
#: not copied: the new row points at the same blob.
FORK_STEPS = (
    "INSERT INTO steps (run_id, step_n, state_blob, cost_usd, score, timestamp, error, event, next_from, "
    "duration_s, blob_id) SELECT ?, step_n, state_blob, cost_usd, score, timestamp, error, event, next_from, "
    "duration_s, blob_id FROM steps WHERE run_id = ? AND step_n <= ?"
)
SET_STEP_STATE = "UPDATE steps SET state_blob = ?, blob_id = ? WHERE run_id = ? AND step_n = ?"

# -- prune ------------------------------------------------------------------------------------

SELECT_ROOTS = f"SELECT {RUN_COLS} FROM runs WHERE parent_run_id IS NULL"
#: Templates over lists of ids: ``{0}`` (and ``{1}``) become one placeholder per id (``in_ids``).
#: Every run of the trees under the listed roots: ``(root, id, status, owner, heartbeat, updated_at)``.
TREES_OF = (
    "WITH RECURSIVE tree(id, root) AS (SELECT id, id FROM runs WHERE id IN ({0}) "
    "UNION SELECT r.id, t.root FROM runs r JOIN tree t ON r.parent_run_id = t.id) "
    "SELECT t.root, r.id, r.status, r.owner, r.heartbeat, r.updated_at FROM tree t JOIN runs r ON r.id = t.id"
)
STEP_STATS_IN = (
    "SELECT COUNT(*), COALESCE(SUM(LENGTH(state_blob)), 0) + COALESCE(SUM(LENGTH(error)), 0) "
    "+ COALESCE(SUM(LENGTH(event)), 0) FROM steps WHERE run_id IN ({0})"
)
RUN_BYTES_IN = "SELECT COALESCE(SUM(LENGTH(input_blob)), 0) + COALESCE(SUM(LENGTH(meta)), 0) FROM runs WHERE id IN ({0})"
QUESTION_COUNT_IN = "SELECT COUNT(*) FROM questions WHERE run_id IN ({0})"
BLOBS_OF_IN = "SELECT DISTINCT blob_id FROM steps WHERE run_id IN ({0}) AND blob_id IS NOT NULL"
#: Of the blobs ``{0}``, those no step outside the runs ``{1}`` points at, and their sizes.
UNSHARED_BLOBS = (
    "SELECT id, LENGTH(data) FROM blobs WHERE id IN ({0}) AND NOT EXISTS "
    "(SELECT 1 FROM steps s WHERE s.blob_id = blobs.id AND s.run_id NOT IN ({1}))"
)
#: Of the blobs ``{0}``, those no step points at (any more), and their sizes.
ORPHAN_BLOBS = (
    "SELECT id, LENGTH(data) FROM blobs WHERE id IN ({0}) AND NOT EXISTS (SELECT 1 FROM steps s WHERE s.blob_id = blobs.id)"
)
DELETE_STEPS_IN = "DELETE FROM steps WHERE run_id IN ({0})"
DELETE_QUESTIONS_IN = "DELETE FROM questions WHERE run_id IN ({0})"
DELETE_HOLDS_IN = "DELETE FROM holds WHERE run_id IN ({0})"
DELETE_RUNS_IN = "DELETE FROM runs WHERE id IN ({0})"
DELETE_BLOBS_IN = "DELETE FROM blobs WHERE id IN ({0})"
#: How many ids one statement lists (well under SQLite's 32766 parameters).
IDS_PER_STATEMENT = 500


def in_ids(template: str, *counts: int) -> str:
    """``template`` with ``{0}``, ``{1}``... each replaced by that many placeholders."""
    return template.format(*(",".join("?" * n) for n in counts))


#: Return freed pages to the file system (outside any transaction): the log first, then the file.
VACUUM = ("PRAGMA wal_checkpoint(TRUNCATE)", "VACUUM", "PRAGMA wal_checkpoint(TRUNCATE)")


def list_runs_sql(
    *, status: str | None, roots_only: bool, limit: int | None, before: tuple[str, str] | None = None,
    id_prefix: str | None = None, name: str | None = None,
) -> tuple[str, tuple[Any, ...]]:
    """The query behind ``list_runs`` (see ``loomc.store.core.runs_query``)."""
    # "+" keeps SQLite from picking runs_children (an equality match on NULL) for roots and
    # sorting every root run; walking runs_created newest first stops at LIMIT.
    return runs_query(
        RUN_COLS, '?', 'instr(lower(name), lower({})) > 0', '+parent_run_id IS NULL', status=status, roots_only=roots_only, limit=limit,
        before=before, id_prefix=id_prefix, name=name,
    )


SELECT_VERSION = "PRAGMA user_version"
SET_VERSION = "PRAGMA user_version={}"
SET_SYNCHRONOUS = "PRAGMA synchronous={}"
SELECT_TABLES = "SELECT name FROM sqlite_master WHERE type='table'"
HAS_RUNS = "SELECT 1 FROM sqlite_master WHERE name='runs'"
#: Copy a (deleted) write-ahead log into the database file, still open on this connection.
CHECKPOINT_WAL = "PRAGMA wal_checkpoint(TRUNCATE)"
BEGIN_WRITE = "BEGIN IMMEDIATE"
COMMIT = "COMMIT"
ROLLBACK = "ROLLBACK"
SAVEPOINT = "SAVEPOINT w"
ROLLBACK_SAVEPOINT = "ROLLBACK TO w"
RELEASE_SAVEPOINT = "RELEASE w"


# -- migrations (run by the sync driver inside its BEGIN IMMEDIATE) ------------------------


def migrate(conn: sqlite3.Connection, version: int) -> None:
    """Bring a database at ``version`` to ``version + 1`` (``MIGRATIONS[version]``)."""
    if version == 0:
        migrate_0(conn)
    else:
        run_script(conn, MIGRATIONS[version])


def run_script(conn: sqlite3.Connection, script: str) -> None:
    """Run a multi-statement script inside the current transaction (``executescript`` would commit).

    An ``ALTER TABLE t ADD COLUMN c ...`` whose column exists already is skipped (SQLite
    has no ``IF NOT EXISTS`` for columns): a migration is safe to run on a file that has it.
    """
    for stmt in script.split(";"):
        words = stmt.split()
        if not words:
            continue
        adds_column = [w.upper() for w in words[:2] + words[3:5]] == ["ALTER", "TABLE", "ADD", "COLUMN"]
        if adds_column and words[5] in {r[1] for r in conn.execute(f"PRAGMA table_info({words[2]})")}:
            continue
        conn.execute(stmt)


def migrate_0(conn: sqlite3.Connection) -> None:
    """Create the schema, or bring a loomc 0.3.0 database up to it."""
    cols = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
    if not cols:
        run_script(conn, MIGRATIONS[0])
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
        run_script(conn, MIGRATIONS[0])
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
    run_script(
        conn,
        "CREATE INDEX IF NOT EXISTS runs_roots ON runs(created_at) WHERE parent_run_id IS NULL;"
        "CREATE INDEX IF NOT EXISTS runs_created ON runs(created_at);"
        "CREATE INDEX IF NOT EXISTS runs_children ON runs(parent_run_id, parent_step, call_index);"
    )


# -- whole-database reads and writes (``loomc db copy`` / ``loomc db info``) ----------------

#: Every column of ``runs``, in the order ``DUMP_RUNS`` reads and ``LOAD_RUN`` writes them.
ALL_RUN_COLS = (
    "id, spec_hash, status, created_at, updated_at, name, kind, parent_run_id, parent_step, call_index, "
    "root_run_id, state_type, budget, cost_usd, steps, wall_s, max_step_cost, next_from, stop_reason, "
    "owner, heartbeat, attempts, meta, usd_cap, reserved, forked_from, forked_step, input_blob"
)
DUMP_RUNS = f"SELECT {ALL_RUN_COLS} FROM runs ORDER BY created_at, id"
#: A run's steps with their states as stored (a blob's bytes, not made whole: deltas stay deltas).
DUMP_STEPS = (
    f"SELECT s.step_n, {STATE_OF}, s.cost_usd, s.score, s.timestamp, s.error, s.event, s.next_from, "
    "s.duration_s FROM steps s WHERE s.run_id = ? ORDER BY s.step_n"
)
DUMP_HOLDS = "SELECT hold_id, run_id, usd, created_at, counted FROM holds ORDER BY hold_id"
LOAD_HOLD = "INSERT INTO holds (hold_id, run_id, usd, created_at, counted) VALUES (?,?,?,?,?)"
#: A run's questions (``loomc.ask``) and their answers, every column.
DUMP_QUESTIONS = f"SELECT {QUESTION_COLS} FROM questions WHERE run_id = ? ORDER BY step_n, call_index"
LOAD_QUESTION = f"INSERT INTO questions ({QUESTION_COLS}) VALUES (?,?,?,?,?,?,?,?,?)"
LOAD_RUN = f"INSERT INTO runs ({ALL_RUN_COLS}) VALUES ({', '.join('?' * 28)})"
SELECT_EXISTING = "SELECT id FROM runs WHERE id = ?"
COUNT_RUNS = "SELECT COUNT(*) FROM runs"
COUNT_STEPS = "SELECT COUNT(*) FROM steps"


def state_params(blob: str | bytes | None) -> tuple[str | bytes | None]:
    """The parameters ``LOAD_RUN`` takes for a stored input state (SQLite stores either type)."""
    return (blob,)
