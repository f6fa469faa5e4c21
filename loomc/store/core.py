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
from datetime import datetime, timedelta
from typing import Any

from loomc._core.errors import AmbiguousRunId, BudgetExhausted, LeaseLost, LoomcError, RunLocked, RunNotFound, StoreError
from loomc._core.holds import HeldCharge, charge_record
from loomc._core.types import _MISSING, RunInfo, RunStatus, StepRecord
from loomc.store.codec import decode, delta_base, encode, expand
from loomc.store.lease import is_alive
from loomc.store.protocol import (
    NewRun,
    PruneReport,
    PruneRequest,
    Question,
    ResumePoint,
    SchemaInfo,
    StepRow,
    StoredInput,
    StoredStep,
    WaitRow,
)

__all__ = ["COUNT", "EXEC", "EXEC_MANY", "INSERT", "QUERY", "Op", "Request", "StateLoader", "drive", "expand_rows", "now_iso", "storable"]


#: The kinds of request an operation yields, as ``(kind, sql, args)`` tuples (a tuple per
#: request, not an object: the step path makes several per step).
QUERY = 0  # run ``sql``; the driver sends back every row (a list of tuples)
EXEC = 1  # run a statement whose rows, if any, are not needed (``None`` back)
EXEC_MANY = 2  # run ``sql`` once per parameter tuple in ``args`` (``None`` back)
INSERT = 3  # insert one row; the driver sends back the id the database gave it
COUNT = 4  # run a statement; the driver sends back how many rows it changed (a fenced write's check)

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
            elif kind == COUNT:
                send = execute(sql, args).rowcount
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



def runs_query(
    run_cols: str, p: str, contains: str, roots: str, *, status: str | None, roots_only: bool, limit: int | None,
    before: tuple[str, str] | None = None, id_prefix: str | None = None, name: str | None = None,
) -> tuple[str, tuple[Any, ...]]:
    """The query behind ``list_runs`` in a dialect's terms: newest first, optionally roots only.

    ``p`` is the dialect's placeholder, ``contains`` its test that ``name`` holds the
    parameter in either case (with ``{}`` for the placeholder), ``roots`` its test of a
    root run. ``before``: only runs older than this ``(created_at, id)`` (the next page);
    ``id_prefix``: only ids starting with it; ``name``: only names holding it.
    """
    where: list[str] = []
    args: list[Any] = []
    if before is not None:
        where.append(f"(created_at, id) < ({p}, {p})")
        args.extend(before)
    if id_prefix:
        where.append(f"id >= {p} AND id < {p}")
        args.extend(prefix_args(id_prefix))
    if name:
        where.append(contains.format(p))
        args.append(name)
    if roots_only:
        where.append(roots)
    if status is not None and status != RunStatus.CRASHED.value:
        where.append(f"status = {p}")
        args.append(status)
    elif status == RunStatus.CRASHED.value:
        where.append("status = 'running'")
    sql = f"SELECT {run_cols} FROM runs"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY created_at DESC, id DESC"
    if limit is not None:
        sql += f" LIMIT {p}"
        args.append(int(limit))
    return sql, tuple(args)


def prefix_args(run_id: str) -> tuple[str, str]:
    """Parameters of a dialect's ``SELECT_PREFIX``: every id starting with ``run_id`` (ids sort below U+10FFFF)."""
    return (run_id, run_id + "\U0010ffff")

