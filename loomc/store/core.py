"""The store operations, written once: sans-I/O generators that yield database requests.

Each operation is a generator taking a *dialect* (a module or object holding the SQL of
one database: ``loomc.store.sqlite.sql`` for SQLite) and yielding requests
``(kind, sql, args)`` — ``QUERY`` (rows back), ``EXEC`` (nothing back), ``EXEC_MANY`` and
``INSERT`` (the new row's id back) — then returning its result. It never touches a
connection: a driver fulfils the requests. The sync SQLite store drives them on
``sqlite3`` (:func:`drive`); the async one awaits aiosqlite for reads and hands writes to
the sync store's transaction driver in a worker thread. Write operations run inside the
driver's transaction. A new database is one dialect and one driver, not a copy of these.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator, Iterable
from datetime import datetime
from typing import Any

from loomc._core.errors import AmbiguousRunId, LoomcError, RunLocked, RunNotFound, StoreError
from loomc._core.holds import HeldCharge, charge_record
from loomc._core.types import _MISSING, RunInfo, RunStatus, StepRecord
from loomc.store.codec import decode, delta_base, encode, expand
from loomc.store.lease import is_alive
from loomc.store.protocol import NewRun, ResumePoint, SchemaInfo, StepRow, StoredInput, StoredStep

__all__ = ["EXEC", "EXEC_MANY", "INSERT", "QUERY", "Op", "Request", "StateLoader", "drive", "expand_rows", "now_iso", "storable"]


#: The kinds of request an operation yields, as ``(kind, sql, args)`` tuples (a tuple per
#: request, not an object: the step path makes several per step).
QUERY = 0  # run ``sql``; the driver sends back every row (a list of tuples)
EXEC = 1  # run a statement whose rows, if any, are not needed (``None`` back)
EXEC_MANY = 2  # run ``sql`` once per parameter tuple in ``args`` (``None`` back)
INSERT = 3  # insert one row; the driver sends back the id the database gave it

#: A request: ``(kind, sql, args)``.
Request = tuple[int, str, Any]
#: A store operation: yields requests, receives their results, returns its own.
Op = Generator[Request, Any, Any]


def drive(op: Op, execute: Callable[[str, Any], Any], executemany: Callable[[str, Any], Any]) -> Any:
    """Run ``op`` on a DB-API connection or cursor (``execute``/``executemany``); its result.

    Called for every step: kept to one comparison per request.
    """
    send: Any = None
    try:
        while True:
            kind, sql, args = op.send(send)
            if kind == EXEC:
                execute(sql, args)
                send = None
            elif kind == QUERY:
                send = execute(sql, args).fetchall()
            elif kind == INSERT:
                send = execute(sql, args).lastrowid
            else:
                executemany(sql, args)
                send = None
    except StopIteration as done:
        return done.value


# -- text and time as stored ------------------------------------------------------------

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


def storable(text: str) -> str:
    """``text`` as a database can store it: a lone surrogate (``"\\udcff"``) becomes its escape.

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


def run_info(row: tuple[Any, ...] | Any) -> RunInfo:
    """Build a :class:`RunInfo` from a row of the dialect's ``RUN_COLS``; a dead owner reads as crashed."""
    status = RunStatus(row[2])
    if status is RunStatus.RUNNING and row[16] and not is_alive(row[16], row[17]):
        status = RunStatus.CRASHED
    return RunInfo(
        id=row[0], spec_hash=row[1], status=status, created_at=row[3], updated_at=row[4], name=row[5],
        kind=row[6], parent_run_id=row[7], parent_step=row[8], call_index=row[9], cost_usd=row[10],
        steps=row[11], wall_s=row[12], max_step_cost=row[13], budget=json.loads(row[14]) if row[14] else {},
        stop_reason=row[15], owner=row[16], meta=json.loads(row[18]) if row[18] else {},
    )


