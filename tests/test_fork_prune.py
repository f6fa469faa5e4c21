"""fn.fork, store.prune and `loomc fork|prune|db vacuum`: the original untouched, shared states, whole trees."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import loomc
from loomc import Budget, LoomcError, MemoryStore, PostgresStore, RunStatus, SQLiteStore, StateError, loop, predicate
from loomc.store.codec import encode
from loomc.store.open import open_store
from loomc.store.postgres import is_dsn
from loomc.store.protocol import NewRun, StepRow
from loomc.store.sqlite.sql import now_iso

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TABLES = ("runs", "steps", "blobs", "questions", "holds")


def cli(*args: str, db: str) -> subprocess.CompletedProcess[str]:
    """Run ``loomc ARGS --db DB`` in a child process."""
    return subprocess.run([sys.executable, "-m", "loomc", *args, "--db", db], capture_output=True, text=True, env=ENV, timeout=120)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database, as ``checkpoint=`` and ``--db`` name it: a SQLite file, or a PostgreSQL DSN (its own schema)."""
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_dsn"))
    return str(tmp_path / "loomc.db")


def query(db: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The rows of one statement (``?`` placeholders), read on a connection of the test's own."""
    if is_dsn(db):
        import psycopg

        with psycopg.connect(db) as conn:
            rows = conn.execute(sql.replace("?", "%s"), args).fetchall()  # type: ignore[call-overload]
        return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in rows]
    with contextlib.closing(sqlite3.connect(db)) as lite:
        return lite.execute(sql, args).fetchall()