def step_meta_sql(template: str, error_chars: int | None) -> str:
    """A dialect's step-metadata window (``STEP_META_AFTER``/``STEP_META_LAST``), errors cut to ``error_chars``."""
    return template.format(error="error" if error_chars is None else f"substr(error, 1, {int(error_chars)})")


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
    """Build a :class:`RunInfo` from a row of the dialect's ``RUN_COLS``; a dead owner reads as crashed.

    (An owner whose lease expired reads as crashed too: its run may be taken over.)
    """
    status = RunStatus(row[2])
    if status is RunStatus.RUNNING and row[16] and not is_alive(row[16], row[17], expired=bool(row[20])):
        status = RunStatus.CRASHED
    return RunInfo(
        id=row[0], spec_hash=row[1], status=status, created_at=row[3], updated_at=row[4], name=row[5],
        kind=row[6], parent_run_id=row[7], parent_step=row[8], call_index=row[9], cost_usd=row[10],
        steps=row[11], wall_s=row[12], max_step_cost=row[13], budget=json.loads(row[14]) if row[14] else {},
        stop_reason=row[15], owner=row[16], meta=json.loads(row[18]) if row[18] else {},
        forked_from=row[21], forked_step=row[22],
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
    found = match_prefix(run_id, [r[0] for r in (yield QUERY, d.SELECT_PREFIX, prefix_args(run_id))])
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
        rows = (yield QUERY, step_meta_sql(d.STEP_META_LAST, error_chars), (run_id, last))[::-1]
        rows = [row for row in rows if row[0] > after]
    else:
        rows = yield QUERY, step_meta_sql(d.STEP_META_AFTER, error_chars), (run_id, after, -1 if first is None else first)
    return [meta_record(row) for row in rows]


def step_totals(d: Any, run_id: str, before: int) -> Op:
    """``(steps, cost)`` of a run's steps numbered below ``before``."""
    count, cost = (yield QUERY, d.STEP_TOTALS_BEFORE, (run_id, before))[0]
    return int(count), float(cost)


# -- writes (inside the driver's transaction) ----------------------------------------------


def begin_run(d: Any, where: str, new: NewRun, run_id: str, ttl: float) -> Op:
    """Insert the row of a new run, its owner holding epoch 1 and a lease of ``ttl`` seconds.

    Raises:
        RunLocked: a run with this id is running in a live process.
        LoomcError: a run with this id already exists (it is not changed).
    """
    rows = yield QUERY, d.SELECT_LEASE, (run_id,)
    if rows:
        status, held_by, held_beat, _, expired = rows[0]
        if status == RunStatus.RUNNING.value and held_by and is_alive(held_by, held_beat, expired=bool(expired)):
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
        json.dumps(new.meta) if new.meta else None, 1 if new.owner else 0, new.cost_usd, usd_cap(new.budget), ttl,
    )
    return run_id


def usd_cap(budget: dict[str, Any] | None) -> float | None:
    """The usd limit of a stored budget (``None``: none)."""
    cap = budget.get("usd") if budget else None
    return float(cap) if cap is not None and cap != float("inf") else None


def fence_failed(d: Any, run_id: str, epoch: int | None) -> Op:
    """A fenced write of ``run_id`` changed nothing: raise :class:`LeaseLost` if another owner holds it now.

    A run that is not there (deleted) is left to the caller: the write simply did nothing.
    """
    rows = yield QUERY, d.SELECT_EPOCH, (run_id,)
    if rows and epoch is not None and rows[0][0] != epoch:
        raise LeaseLost(run_id, epoch, now_epoch=rows[0][0], owner=rows[0][1])


def update_run_status(d: Any, run_id: str, status: RunStatus | str) -> Op:
    """Set a run's status."""
    yield EXEC, d.UPDATE_STATUS, (RunStatus(status).value, now_iso(), run_id)


def acquire(d: Any, where: str, run_id: str, owner: str, budget: dict[str, Any] | None, ttl: float) -> Op:
    """Take the run's lease for ``owner`` for ``ttl`` seconds; returns the new epoch.

    The lease is free when its owner is gone or its lease has expired (by the database's
    clock). Every acquire increments the run's epoch: a write carrying an older one
    (the owner taken over) is refused. Another thread or task of this process is kept out
    before this, by the process's claim on the run (``loomc.store.lease.claim``): a row
    naming ``owner`` itself is a lease this process left behind, and is taken over.

    Raises:
        RunNotFound: no such run.
        RunLocked: another live process holds the run (or took it an instant ago).
    """
    rows = yield QUERY, d.SELECT_LEASE, (run_id,)
    if not rows:
        raise RunNotFound(run_id, where=where)
    status, held_by, held_beat, epoch, expired = rows[0]
    alive = is_alive(held_by, held_beat, expired=bool(expired))
    if status == RunStatus.RUNNING.value and held_by and held_by != owner and alive:
        raise RunLocked(run_id, held_by)
    changed = yield COUNT, d.ACQUIRE, (
        owner, ttl, now_iso(), json.dumps(budget) if budget is not None else None, budget is not None,
        usd_cap(budget), run_id, epoch,
    )
    if changed != 1:  # another process took it between the read and the write
        now = (yield QUERY, d.SELECT_EPOCH, (run_id,))
        raise RunLocked(run_id, now[0][1] if now else "another process")
    return int(epoch) + 1