def missing_state(run_id: str, step_n: int, where: str, *, row: bool) -> StoreError:
    """The :class:`~loomc.StoreError` for a committed step whose stored state is gone.

    ``row``: the step's row is there but its state (or the blob it points at) is not.
    """
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
            raise missing_state(run_id or "?", r[0], where, row=True)
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


_new_record = StepRecord.__new__


def history_record(row: tuple[Any, ...], loader: Any) -> StepRecord:
    """A lazy :class:`StepRecord` from ``(step_n, cost_usd, score, timestamp text, error, event)``."""
    # Called once per step of a resumed run (10,000 times for a long one): kept lean.
    rec = _new_record(StepRecord)
    rec.step_n, rec.cost_usd, rec.score, rec._ts, rec.error, rec.event = row
    rec._state, rec._loader = _MISSING, loader
    return rec


def meta_record(row: tuple[Any, ...]) -> StepRecord:
    """A :class:`StepRecord` without a state from ``(step_n, cost_usd, score, timestamp, error, event)``."""
    # Called once per row a window reads (10,000 times for ``loomc show --all`` of a long
    # run): the timestamp and the events are parsed only if they are read.
    rec = _new_record(StepRecord)
    rec.step_n, rec.cost_usd, rec.score, rec._ts, rec.error, rec.event = row
    rec._state, rec._loader = None, None
    return rec


#: How many of the newest runs a mistyped id is compared with (with the ids next to it in
#: sort order): an unknown id is answered at once in a database of 100,000 runs.
NEAREST_POOL = 1000


def nearest(run_id: str, ids: list[str]) -> list[str]:
    """Up to three ids that look like ``run_id`` (for a :class:`~loomc.RunNotFound` message).

    ``ids`` are the candidates: the ids next to ``run_id`` in sort order and the newest
    :data:`NEAREST_POOL` runs (every id, in a smaller database).
    """
    import bisect
    import difflib

    ids = list(dict.fromkeys(ids))
    close = difflib.get_close_matches(run_id, ids, n=3, cutoff=0.3)
    if close:
        return close
    ids = sorted(ids)
    i = bisect.bisect_left(ids, run_id)
    return ids[max(0, i - 1) : i + 2]


def match_prefix(run_id: str, ids: list[str]) -> str | None:
    """The one id that ``run_id`` names among the ids starting with it (``None``: none does).

    Raises:
        AmbiguousRunId: several ids share the prefix.
    """
    if run_id in ids:
        return run_id
    if len(ids) == 1:
        return ids[0]
    if ids:
        raise AmbiguousRunId(run_id, ids)
    return None


def legacy_step_row(info: RunInfo, record: StepRecord, blob: str | bytes | None) -> StepRow:
    """The ``StepRow`` that folds a 0.3.0-style ``save_step(record)`` into the run's totals."""
    status = RunStatus.RUNNING.value if info.status is RunStatus.CRASHED else info.status.value
    return StepRow(
        record.step_n, blob, record.cost_usd, record.score, record.timestamp.isoformat(), record.error,
        record.event, record.step_n, 0.0, info.cost_usd + record.cost_usd, max(info.steps, record.step_n + 1),
        info.wall_s, max(info.max_step_cost, record.cost_usd), status, info.stop_reason,
    )


# -- reads --------------------------------------------------------------------------------


def get_run(d: Any, run_id: str) -> Op:
    """The run with exactly this id, or ``None``."""
    rows = yield QUERY, d.SELECT_RUN, (run_id,)
    return run_info(rows[0]) if rows else None


def resolve(d: Any, where: str, run_id: str) -> Op:
    """The full id of the run whose id is or starts with ``run_id``.

    Raises:
        RunNotFound: listing the nearest ids.
        AmbiguousRunId: when several runs share the prefix.
    """
    if not run_id:
        raise RunNotFound(run_id, where=where)
    found = match_prefix(run_id, [r[0] for r in (yield QUERY, d.SELECT_PREFIX, d.prefix_args(run_id))])
    if found is not None:
        return found
    around = yield QUERY, d.SELECT_IDS_AROUND, (run_id, run_id)
    recent = yield QUERY, d.SELECT_RECENT_IDS, (NEAREST_POOL,)
    raise RunNotFound(run_id, nearest(run_id, [r[0] for r in (*around, *recent)]), where)