def rows_of(db: str, run_id: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every stored row of one run (its run row, steps, the blobs they use, questions)."""
    return {
        "runs": query(db, "SELECT * FROM runs WHERE id = ?", (run_id,)),
        "steps": query(db, "SELECT * FROM steps WHERE run_id = ? ORDER BY step_n", (run_id,)),
        "blobs": query(db, "SELECT * FROM blobs WHERE id IN (SELECT blob_id FROM steps WHERE run_id = ?) ORDER BY id", (run_id,)),
        "questions": query(db, "SELECT * FROM questions WHERE run_id = ?", (run_id,)),
    }


def counter(db: str, steps: int = 6, big: bool = False) -> Any:
    """A loop counting to ``steps`` (each step charges $0.10; ``big``: 100 KB states, stored as blobs and deltas)."""

    @loop(budget=Budget(iterations=steps, usd=10.0), checkpoint=db, name="tests:counter",
          converge_on=predicate(lambda h: h[-1].state["n"] >= steps))
    def count(state: dict[str, Any]) -> dict[str, Any]:
        loomc.charge(0.10)
        pad = "".join(chr(97 + (state["n"] * 7 + i) % 26) for i in range(100_000)) if big else ""
        return {"n": state["n"] + 1, "seen": [*state["seen"], state["n"]], "pad": pad}

    return count


@pytest.mark.parametrize("big", [False, True])
def test_fork_keeps_history_and_budget_and_leaves_the_original_untouched(db: str, big: bool) -> None:
    """The fork has steps 0..k, the budget used at k, forked_from; the original's rows are byte-for-byte the same."""
    count = counter(db, big=big)
    rid = count.run({"n": 0, "seen": [], "pad": ""}).run_id
    before = rows_of(db, rid)
    fid = count.fork(rid, at_step=2)
    assert rows_of(db, rid) == before
    store = count.store()
    info = store.get_run(fid)
    assert (info.forked_from, info.forked_step, info.steps) == (rid, 2, 3)
    assert info.cost_usd == pytest.approx(0.30)
    assert info.budget == store.get_run(rid).budget
    assert info.status is RunStatus.INTERRUPTED
    assert [s.state["n"] for s in store.load_steps(fid)] == [1, 2, 3]
    assert [s.state for s in store.load_steps(fid)] == [s.state for s in store.load_steps(rid)[:3]]
    final = count.resume_run(fid)
    assert final.status is RunStatus.COMPLETED
    assert final.state["seen"] == [0, 1, 2, 3, 4, 5]
    assert final.cost_usd == pytest.approx(0.60)  # 0.30 carried over + 3 new steps
    assert rows_of(db, rid) == before
    if big:
        shared = query(  # the fork's history points at the original's blobs: none was copied
            db, "SELECT COUNT(*) FROM steps a JOIN steps b ON a.blob_id = b.blob_id WHERE a.run_id = ? AND b.run_id = ?",
            (fid, rid),
        )[0][0]
        assert shared >= 1


def test_fork_at_step_zero_and_at_the_last_step(db: str) -> None:
    """Step 0 keeps one step; the last step keeps them all (the fork of a completed run completes at once)."""
    count = counter(db)
    rid = count.run({"n": 0, "seen": [], "pad": ""}).run_id
    first = count.fork(rid, at_step=0)
    assert count.store().get_run(first).steps == 1
    assert count.resume(first)["seen"] == [0, 1, 2, 3, 4, 5]
    last = count.fork(rid, at_step=5)
    assert count.store().get_run(last).steps == 6
    result = count.resume_run(last, budget=Budget(iterations=8))
    assert result.steps == 6 or result.status is RunStatus.COMPLETED


def test_fork_with_an_edited_state_and_new_limits(db: str) -> None:
    """The fork continues from the given state (checked like any state) under the limits given."""
    count = counter(db)
    rid = count.run({"n": 0, "seen": [], "pad": ""}).run_id
    fid = count.fork(rid, at_step=1, state={"n": 4, "seen": ["edited"], "pad": ""}, budget=Budget(usd=0.35))
    store = count.store()
    assert store.get_run(fid).budget["usd"] == 0.35
    assert store.get_run(fid).budget["iterations"] == 6
    result = count.resume_run(fid)
    assert result.status is RunStatus.BUDGET_EXHAUSTED  # 0.20 carried, then one more step fits under 0.35
    assert result.state["seen"] == ["edited", 4]
    assert result.cost_usd == pytest.approx(0.30)


def test_fork_of_a_pydantic_state_is_validated(db: str) -> None:
    """An edited state that does not fit the run's state type is refused before anything is written."""
    import pydantic

    global Point  # importable by its name, as a run's state type must be

    class Point(pydantic.BaseModel):
        x: int

    @loop(budget=Budget(iterations=2), checkpoint=db)
    def move(state: Point) -> Point:
        return Point(x=state.x + 1)

    rid = move.run(Point(x=0)).run_id
    runs_before = len(move.store().list_runs())
    with pytest.raises(StateError, match="does not fit"):
        move.fork(rid, at_step=0, state={"x": "not a number"})
    assert len(move.store().list_runs()) == runs_before
    fid = move.fork(rid, at_step=0, state={"x": 10})
    assert move.store().load_state(fid, 0) == Point(x=10)


def test_bad_step_numbers_and_what_cannot_be_forked(db: str) -> None:
    """A step outside 0..last, a nested run, a graph run: clear errors, nothing written."""
    count = counter(db)
    rid = count.run({"n": 0, "seen": [], "pad": ""}).run_id
    for bad in (-1, 6, 100):
        with pytest.raises(ValueError, match=r"steps 0\.\.5"):
            count.fork(rid, at_step=bad)
    store = count.store()
    child = store.begin_run(NewRun(spec_hash="x", parent_run_id=rid, parent_step=0, call_index=0))
    with pytest.raises(LoomcError, match="nested"):
        count.fork(child, at_step=0)
    graph = store.begin_run(NewRun(spec_hash="g", kind="graph"))
    with pytest.raises(LoomcError, match="graph run"):
        count.fork(graph, at_step=0)
    assert len(store.list_runs()) == 3


def test_fork_then_prune_the_original(db: str) -> None:
    """Pruning the original keeps the blobs its fork shares: the fork still reads every state."""
    count = counter(db, big=True)
    rid = count.run({"n": 0, "seen": [], "pad": ""}).run_id
    fid = count.fork(rid, at_step=3)
    store = count.store()
    expected = [s.state for s in store.load_steps(fid)]
    report = store.prune(status="completed", name="tests:counter", keep_last=0)
    assert [r.id for r in report.roots] == [rid]
    assert store.get_run(rid) is None
    assert [s.state for s in store.load_steps(fid)] == expected
    assert count.resume(fid)["seen"] == [0, 1, 2, 3, 4, 5]
    report = store.prune(status="completed")
    assert [r.id for r in report.roots] == [fid]
    assert {t: query(db, f"SELECT COUNT(*) FROM {t}")[0][0] for t in TABLES} == dict.fromkeys(TABLES, 0)


def test_prune_deletes_whole_trees_never_waiting_or_running(db: str) -> None:
    """A graph's or a nested loop's tree goes whole; a waiting run and a live running run stay."""
    store = open_store(db)
    parent = store.begin_run(NewRun(spec_hash="p", name="tests:tree"))
    child = store.begin_run(NewRun(spec_hash="c", name="tests:leaf", parent_run_id=parent, parent_step=0, call_index=0))
    done = StepRow(0, '{"a": 1}', 0.1, None, now_iso(), None, None, 0, 0.0, 0.1, 1, 0.0, 0.1, "completed", None, (parent,))
    store.commit_step(child, done)
    store.finish_run(parent, RunStatus.COMPLETED, None, 0.0)
    waiting = store.begin_run(NewRun(spec_hash="w", name="tests:tree"))
    store.update_run_status(waiting, RunStatus.WAITING)
    live = store.begin_run(NewRun(spec_hash="l", name="tests:tree", owner=loomc.store.lease.owner_token()))
    with pytest.raises(ValueError, match="never removes a waiting"):
        store.prune(status="waiting")
    with pytest.raises(ValueError, match="at least one filter"):
        store.prune()
    report = store.prune(name="tests:*", older_than=0)
    assert [r.id for r in report.roots] == [parent]
    assert (report.runs, report.steps) == (2, 1)
    assert {r.id for r in store.list_runs()} == {waiting, live}


def test_prune_on_the_memory_store() -> None:
    """The memory store prunes the same way."""
    store = MemoryStore()

    @loop(budget=Budget(iterations=2), checkpoint=store)
    def two(state: int) -> int:
        return state + 1

    ids = [two.run(i).run_id for i in range(4)]
    assert [r.id for r in store.prune(keep_last=1, dry_run=True).roots] == ids[2::-1]
    assert len(store.list_runs()) == 4
    report = store.prune(keep_last=1)
    assert (len(report.roots), report.steps) == (3, 6)
    assert [r.id for r in store.list_runs()] == [ids[3]]


BUSY = textwrap.dedent(
    """
    import sys
    from loomc import Budget, loop

    @loop(budget=Budget(iterations=int(sys.argv[2])), checkpoint=sys.argv[1], name="tests:busy", durability="process")
    def busy(state):
        return {"n": state["n"] + 1, "pad": "x" * 5000}

    result = busy.run({"n": 0, "pad": ""})
    print(result.run_id, result.steps, flush=True)
    """
)


def make_runs(store: Any, n: int, status: RunStatus, name: str) -> list[str]:
    """``n`` finished runs of two steps each, written through the store (each with a compressed state)."""
    ids = []
    for _ in range(n):
        rid = store.begin_run(NewRun(spec_hash="h", name=name))
        for step in range(2):
            last = step == 1
            blob = encode({"pad": os.urandom(1000).hex()}, compress_at=0) if last else '{"s": 0}'
            store.commit_step(rid, StepRow(step, blob, 0.01, None, now_iso(), None, None, step, 0.0, 0.01 * (step + 1),
                                           step + 1, 0.0, 0.01, status.value if last else "running", None))
        ids.append(rid)
    return ids


def test_prune_ten_thousand_runs_while_a_loop_commits(tmp_path: Path) -> None:
    """10,000 runs pruned by age and status while another process commits; vacuum gives the space back."""
    db = str(tmp_path / "big.db")
    store = SQLiteStore(db, durability="process")
    old_done = make_runs(store, 4000, RunStatus.COMPLETED, "tests:old")
    old_failed = make_runs(store, 3000, RunStatus.FAILED, "tests:old")
    time.sleep(0.01)
    cutoff = time.time()
    time.sleep(0.01)
    new_done = make_runs(store, 3000, RunStatus.COMPLETED, "tests:new")
    script = tmp_path / "busy.py"
    script.write_text(BUSY)
    size_before = os.path.getsize(db) + os.path.getsize(db + "-wal")

    dry = cli("prune", "--status", "completed", "--name", "tests:old", "--dry-run", "--json", db=db)
    assert dry.returncode == 0, dry.stderr
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 10_000

    busy = subprocess.Popen([sys.executable, str(script), db, "400"], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        report = store.prune(status=["completed"], older_than=1.0, now=cutoff + 1.0)
    finally:
        out, _ = busy.communicate(timeout=120)
    assert busy.returncode == 0
    busy_id, busy_steps = out.split()
    assert int(busy_steps) == 400
    assert {r.id for r in report.roots} == set(old_done)
    assert json.loads(dry.stdout)["runs"] == 4000
    assert json.loads(dry.stdout)["bytes_freed"] > 0
    assert report.steps == 8000
    assert report.blobs == 4000
    left = {r.id for r in store.list_runs()}
    assert left == {*old_failed, *new_done, busy_id}
    assert len(store.load_steps(busy_id)) == 400  # every step the loop committed meanwhile is there

    cleared = cli("prune", "--status", "failed,completed", "--name", "tests:old", db=db)
    assert cleared.returncode == 0, cleared.stderr
    assert "removed 3000 run trees" in cleared.stdout
    vacuum = cli("db", "vacuum", db=db)
    assert vacuum.returncode == 0, vacuum.stderr
    size_after = os.path.getsize(db) + (os.path.getsize(db + "-wal") if os.path.exists(db + "-wal") else 0)
    assert size_after < size_before / 2


def contents(db: str) -> Any:
    """What a database holds: a SQLite file byte for byte (its log copied in), every row of a PostgreSQL schema."""
    if is_dsn(db):
        return {t: sorted(query(db, f"SELECT * FROM {t}"), key=repr) for t in (*TABLES, "loomc_schema")}
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return Path(db).read_bytes()


def test_dry_run_changes_nothing(db: str) -> None:
    """`loomc prune --dry-run` lists what would go and leaves the database as it was (a file byte for byte)."""
    count = counter(db)
    for _ in range(3):
        count.run({"n": 0, "seen": [], "pad": ""})
    count.store().close()
    before = contents(db)
    out = cli("prune", "--status", "completed", "--dry-run", db=db)
    assert out.returncode == 0, out.stderr
    assert "would remove 3 run trees" in out.stdout
    assert contents(db) == before


def test_cli_fork(db: str, tmp_path: Path) -> None:
    """`loomc fork RUN --step K [--state JSON|--state-file F]`; `show` says forked from; bad steps are refused."""
    count = counter(db)
    rid = count.run({"n": 0, "seen": [], "pad": ""}).run_id
    before = rows_of(db, rid)
    out = cli("fork", rid[:8], "--step", "2", db=db)
    assert out.returncode == 0, out.stderr
    fid = out.stdout.split("new run ")[1].split()[0]
    assert f"forked from  {rid} at step 2" in cli("show", fid, db=db).stdout
    state = tmp_path / "state.json"
    state.write_text('{"n": 10, "seen": [], "pad": ""}')
    edited = cli("fork", rid, "--step", "0", "--state-file", str(state), db=db)
    assert edited.returncode == 0, edited.stderr
    eid = edited.stdout.split("new run ")[1].split()[0]
    assert open_store(db).load_state(eid, 0) == {"n": 10, "seen": [], "pad": ""}
    bad = cli("fork", rid, "--step", "9", db=db)
    assert bad.returncode == 2
    assert "steps 0..5" in bad.stderr
    both = cli("fork", rid, "--step", "1", "--state", "{}", "--state-file", str(state), db=db)
    assert both.returncode == 2
    assert rows_of(db, rid) == before


def test_prune_on_postgres_while_a_loop_commits_and_vacuum(pg_dsn: str, tmp_path: Path) -> None:
    """PostgreSQL, on a smaller scale: runs pruned by age and status while another process commits; `loomc db
    vacuum` reports the tables' sizes, and the space the pruned runs took is used again by new ones."""
    store = PostgresStore(pg_dsn, durability="process")
    old_done = make_runs(store, 300, RunStatus.COMPLETED, "tests:old")
    old_failed = make_runs(store, 150, RunStatus.FAILED, "tests:old")
    time.sleep(0.01)
    cutoff = time.time()
    time.sleep(0.01)
    new_done = make_runs(store, 150, RunStatus.COMPLETED, "tests:new")
    script = tmp_path / "busy.py"
    script.write_text(BUSY)
    busy = subprocess.Popen([sys.executable, str(script), pg_dsn, "200"], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        report = store.prune(status=["completed"], older_than=1.0, now=cutoff + 1.0)
    finally:
        out, _ = busy.communicate(timeout=120)
    assert busy.returncode == 0
    busy_id, busy_steps = out.split()
    assert int(busy_steps) == 200
    assert {r.id for r in report.roots} == set(old_done)
    assert (report.steps, report.blobs) == (600, 300)
    assert {r.id for r in store.list_runs()} == {*old_failed, *new_done, busy_id}
    assert len(store.load_steps(busy_id)) == 200  # every step the loop committed meanwhile is there

    cleared = cli("prune", "--status", "failed,completed", "--name", "tests:old", db=pg_dsn)
    assert cleared.returncode == 0, cleared.stderr
    assert "removed 150 run trees" in cleared.stdout
    assert "`loomc db vacuum` (with the same --db)" in cleared.stdout
    full = store.table_bytes()
    vacuum = cli("db", "vacuum", db=pg_dsn)
    assert vacuum.returncode == 0, vacuum.stderr
    assert " -> " in vacuum.stdout
    assert "returned" in vacuum.stdout
    make_runs(store, 450, RunStatus.COMPLETED, "tests:again")  # as many as were pruned, in the space they left
    assert store.table_bytes() < full * 1.3  # without the vacuum they would take half as much again
    store.close()