def renew_leases(d: Any, owner: str, leases: list[tuple[str, int | None]], ttl: float) -> Op:
    """Renew the leases ``(run id, epoch)`` that ``owner`` still holds for ``ttl`` seconds; the ids it lost."""
    lost = []
    for run_id, epoch in leases:
        if (yield COUNT, d.RENEW_LEASE, (ttl, run_id, owner, epoch)) != 1:
            lost.append(run_id)
    return lost


def commit_step(d: Any, run_id: str, row: StepRow, ttl: float, epoch: int | None) -> Op:
    """Write one step and the run's totals after it.

    A compressed state goes to the blob table and the step row points at it, so step
    rows stay small: the history of a long run is read without touching its states. A
    nested run's cost increase is rolled up into its ancestors' totals here too. The
    totals' ``UPDATE`` is fenced by ``epoch`` and renews the lease for ``ttl`` seconds:
    changing no row, it raises :class:`LeaseLost` and the driver rolls the step back.
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
    if (yield COUNT, d.UPDATE_TOTALS, (
        row.total_cost, row.total_steps, row.total_wall_s, row.max_step_cost, row.next_from,
        row.status, reason if reason is None else storable(reason), row.timestamp, ttl, run_id, epoch,
    )) != 1:
        yield from fence_failed(d, run_id, epoch)
    if row.holds:  # only steps that reserved: the step's cost now counts what they held
        yield from drop_holds(d, row.holds)


def save_step(d: Any, where: str, run_id: str, record: StepRecord, ttl: float, epoch: int | None) -> Op:
    """Write a step record and fold it into the run's totals (loomc 0.3.0 API)."""
    info = yield from get_run(d, run_id)
    if info is None:
        raise RunNotFound(run_id, where=where)
    yield from commit_step(d, run_id, legacy_step_row(info, record, encode(record.state)), ttl, epoch)


def finish_run(d: Any, run_id: str, status: RunStatus, stop_reason: str | None, wall_s: float, epoch: int | None) -> Op:
    """Record how an attempt ended (fenced by ``epoch``)."""
    if (yield COUNT, d.FINISH, (status.value, _opt_text(stop_reason), wall_s, now_iso(), run_id, epoch)) != 1:
        yield from fence_failed(d, run_id, epoch)


def set_meta(d: Any, run_id: str, meta: dict[str, Any], epoch: int | None) -> Op:
    """Replace the run's free-form metadata (JSON; fenced by ``epoch``)."""
    if (yield COUNT, d.UPDATE_META, (json.dumps(meta), run_id, epoch)) != 1:
        yield from fence_failed(d, run_id, epoch)


def add_cost(d: Any, run_id: str, usd: float, epoch: int | None) -> Op:
    """Add to a run's total cost outside a step (fenced by ``epoch``)."""
    if (yield COUNT, d.ADD_COST, (usd, now_iso(), run_id, epoch)) != 1:
        yield from fence_failed(d, run_id, epoch)


def put_hold(d: Any, run_id: str, hold_id: int, usd: float, epoch: int | None) -> Op:
    """Keep a reservation of ``run_id`` until the step that made it commits (fenced by ``epoch``)."""
    if (yield COUNT, d.INSERT_HOLD, (hold_id, run_id, usd, now_iso(), 0, run_id, epoch)) != 1:
        yield from fence_failed(d, run_id, epoch)
        raise RunNotFound(run_id)