_LEASED = (RunStatus.RUNNING.value, RunStatus.CRASHED.value)


def list_runs(
    d: Any, status: RunStatus | str | None, limit: int | None, roots_only: bool, *,
    before: tuple[str, str] | None = None, id_prefix: str | None = None, name: str | None = None,
) -> Op:
    """Runs newest first.

    ``before`` (a ``(created_at, id)`` cursor: only runs listed after it), ``id_prefix`` and
    ``name`` (a case-insensitive part of the name) narrow the list in the database, so a
    page of a large one reads about a page of rows (``search_runs``).

    A ``crashed`` run is stored as ``running`` (its owner died): the two are told apart
    after reading, so they are read a page at a time, newest first, until ``limit`` of the
    status asked for are found; a LIMIT in the query could cut off the ones asked for.
    """
    st = status.value if isinstance(status, RunStatus) else status
    narrow = {"id_prefix": id_prefix or None, "name": name or None}
    if st not in _LEASED or limit is None or limit <= 0:
        sql, args = d.list_runs_sql(status=st, roots_only=roots_only, limit=None if st in _LEASED else limit, before=before, **narrow)
        runs = [run_info(r) for r in (yield QUERY, sql, args)]
        if st is None:
            return runs
        runs = [r for r in runs if r.status.value == st]
        return runs[:limit] if limit is not None else runs
    found: list[RunInfo] = []
    page = max(2 * limit, 64)
    while True:
        sql, args = d.list_runs_sql(status=st, roots_only=roots_only, limit=page, before=before, **narrow)
        rows = yield QUERY, sql, args
        for row in rows:
            info = run_info(row)
            if info.status.value == st:
                found.append(info)
                if len(found) == limit:
                    return found
        if len(rows) < page:
            return found
        before, page = (rows[-1][3], rows[-1][0]), page * 2


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def page_of(
    runs: Iterable[RunInfo], *, status: str | None = None, roots_only: bool = False, id_prefix: str | None = None,
    name: str | None = None, before: tuple[str, str] | None = None, limit: int = 50,
) -> list[RunInfo]:
    """What ``search_runs`` returns, cut from ``runs`` (newest first) in Python: for stores without a query language."""
    part = name.translate(_ASCII_LOWER) if name else None
    out: list[RunInfo] = []
    for r in runs:
        if (
            (before is None or (r.created_at, r.id) < before)
            and (status is None or r.status.value == status)
            and not (roots_only and r.parent_run_id)
            and (not id_prefix or r.id.startswith(id_prefix))
            and (part is None or part in r.name.translate(_ASCII_LOWER))
        ):
            out.append(r)
            if len(out) >= limit:
                break
    return out


def find_child(d: Any, parent_run_id: str, parent_step: int, call_index: int) -> Op:
    """The child run a parent step started as its ``call_index``-th nested loop."""
    rows = yield QUERY, d.SELECT_CHILD, (parent_run_id, parent_step, call_index)
    return run_info(rows[0]) if rows else None


def children(d: Any, run_id: str) -> Op:
    """Direct child runs, in the order their parent started them."""
    return [run_info(r) for r in (yield QUERY, d.SELECT_CHILDREN, (run_id,))]


def schema_info(d: Any) -> Op:
    """The schema version of the database and the versions this loomc handles."""
    rows = yield QUERY, d.SELECT_VERSION, ()
    return SchemaInfo(int(rows[0][0]) if rows else 0, d.READS_FROM, d.SCHEMA_VERSION)


