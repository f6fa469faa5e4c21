"""Whole databases: copy every run from one store to another (``loomc db copy``) and describe one (``loomc db info``).

The reads and writes are sans-I/O operations like ``loomc.store.core``'s, against each
store's dialect, so any two stores with a dialect copy into each other (SQLite and
PostgreSQL, either way). A run tree (a root run and every run below it) is copied in one
transaction of the destination: every column of its runs, every step with its state as
stored (compressed keyframes and deltas byte for byte; the blob rows get the
destination's ids, and a delta names its keyframe by step number, so nothing else
changes; a fork's steps get blobs of their own), the questions its steps asked, and the
reservations it held. Leases are not copied: a run stored as running
names no owner in the copy but a marker no process holds, so it reads as ``crashed``
there and resumes from its last step.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loomc._core.errors import LoomcError
from loomc._core.types import RunStatus
from loomc.store.core import EXEC, INSERT, QUERY, Op

__all__ = ["CopyReport", "DbInfo", "copy_runs", "db_info", "open_for_copy"]

#: The owner a copied running run names: no process has this token, so it reads as crashed.
COPIED_OWNER = "loomc-db-copy"

# The indexes of ``ALL_RUN_COLS`` the copy rewrites.
_ID, _STATUS, _PARENT, _OWNER, _HEARTBEAT, _INPUT = 0, 2, 7, 19, 20, 27


@dataclass
class CopyReport:
    """What a copy did: runs, steps and reservations copied; trees skipped (already in the destination)."""

    runs: int = 0
    steps: int = 0
    holds: int = 0
    skipped: list[str] = field(default_factory=list)


@dataclass
class DbInfo:
    """What ``loomc db info`` shows."""

    where: str
    kind: str
    schema_version: int
    runs: int
    steps: int
    bytes: int


def _dialect(store: Any) -> Any:
    """The SQL dialect module of a store that has one."""
    from loomc.store.postgres.sync import PostgresStore
    from loomc.store.sqlite.sync import SQLiteStore

    if isinstance(store, PostgresStore):
        from loomc.store.postgres import sql as pg_sql

        return pg_sql
    if isinstance(store, SQLiteStore):
        from loomc.store.sqlite import sql as lite_sql

        return lite_sql
    raise LoomcError(f"{store!r} is neither a SQLite nor a PostgreSQL store; `loomc db` works on those two")


def open_for_copy(db: Path | str, *, create: bool) -> Any:
    """The store at ``db`` (a SQLite file or a PostgreSQL DSN): a reader, or a writer when ``create``."""
    if isinstance(db, str):
        from loomc.store.postgres.sync import PostgresStore

        return PostgresStore(db, create=create, max_size=2)
    from loomc.store.sqlite.sync import SQLiteStore

    return SQLiteStore(db, create=create)


def _dump_runs(d: Any) -> Op:
    return list((yield QUERY, d.DUMP_RUNS, ()))


def _dump_tree(d: Any, ids: list[str]) -> Op:
    """Every step and every question of the runs ``ids`` (by run id)."""
    steps, questions = {}, {}
    for rid in ids:
        steps[rid] = list((yield QUERY, d.DUMP_STEPS, (rid,)))
        questions[rid] = list((yield QUERY, d.DUMP_QUESTIONS, (rid,)))
    return steps, questions


def _dump_holds(d: Any) -> Op:
    return list((yield QUERY, d.DUMP_HOLDS, ()))


def _existing(d: Any, ids: list[str]) -> Op:
    found = []
    for rid in ids:
        if (yield QUERY, d.SELECT_EXISTING, (rid,)):
            found.append(rid)  # noqa: PERF401 - a request per id: no yield in a comprehension
    return found


def _load_tree(
    d: Any, runs: list[tuple[Any, ...]], steps: dict[str, list[tuple[Any, ...]]],
    questions: dict[str, list[tuple[Any, ...]]], holds: list[tuple[Any, ...]],
) -> Op:
    """Insert a tree's runs, steps (blobs get new ids), questions and holds, as read from another store."""
    for run in runs:
        row = list(run)
        if row[_STATUS] == RunStatus.RUNNING.value:
            row[_OWNER], row[_HEARTBEAT] = COPIED_OWNER, None
        else:
            row[_OWNER], row[_HEARTBEAT] = None, None
        yield EXEC, d.LOAD_RUN, (*row[:_INPUT], *d.state_params(row[_INPUT]))
        for step_n, state, cost, score, ts, error, event, next_from, duration in steps[run[_ID]]:
            blob_id = None
            if isinstance(state, (bytes, bytearray, memoryview)):
                blob_id = yield INSERT, d.INSERT_BLOB, (bytes(state),)
                state = None
            yield EXEC, d.INSERT_STEP, (run[_ID], step_n, state, cost, score, ts, error, event, next_from, duration, blob_id)
        for question in questions[run[_ID]]:
            yield EXEC, d.LOAD_QUESTION, question
    for hold in holds:
        yield EXEC, d.LOAD_HOLD, hold