def drop_holds(d: Any, hold_ids: tuple[int, ...]) -> Op:
    """Delete holds whose spending is recorded by now (what they held in the database given back)."""
    for hold_id in hold_ids:
        counted = yield QUERY, d.SELECT_COUNTED_HOLD, (hold_id,)
        if counted:
            yield EXEC, d.RELEASE_RESERVED, counted[0]
    yield EXEC_MANY, d.DELETE_HOLD, [(hold_id,) for hold_id in hold_ids]


def reserve_shared(d: Any, chain: tuple[str, ...], hold_id: int, usd: float, epoch: int | None, slack: float) -> Op:
    """Hold ``usd`` for ``chain[0]`` against the caps of every run in ``chain`` (it and those above it).

    One conditional ``UPDATE`` adds ``usd`` to each run's ``reserved`` where
    ``cost_usd + reserved + usd <= usd_cap`` (``slack`` of rounding allowed); a hold row
    (``counted``, fenced by ``epoch``) records it until the step that made it commits
    (the hold's amount then moves into the step's cost) or the run is taken over (charged in full).

    Raises:
        BudgetExhausted: a cap in ``chain`` cannot take it (the driver rolls back: nothing held).
        LeaseLost: ``chain[0]`` was taken over.
    """
    if (yield COUNT, d.reserve_sql(len(chain)), (usd, *chain, usd, slack)) != len(chain):
        caps = {r[0]: r[1:] for r in (yield QUERY, d.caps_sql(len(chain)), chain)}
        for run_id in chain:
            if run_id not in caps:
                raise RunNotFound(run_id)
            spent, reserved, cap = caps[run_id]
            if cap is not None and spent + reserved + usd > cap + slack:
                raise BudgetExhausted("usd", spent + reserved, cap, run_id=chain[0], owner=run_id, requested=usd)
        raise BudgetExhausted("usd", 0.0, 0.0, run_id=chain[0], owner=chain[0], requested=usd)
    if (yield COUNT, d.INSERT_HOLD, (hold_id, chain[0], usd, now_iso(), 1, chain[0], epoch)) != 1:
        yield from fence_failed(d, chain[0], epoch)
        raise RunNotFound(chain[0])


def shared_view(d: Any, run_id: str) -> Op:
    """``(spent, reserved, cap)`` of a run as the database holds them (``None``: no such run)."""
    rows = yield QUERY, d.SELECT_SHARED, (run_id,)
    return tuple(rows[0]) if rows else None


def charge_holds(d: Any, run_id: str) -> Op:
    """Charge every hold left by ``run_id`` and the runs below it to ``run_id``, in full.

    The holds are deleted, the run's cost (and its ancestors') raised and the charge
    noted in its ``meta["held_charges"]``. Returns ``None`` when there were none.
    """
    rows = yield QUERY, d.SELECT_TREE_HOLDS, (run_id,)
    if not rows:
        return None
    charge = HeldCharge(round(sum(r[1] for r in rows), 12), len(rows), now_iso())
    meta_rows = yield QUERY, d.SELECT_META, (run_id,)
    meta = json.loads(meta_rows[0][0]) if meta_rows and meta_rows[0][0] else {}
    for _, usd, holder, counted in rows:  # what they held in the database becomes spent, below
        if counted:
            yield EXEC, d.RELEASE_RESERVED, (holder, usd)
    yield EXEC_MANY, d.DELETE_HOLD, [(r[0],) for r in rows]
    yield EXEC, d.CHARGE_HELD, (charge.usd, json.dumps(charge_record(meta, charge)), charge.at, run_id)
    yield EXEC, d.ROLL_UP_HELD, (run_id, charge.usd)
    return charge


# -- a run's whole life: questions, forks, pruning ------------------------------------------


def questions(d: Any, run_id: str, tree: bool) -> Op:
    """The questions a run's steps asked (``tree``: and those of every run below it)."""
    rows = yield QUERY, d.SELECT_TREE_QUESTIONS if tree else d.SELECT_QUESTIONS, (run_id,)
    return [Question(*r) for r in rows]