def stored_input(d: Any, run_id: str) -> Op:
    """The run's input as stored, its state type and stored next start (``None``: no such run)."""
    rows = yield QUERY, d.SELECT_RESUME, (run_id,)
    return StoredInput(*rows[0]) if rows else None


def stored_state(d: Any, where: str, run_id: str, step_n: int) -> Op:
    """A step's state as stored, a delta made whole (``None``: no such step).

    Raises:
        StoreError: the step's row is there but its state is not (a damaged file).
    """
    rows = yield QUERY, d.SELECT_STATE, (run_id, step_n)
    if not rows:
        return None
    blob = rows[0][0]
    if blob is None:
        raise missing_state(run_id, step_n, where, row=True)
    base = delta_base(blob)
    if base is not None:
        key = yield QUERY, d.SELECT_STATE, (run_id, base)
        blob = expand(blob, key[0][0] if key else None)
    return blob


def load_state(d: Any, where: str, run_id: str, step_n: int) -> Op:
    """The state a step committed, decoded (``step_n == -1``: the run's input)."""
    if step_n < 0:
        rows = yield QUERY, d.SELECT_RESUME, (run_id,)
        return decode(rows[0][1], rows[0][0]) if rows else None
    ref_rows = yield QUERY, d.SELECT_STATE_TYPE, (run_id,)
    blob = yield from stored_state(d, where, run_id, step_n)
    if blob is None:
        raise missing_state(run_id, step_n, where, row=False)
    return decode(blob, ref_rows[0][0] if ref_rows else "json")


def stored_steps(d: Any, where: str, run_id: str) -> Op:
    """Every step of the run with its state as stored (deltas made whole), in order."""
    rows = yield QUERY, d.SELECT_STEPS_FULL, (run_id,)
    return [StoredStep(*r) for r in expand_rows(rows, run_id, where)]


def load_steps(d: Any, where: str, run_id: str) -> Op:
    """Every step of the run, states decoded, in order."""
    type_rows = yield QUERY, d.SELECT_STATE_TYPE, (run_id,)
    ref = type_rows[0][0] if type_rows else "json"
    steps = yield from stored_steps(d, where, run_id)
    return [
        StepRecord(s.step_n, decode(s.state, ref), s.cost_usd, s.score, datetime.fromisoformat(s.timestamp), s.error, s.event)
        for s in steps
    ]


def resume_point(d: Any, where: str, run_id: str, loader: Any) -> Op:
    """The run's info, its last step and the state to start from (earlier steps: ``step_history``)."""
    info = yield from get_run(d, run_id)
    if info is None:
        raise RunNotFound(run_id, where=where)
    state_type, input_blob, stored_next = (yield QUERY, d.SELECT_RESUME, (run_id,))[0]
    history = [history_record(r, loader) for r in (yield QUERY, d.SELECT_LAST_STEP_META, (run_id,))]
    last = history[-1].step_n if history else None
    check_last_step(run_id, info.steps, last, where)
    next_from = int(stored_next) if stored_next is not None else (last if last is not None else -1)
    blob = input_blob
    if next_from >= 0:
        blob = yield from stored_state(d, where, run_id, next_from)
        if blob is None:  # never fall back to the input: the run's spending says otherwise
            raise missing_state(run_id, next_from, where, row=False)
    in_flight = (yield QUERY, d.IN_FLIGHT, (run_id, last + 1 if last is not None else 0))[0][0]
    return ResumePoint(
        info, state_type, blob, next_from, history, partial=bool(history) and history[0].step_n > 0,
        in_flight_usd=float(in_flight),
    )


def step_history(d: Any, run_id: str, before: int, loader: Any) -> Op:
    """The run's steps numbered below ``before``, in order (states loaded lazily by ``loader``)."""
    return [history_record(r, loader) for r in (yield QUERY, d.SELECT_STEP_META_BEFORE, (run_id, before))]