def _trees(runs: list[tuple[Any, ...]]) -> list[list[tuple[Any, ...]]]:
    """The runs grouped by run tree (a root and its descendants), roots in creation order, parents first."""
    by_id = {r[_ID]: r for r in runs}
    kids: dict[str, list[tuple[Any, ...]]] = {}
    roots = []
    for r in runs:
        parent = r[_PARENT]
        if parent is not None and parent in by_id:
            kids.setdefault(parent, []).append(r)
        else:
            roots.append(r)  # a root (or an orphan, whose parent is gone: it travels as its own tree)
    trees = []
    for root in roots:
        tree, todo = [], [root]
        while todo:
            r = todo.pop(0)
            tree.append(r)
            todo.extend(kids.get(r[_ID], ()))
        trees.append(tree)
    return trees


def copy_runs(
    src: Any, dst: Any, *, skip_existing: bool = False, progress: Callable[[int, int], None] | None = None
) -> CopyReport:
    """Copy every run tree of ``src`` into ``dst`` (two sync stores: SQLite or PostgreSQL).

    Args:
        skip_existing: skip the trees with a run id ``dst`` already has, instead of
            refusing the copy.
        progress: called with ``(trees done, trees in all)`` after each tree.

    Raises:
        LoomcError: ``dst`` already has some of the run ids (nothing is copied), unless
            ``skip_existing``; or a store is not SQLite or PostgreSQL.
    """
    sd, dd = _dialect(src), _dialect(dst)
    runs = src.run_read(lambda: _dump_runs(sd))
    holds = src.run_read(lambda: _dump_holds(sd))
    trees = _trees(runs)
    clashes = dst.run_read(lambda: _existing(dd, [r[_ID] for r in runs]))
    if clashes and not skip_existing:
        shown = ", ".join(clashes[:5]) + (f" and {len(clashes) - 5} more" if len(clashes) > 5 else "")
        raise LoomcError(
            f"{dst.path} already has {len(clashes)} of the run ids being copied ({shown}); nothing was copied. "
            "Copy into another database, or pass --skip-existing to copy only the run trees it lacks"
        )
    clash = set(clashes)
    report = CopyReport()
    holds_of: dict[str, list[tuple[Any, ...]]] = {}
    for hold in holds:
        holds_of.setdefault(hold[1], []).append(hold)
    for done, tree in enumerate(trees, 1):
        ids = [r[_ID] for r in tree]
        if clash.intersection(ids):
            report.skipped.append(ids[0])
        else:
            steps, questions = src.run_read(lambda ids=ids: _dump_tree(sd, ids))
            tree_holds = [h for rid in ids for h in holds_of.get(rid, ())]
            dst.run_write(
                lambda beat, tree=tree, steps=steps, questions=questions, tree_holds=tree_holds: _load_tree(
                    dd, tree, steps, questions, tree_holds
                )
            )
            report.runs += len(tree)
            report.steps += sum(len(s) for s in steps.values())
            report.holds += len(tree_holds)
        if progress is not None:
            progress(done, len(trees))
    return report


def _stats(d: Any) -> Op:
    version = yield QUERY, d.SELECT_VERSION, ()
    runs = yield QUERY, d.COUNT_RUNS, ()
    steps = yield QUERY, d.COUNT_STEPS, ()
    size = (yield QUERY, d.TABLES_SIZE, ())[0][0] if hasattr(d, "TABLES_SIZE") else None
    return int(version[0][0]), int(runs[0][0]), int(steps[0][0]), size


def db_info(store: Any) -> DbInfo:
    """Schema version, runs, steps and size of a SQLite or PostgreSQL store."""
    d = _dialect(store)
    version, runs, steps, size = store.run_read(lambda: _stats(d))
    if size is None:  # a SQLite file: the file and its write-ahead log
        size = sum(os.path.getsize(p) for p in (store.path, f"{store.path}-wal") if os.path.exists(p))
    return DbInfo(str(store.path), "postgresql" if hasattr(d, "TABLES_SIZE") else "sqlite", version, runs, steps, int(size))