def wait_for_input(d: Any, run_id: str, row: WaitRow, epoch: int | None) -> Op:
    """Stop the run to wait for an answer: status ``waiting``, the question, the step's charges kept.

    The discarded step's cost is not a step's: it stays in the run's total (and its
    ancestors', raised as a committed step raises them), and the holds it leaves are dropped.
    """
    now = now_iso()
    if (yield COUNT, d.WAIT, (row.total_cost, storable(row.reason), row.wall_s, now, run_id, epoch)) != 1:
        yield from fence_failed(d, run_id, epoch)  # the run's writes are fenced before any other lands
    if row.ancestors:
        yield EXEC, d.roll_up_sql(len(row.ancestors)), (row.total_cost, run_id, now, *row.ancestors)
    q = row.question
    if q is not None:
        yield EXEC, d.INSERT_QUESTION, (
            run_id, q.step_n, q.call_index, storable(q.text), q.schema_ref, q.json_schema, now,
        )
    if row.holds:
        yield EXEC_MANY, d.DELETE_HOLD, [(hold_id,) for hold_id in row.holds]


def answer(d: Any, where: str, question: Question, answer_text: str) -> Op:
    """Store the answer to ``question`` (an answer already given is never replaced).

    Raises:
        LoomcError: the question is not in the store, or was answered meanwhile.
    """
    key = (question.run_id, question.step_n, question.call_index)
    rows = yield QUERY, d.SELECT_QUESTION, key
    if not rows:
        raise LoomcError(
            f"run {question.run_id} has no question at step {question.step_n} in {where}; "
            f"list what it waits for with `loomc show {question.run_id}`"
        )
    if rows[0][7] is not None:
        raise LoomcError(
            f"the question of run {question.run_id} at step {question.step_n} was already answered "
            f"({rows[0][8]}); resume the run (`loomc resume {question.run_id} --run`)"
        )
    yield EXEC, d.ANSWER, (storable(answer_text), now_iso(), *key)


def fork(
    d: Any, where: str, run_id: str, at_step: int, new_id: str, state_blob: str | bytes | None,
    budget: dict[str, Any] | None,
) -> Op:
    """Make run ``new_id``: the history of ``run_id`` up to step ``at_step``, continuing from there.

    The step rows are copied (they are small); a compressed state is shared, not copied: the
    fork's row points at the same blob. ``state_blob`` replaces the state of the fork's
    step ``at_step`` (the state it continues from). The original is not changed.

    Raises:
        RunNotFound: no such run.
        LoomcError: a nested run or a graph (see ``docs/fork-and-prune.md``), or a run
            with no steps.
        ValueError: ``at_step`` is not one of the run's steps.
    """
    info = yield from get_run(d, run_id)
    if info is None:
        raise RunNotFound(run_id, where=where)
    refuse_fork(info)
    last = (yield QUERY, d.SELECT_LAST_STEP_N, (run_id,))[0][0]
    if last is None:
        raise LoomcError(f"run {run_id} has no committed step to fork from; run or resume it first")
    if isinstance(at_step, bool) or not isinstance(at_step, int) or not 0 <= at_step <= last:
        raise ValueError(f"at_step={at_step!r}: run {run_id} has steps 0..{last}; fork at one of them")
    count, cost, max_cost, wall, _ = (yield QUERY, d.FORK_TOTALS, (run_id, at_step))[0]
    if count != at_step + 1:
        raise missing_state(run_id, at_step, where, row=False)
    stored_next = (yield QUERY, d.SELECT_STEP_NEXT, (run_id, at_step))[0][0]
    next_from = at_step if state_blob is not None or stored_next is None else int(stored_next)
    now = now_iso()
    reason = f"forked from run {run_id} at step {at_step}; resume it to continue"
    yield EXEC, d.FORK_RUN, (
        new_id, RunStatus.INTERRUPTED.value, now, now, json.dumps(budget) if budget is not None else None,
        round(float(cost), 12), int(count), float(wall), float(max_cost), next_from, reason, at_step, run_id,
    )
    yield EXEC, d.FORK_STEPS, (new_id, run_id, at_step)
    if state_blob is not None:
        if isinstance(state_blob, (bytes, bytearray)):  # a compressed state lives in the blob table
            blob_id = yield INSERT, d.INSERT_BLOB, (state_blob,)
            yield EXEC, d.SET_STEP_STATE, (None, blob_id, new_id, at_step)
        else:
            yield EXEC, d.SET_STEP_STATE, (state_blob, None, new_id, at_step)
    return new_id