def step_window(
    d: Any, run_id: str, after: int, first: int | None, last: int | None, error_chars: int | None
) -> Op:
    """Step metadata (no state), in step order, reading only the rows asked for.

    ``after``: only steps numbered above it; ``first``: at most this many from the start;
    ``last``: only the last this many (``first`` is then ignored); ``error_chars``: read
    at most this many characters of each error (``None``: whole).
    """
    if last is not None:
        rows = (yield QUERY, d.step_meta_last(error_chars), (run_id, last))[::-1]
        rows = [row for row in rows if row[0] > after]
    else:
        rows = yield QUERY, d.step_meta_after(error_chars), (run_id, after, -1 if first is None else first)
    return [meta_record(row) for row in rows]


def step_totals(d: Any, run_id: str, before: int) -> Op:
    """``(steps, cost)`` of a run's steps numbered below ``before``."""
    count, cost = (yield QUERY, d.STEP_TOTALS_BEFORE, (run_id, before))[0]
    return int(count), float(cost)


# -- writes (inside the driver's transaction) ----------------------------------------------


def begin_run(d: Any, where: str, new: NewRun, run_id: str, beat: float) -> Op:
    """Insert the row of a new run.

    Raises:
        RunLocked: a run with this id is running in a live process.
        LoomcError: a run with this id already exists (it is not changed).
    """
    rows = yield QUERY, d.SELECT_LEASE, (run_id,)
    if rows:
        status, held_by, held_beat = rows[0]
        if status == RunStatus.RUNNING.value and held_by and is_alive(held_by, held_beat):
            raise RunLocked(run_id, held_by)
        raise LoomcError(
            f"run id {run_id!r} already exists in {where} (status {status}); resume it "
            f"(fn.resume({run_id!r}) or `loomc resume {run_id}`) or choose another id"
        )
    now = now_iso()
    yield EXEC, d.INSERT_RUN, (
        run_id, new.spec_hash, RunStatus.RUNNING.value, now, now, storable(new.name), new.kind,
        new.parent_run_id, new.parent_step, new.call_index, new.root_run_id, new.state_type,
        new.input_blob, json.dumps(new.budget) if new.budget is not None else None, new.owner,
        beat, json.dumps(new.meta) if new.meta else None, 1 if new.owner else 0, new.cost_usd,
    )
    return run_id


def update_run_status(d: Any, run_id: str, status: RunStatus | str) -> Op:
    """Set a run's status."""
    yield EXEC, d.UPDATE_STATUS, (RunStatus(status).value, now_iso(), run_id)


def acquire(d: Any, where: str, run_id: str, owner: str, budget: dict[str, Any] | None, beat: float) -> Op:
    """Take the run's lease for ``owner``.

    Another thread or task of this process is kept out before this, by the process's
    claim on the run (``loomc.store.lease.claim``): a row naming ``owner`` itself is a
    lease this process left behind, and is taken over.

    Raises:
        RunNotFound: no such run.
        RunLocked: another live process holds the run.
    """
    rows = yield QUERY, d.SELECT_LEASE, (run_id,)
    if not rows:
        raise RunNotFound(run_id, where=where)
    status, held_by, held_beat = rows[0]
    if status == RunStatus.RUNNING.value and held_by and held_by != owner and is_alive(held_by, held_beat):
        raise RunLocked(run_id, held_by)
    yield EXEC, d.ACQUIRE, (owner, beat, now_iso(), json.dumps(budget) if budget is not None else None, run_id)


def renew_leases(d: Any, owner: str, run_ids: list[str], beat: float) -> Op:
    """Refresh the heartbeat of the runs in ``run_ids`` that ``owner`` still holds."""
    yield EXEC_MANY, d.RENEW_LEASE, [(beat, run_id, owner) for run_id in run_ids]