def refuse_fork(info: RunInfo) -> None:
    """Raise the error for a run that cannot be forked: a nested run or a graph."""
    if info.parent_run_id:
        raise LoomcError(
            f"run {info.id} is nested in run {info.parent_run_id}: a nested run's history depends on its "
            "parent's step and budget, so it is not forked alone; fork the top-level run at the step that "
            "started it (see docs/fork-and-prune.md)"
        )
    if info.kind != "loop":
        raise LoomcError(
            f"run {info.id} is a {info.kind} run: it has no steps of its own to fork from (its nodes are "
            "runs under it); resume it, or run the graph again (see docs/fork-and-prune.md)"
        )


#: Statuses ``prune`` never touches: a run being executed, or one that waits for a person.
KEEP_STATUSES = (RunStatus.RUNNING.value, RunStatus.WAITING.value)


def prune_choice(request: PruneRequest, roots: list[RunInfo], now: float) -> list[RunInfo]:
    """Of the top-level runs ``roots``, those ``request`` selects (never a running or waiting one)."""
    import fnmatch

    cutoff = None if request.older_than_s is None else now - request.older_than_s
    chosen: list[RunInfo] = []
    kept: dict[str, int] = {}
    for info in sorted(roots, key=lambda r: (r.created_at, r.id), reverse=True):
        status = info.status.value
        if status in KEEP_STATUSES:
            continue
        if request.statuses is not None and status not in request.statuses:
            continue
        if request.name is not None and not fnmatch.fnmatchcase(info.name, request.name):
            continue
        if request.keep_last is not None and kept.get(info.name, 0) < request.keep_last:
            kept[info.name] = kept.get(info.name, 0) + 1
            continue
        if cutoff is not None and datetime.fromisoformat(info.updated_at).timestamp() >= cutoff:
            continue
        chosen.append(info)
    return chosen


def prune_roots(d: Any) -> Op:
    """Every top-level run (what ``prune`` chooses from)."""
    return [run_info(r) for r in (yield QUERY, d.SELECT_ROOTS, ())]


def prune_trees(d: Any, roots: list[RunInfo], dry_run: bool) -> Op:
    """Delete the trees of ``roots`` (runs, steps, questions, holds, unshared blobs); what went.

    Run inside one write transaction, so a loop committing at the same time either commits
    before (and its run, now changed, is skipped) or after (its run is gone, or was never
    chosen). A tree is left alone when any run of it is running in a live process or
    waiting, or when its root changed since it was chosen. With ``dry_run`` nothing is
    written (and it may run as a read).
    """
    report = PruneReport(roots=[], dry_run=dry_run)
    if not roots:
        return report
    by_id = {r.id: r for r in roots}
    rows = yield QUERY, d.in_ids(d.TREES_OF, len(by_id)), tuple(by_id)
    trees: dict[str, list[str]] = {}
    bad: set[str] = set()
    for root, rid, status, owner, beat, updated in rows:
        trees.setdefault(root, []).append(rid)
        live = status == RunStatus.RUNNING.value and owner and is_alive(owner, beat)
        if status == RunStatus.WAITING.value or live or (rid == root and updated != by_id[root].updated_at):
            bad.add(root)
    report.skipped = sorted(r for r in by_id if r in bad or r not in trees)
    ids = [rid for root, members in trees.items() if root not in bad for rid in members]
    report.roots = [by_id[r] for r in by_id if r in trees and r not in bad]
    if not ids:
        return report
    report.runs = len(ids)
    per = d.IDS_PER_STATEMENT
    blob_ids: list[int] = []
    for i in range(0, len(ids), per):
        part = tuple(ids[i : i + per])
        n_steps, step_bytes = (yield QUERY, d.in_ids(d.STEP_STATS_IN, len(part)), part)[0]
        report.steps += int(n_steps)
        report.bytes_freed += int(step_bytes)
        report.bytes_freed += int((yield QUERY, d.in_ids(d.RUN_BYTES_IN, len(part)), part)[0][0])
        report.questions += int((yield QUERY, d.in_ids(d.QUESTION_COUNT_IN, len(part)), part)[0][0])
        blob_ids.extend(r[0] for r in (yield QUERY, d.in_ids(d.BLOBS_OF_IN, len(part)), part))
    if dry_run:  # the blobs no step outside these runs points at
        all_ids = tuple(ids)
        for i in range(0, len(blob_ids), per):
            part_b = tuple(blob_ids[i : i + per])
            found = yield QUERY, d.in_ids(d.UNSHARED_BLOBS, len(part_b), len(all_ids)), (*part_b, *all_ids)
            report.blobs += len(found)
            report.bytes_freed += sum(int(r[1]) for r in found)
        return report
    for i in range(0, len(ids), per):
        part = tuple(ids[i : i + per])
        for template in (d.DELETE_STEPS_IN, d.DELETE_QUESTIONS_IN, d.DELETE_HOLDS_IN, d.DELETE_RUNS_IN):
            yield EXEC, d.in_ids(template, len(part)), part
    for i in range(0, len(blob_ids), per):  # the steps are gone: a blob no step points at any more goes too
        part_b = tuple(blob_ids[i : i + per])
        found = yield QUERY, d.in_ids(d.ORPHAN_BLOBS, len(part_b)), part_b
        if found:
            report.blobs += len(found)
            report.bytes_freed += sum(int(r[1]) for r in found)
            yield EXEC, d.in_ids(d.DELETE_BLOBS_IN, len(found)), tuple(r[0] for r in found)
    return report


#: Top-level runs whose trees one prune transaction deletes: a loop committing meanwhile
#: waits for one such transaction at most, never for the whole prune.
PRUNE_ROOTS_PER_TRANSACTION = 200


def prune_request(
    older_than: str | float | timedelta | None, status: str | list[str] | tuple[str, ...] | None,
    name: str | None, keep_last: int | None, now: float | None = None,
) -> PruneRequest:
    """Check ``prune``'s arguments and bundle them.

    Raises:
        ValueError: a bad duration, status or count.
    """
    from loomc._core.budget import parse_duration

    older = None if older_than is None else parse_duration(older_than)
    statuses: tuple[str, ...] | None = None
    if status is not None:
        names = [s.strip() for s in (status.split(",") if isinstance(status, str) else status)]
        known = {s.value for s in RunStatus}
        for s in names:
            if s not in known:
                raise ValueError(f"status {s!r}: use one of {', '.join(sorted(known))}")
            if s in KEEP_STATUSES:
                raise ValueError(f"status {s!r}: prune never removes a {s} run; finish or cancel it first")
        statuses = tuple(names)
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0):
        raise ValueError(f"keep_last={keep_last!r}: use a whole number >= 0")
    if older is None and statuses is None and name is None and keep_last is None:
        raise ValueError(
            "prune needs at least one filter (older_than, status, name or keep_last), so that it never "
            "removes every run by accident; e.g. older_than='30d'"
        )
    return PruneRequest(older, statuses, name, keep_last, now)


def prune_chunks(chosen: list[RunInfo]) -> list[list[RunInfo]]:
    """``chosen`` split into the groups deleted one transaction each."""
    per = PRUNE_ROOTS_PER_TRANSACTION
    return [chosen[i : i + per] for i in range(0, len(chosen), per)]


def merge_reports(parts: list[PruneReport], dry_run: bool) -> PruneReport:
    """One report for a prune made in several transactions."""
    total = PruneReport(roots=[], dry_run=dry_run)
    for part in parts:
        total.roots.extend(part.roots)
        total.skipped.extend(part.skipped)
        total.runs += part.runs
        total.steps += part.steps
        total.blobs += part.blobs
        total.questions += part.questions
        total.bytes_freed += part.bytes_freed
    return total