def commit_step(d: Any, run_id: str, row: StepRow, beat: float) -> Op:
    """Write one step and the run's totals after it.

    A compressed state goes to the blob table and the step row points at it, so step
    rows stay small: the history of a long run is read without touching its states. A
    nested run's cost increase is rolled up into its ancestors' totals here too.
    """
    state, blob_id = row.state_blob, None
    if isinstance(state, (bytes, bytearray)):
        blob_id = yield INSERT, d.INSERT_BLOB, (state,)
        state = None
    error, event, reason = row.error, row.event, row.stop_reason
    yield EXEC, d.INSERT_STEP, (
        run_id, row.step_n, state, row.cost_usd, row.score, row.timestamp,
        error if error is None else storable(error), event if event is None else storable(event),
        row.next_from, row.duration_s, blob_id,
    )
    if row.ancestors:
        yield EXEC, d.roll_up_sql(len(row.ancestors)), (row.total_cost, run_id, row.timestamp, *row.ancestors)
    yield EXEC, d.UPDATE_TOTALS, (
        row.total_cost, row.total_steps, row.total_wall_s, row.max_step_cost, row.next_from,
        row.status, reason if reason is None else storable(reason), row.timestamp, beat, run_id,
    )
    if row.holds:  # only steps that reserved: the step's cost now counts what they held
        yield EXEC_MANY, d.DELETE_HOLD, [(hold_id,) for hold_id in row.holds]


def save_step(d: Any, where: str, run_id: str, record: StepRecord, beat: float) -> Op:
    """Write a step record and fold it into the run's totals (loomc 0.3.0 API)."""
    info = yield from get_run(d, run_id)
    if info is None:
        raise RunNotFound(run_id, where=where)
    yield from commit_step(d, run_id, legacy_step_row(info, record, encode(record.state)), beat)


def finish_run(d: Any, run_id: str, status: RunStatus, stop_reason: str | None, wall_s: float, beat: float) -> Op:
    """Record how an attempt ended."""
    yield EXEC, d.FINISH, (status.value, _opt_text(stop_reason), wall_s, now_iso(), beat, run_id)


def set_meta(d: Any, run_id: str, meta: dict[str, Any]) -> Op:
    """Replace the run's free-form metadata (JSON)."""
    yield EXEC, d.UPDATE_META, (json.dumps(meta), run_id)


def add_cost(d: Any, run_id: str, usd: float) -> Op:
    """Add to a run's total cost outside a step."""
    yield EXEC, d.ADD_COST, (usd, now_iso(), run_id)


def put_hold(d: Any, run_id: str, hold_id: int, usd: float) -> Op:
    """Keep a reservation of ``run_id`` until the step that made it commits."""
    yield EXEC, d.INSERT_HOLD, (hold_id, run_id, usd, now_iso())


def drop_holds(d: Any, hold_ids: tuple[int, ...]) -> Op:
    """Delete holds whose spending is recorded by now."""
    yield EXEC_MANY, d.DELETE_HOLD, [(hold_id,) for hold_id in hold_ids]


def charge_holds(d: Any, run_id: str) -> Op:
    """Charge every hold left by ``run_id`` and the runs below it to ``run_id``, in full.

    The holds are deleted, the run's cost (and its ancestors') raised and the charge
    noted in its ``meta["held_charges"]``. Returns ``None`` when there were none.
    """
    rows = yield QUERY, d.SELECT_TREE_HOLDS, (run_id,)
    if not rows:
        return None
    charge = HeldCharge(round(sum(usd for _, usd in rows), 12), len(rows), now_iso())
    meta_rows = yield QUERY, d.SELECT_META, (run_id,)
    meta = json.loads(meta_rows[0][0]) if meta_rows and meta_rows[0][0] else {}
    yield EXEC_MANY, d.DELETE_HOLD, [(hold_id,) for hold_id, _ in rows]
    yield EXEC, d.CHARGE_HELD, (charge.usd, json.dumps(charge_record(meta, charge)), charge.at, run_id)
    yield EXEC, d.ROLL_UP_HELD, (run_id, charge.usd)
    return charge
