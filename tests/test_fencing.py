"""Fenced leases: a paused owner is taken over, and nothing it writes afterwards lands."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loomc import LeaseLost, LoomcError, PostgresStore, RunLocked, RunStatus, SQLiteStore
from loomc.store import core
from loomc.store.postgres import sql as pg_sql
from loomc.store.protocol import NewRun, StepRow
from loomc.store.sqlite import sql as _sql

ROOT = Path(__file__).resolve().parent.parent
TTL = 2.0

SUBJECT = """
import os, sys, time
import loomc
from loomc import Budget, LeaseLost, PostgresStore, RunLocked, SQLiteStore, loop, predicate
from loomc.store.postgres import is_dsn

db, mode, run_id = sys.argv[1], sys.argv[2], sys.argv[3]
store = (PostgresStore if is_dsn(db) else SQLiteStore)(db, lease_ttl=float(sys.argv[4]))
db_release = sys.argv[5]


@loop(checkpoint=store, budget=Budget(usd=5.0, iterations=100), cost_fn=lambda s: 0.01,
      converge_on=predicate(lambda h: h[-1].state["n"] >= 12), name="fenced")
def work(state):
    print(f"enter {state['n']}", flush=True)
    if mode == "slow":  # the first owner: each step holds a reservation across a slow call
        with loomc.reserve(0.05) as hold:
            time.sleep(0.3)
            while state["n"] == 4 and not os.path.exists(db_release):  # step 4's call lasts until the test says
                time.sleep(0.01)
            hold.settle(0.02)
    return {"n": state["n"] + 1, "by": mode}


try:
    result = work.run({"n": 0}, run_id=run_id) if mode == "slow" else work.resume_run(run_id)
    print("done", result.status.value, result.steps, flush=True)
except LeaseLost as exc:
    print("lost", exc, flush=True)
    sys.exit(3)
except RunLocked as exc:
    print("locked", exc, flush=True)
    sys.exit(4)
"""


def spawn(script: Path, db: str, mode: str, run_id: str) -> subprocess.Popen[str]:
    """The subject in a process of its own (this checkout's loomc); its step 4 waits for ``release_file``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, str(script), db, mode, run_id, str(TTL), str(release_file(script))], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env,
    )


def release_file(script: Path) -> Path:
    """The file whose existence ends the slow owner's step 4."""
    return script.with_name("release")


def read_until(stream: IO[str], prefix: str, timeout: float = 60.0) -> str:
    """Lines of ``stream`` until one starts with ``prefix`` (that line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            raise AssertionError(f"the process ended before printing {prefix!r}")
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no {prefix!r} within {timeout}s")


class Db:
    """One database of either kind, read and written behind the stores' backs (the test's own connection)."""

    def __init__(self, kind: str, target: str) -> None:
        self.kind, self.target = kind, target
        self.sql: Any = pg_sql if kind == "postgres" else _sql

    def store(self, **options: Any) -> Any:
        """A store on this database."""
        return PostgresStore(self.target, **options) if self.kind == "postgres" else SQLiteStore(self.target, **options)

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        """Run one statement in its own transaction (``?`` placeholders); its rows."""
        if self.kind == "postgres":
            import psycopg

            with psycopg.connect(self.target, autocommit=True) as con:
                cur = con.execute(sql.replace("?", "%s"), args)  # type: ignore[call-overload]
                return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in cur.fetchall()] if cur.description else []
        with contextlib.closing(sqlite3.connect(self.target, isolation_level=None)) as con:
            return con.execute(sql, args).fetchall()

    def free(self) -> bool:
        """Whether no process holds a transaction that writes to the runs (a paused one could hold it)."""
        if self.kind == "postgres":
            import psycopg

            with psycopg.connect(self.target) as con:
                try:
                    con.execute("SELECT id FROM runs FOR UPDATE NOWAIT").fetchall()
                except psycopg.errors.LockNotAvailable:
                    return False
                return True
        with contextlib.closing(sqlite3.connect(self.target, timeout=0.2, isolation_level=None)) as con:
            try:
                con.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:
                return False
            con.execute("ROLLBACK")
            return True

    def snapshot(self) -> dict[str, Any]:
        """Every row a run writes, to compare before and after the old owner wakes up."""
        return {
            "runs": self.execute("SELECT * FROM runs ORDER BY id"),
            "steps": self.execute("SELECT * FROM steps ORDER BY run_id, step_n"),
            "holds": self.execute("SELECT * FROM holds ORDER BY hold_id"),
            "blobs": self.execute("SELECT * FROM blobs ORDER BY id"),
        }

    def lease_expired(self, run_id: str) -> bool:
        """Whether the run's lease has ended by the database's clock."""
        return bool(self.execute(f"SELECT {self.sql.EXPIRED} FROM runs WHERE id = ?", (run_id,))[0][0])

    def take_over_behind_its_back(self, run_id: str) -> None:
        """What another process's takeover does to the row: the next epoch, another owner."""
        self.execute("UPDATE runs SET epoch = epoch + 1, owner = 'far-away-host:7:7' WHERE id = ?", (run_id,))


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Db:
    """A fresh database: a SQLite file, or a schema of the session's PostgreSQL server."""
    if request.param == "postgres":
        return Db("postgres", request.getfixturevalue("pg_dsn"))
    return Db("sqlite", str(tmp_path / "f.db"))


@contextlib.contextmanager
def reaped(*procs: subprocess.Popen[str]) -> Iterator[None]:
    """Never leave a stopped or running subject behind."""
    try:
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)
                    p.kill()
                p.wait(10)


def test_a_paused_owner_is_taken_over_and_its_late_writes_never_land(tmp_path: Path, db: Db) -> None:
    """SIGSTOP the owner mid-step past its lease: another process takes the run over (epoch 2), charges
    the reservation the paused step held in full, and completes the run. SIGCONT the old owner: its
    next write raises LeaseLost, and not one row changes."""
    run_id = "fenced-run"
    script = tmp_path / "subject.py"
    script.write_text(SUBJECT)
    old = spawn(script, db.target, "slow", run_id)
    assert old.stdout is not None
    with reaped(old):
        read_until(old.stdout, "enter 4")  # steps 0-3 committed, step 4 holds $0.05 mid-call
        # while the owner lives and renews its lease, nobody takes the run
        early = spawn(script, db.target, "fast", run_id)
        out, err = early.communicate(timeout=60)
        assert early.returncode == 4, (out, err)
        assert "running in live process" in out
        for _ in range(50):  # pause it outside a transaction (a heartbeat could be mid-commit)
            os.kill(old.pid, signal.SIGSTOP)
            if db.free():
                break
            os.kill(old.pid, signal.SIGCONT)
            time.sleep(0.01)
        else:
            raise AssertionError("the owner never let go of the database")
        deadline = time.monotonic() + 30
        while not db.lease_expired(run_id):  # the database's clock decides
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with contextlib.closing(db.store()) as reader:
            assert reader.get_run(run_id).status is RunStatus.CRASHED

        new = spawn(script, db.target, "fast", run_id)
        out, err = new.communicate(timeout=120)
        assert new.returncode == 0, (out, err)
        assert out.splitlines()[-1] == "done completed 12"
        before = db.snapshot()

        release_file(script).touch()  # the paused owner's call returns as soon as it runs again
        os.kill(old.pid, signal.SIGCONT)
        out, err = old.communicate(timeout=60)
        assert old.returncode == 3, (out, err)
        lost = out.splitlines()[-1]
        assert lost.startswith(f"lost run {run_id} was taken over"), lost
        assert "resume it yourself only once that process is gone" in lost
        assert db.snapshot() == before  # nothing the old owner did after the takeover landed

    store = db.store()
    try:
        info = store.get_run(run_id)
        assert info is not None
        assert info.status is RunStatus.COMPLETED
        steps = store.load_steps(run_id)
        assert [s.step_n for s in steps] == list(range(12))
        assert [s.state["by"] for s in steps] == ["slow"] * 4 + ["fast"] * 8
        # 4 slow steps ($0.02 settled + $0.01), the paused step's open $0.05 hold charged in full, 8 fast steps
        assert info.cost_usd == pytest.approx(4 * 0.03 + 0.05 + 8 * 0.01)
        assert [c["usd"] for c in info.meta["held_charges"]] == [pytest.approx(0.05)]
        assert db.execute("SELECT epoch FROM runs WHERE id = ?", (run_id,)) == [(2,)]
        assert db.execute("SELECT count(*) FROM holds") == [(0,)]
    finally:
        store.close()


# -- the fencing invariant, on the store core: no write with a stale epoch ever lands ---------------


_examples = itertools.count()


class Writers:
    """Owners of one run, each remembering the epoch it acquired, driving the core through the store's
    own transaction driver (for PostgreSQL: the pipelined one, fenced writes sent ahead of their check)."""

    def __init__(self, db: Db, store: Any) -> None:
        self.d, self.store = db.sql, store
        self.rid = f"r{next(_examples)}"
        self.ph = "%s" if db.kind == "postgres" else "?"
        self.epochs: dict[int, int] = {}
        new = NewRun(spec_hash="h", run_id=self.rid, owner="elsewhere:1:1")
        self.run(lambda: core.begin_run(self.d, "db", new, self.rid, 30.0))
        self.epochs[0] = 1
        self.steps = 0
        self.holds = 1000 * int(self.rid[1:])

    def run(self, op_for: Callable[[], core.Op]) -> Any:
        """The operation ``op_for()`` makes, in one transaction of the store, rolled back whole if it raises.

        (A store may make it again: a fenced write sent ahead of its check runs again when refused.)
        """
        return self.store.run_write(lambda beat: op_for())

    def rows(self) -> Any:
        def read() -> core.Op:
            out = []
            for table, key in (("runs", "id"), ("steps", "run_id"), ("holds", "run_id")):
                out.append((yield core.QUERY, f"SELECT * FROM {table} WHERE {key} = {self.ph}", (self.rid,)))
            return out

        return self.store.run_read(read)

    def end_lease(self) -> None:
        """The lease ends (a takeover is tried only then)."""
        def op(beat: float) -> core.Op:
            yield core.EXEC, f"UPDATE runs SET lease_until = 0 WHERE id = {self.ph}", (self.rid,)

        self.store.run_write(op)

    def write(self, who: int, kind: str) -> Callable[[], core.Op]:
        """One write of ``kind`` by writer ``who`` with the epoch it holds."""
        epoch, d, rid = self.epochs[who], self.d, self.rid
        if kind == "step":
            n = self.steps
            row = StepRow(n, json.dumps({"n": n}), 0.01, None, "2026-01-01T00:00:00+00:00", None, None, n, 0.0,
                          0.01 * (n + 1), n + 1, 0.0, 0.01, "running", None)
            return lambda: core.commit_step(d, rid, row, 30.0, epoch)
        if kind == "finish":
            return lambda: core.finish_run(d, rid, RunStatus.INTERRUPTED, "interrupted: x", 1.0, epoch)
        if kind == "meta":
            return lambda: core.set_meta(d, rid, {"by": who}, epoch)
        if kind == "cost":
            return lambda: core.add_cost(d, rid, 0.5, epoch)
        if kind == "hold":
            self.holds += 1
            hold_id = self.holds
            return lambda: core.put_hold(d, rid, hold_id, 0.1, epoch)
        return lambda: core.renew_leases(d, "elsewhere:1:1", [(rid, epoch)], 30.0)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["acquire", "step", "finish", "meta", "cost", "hold", "renew"])),
                min_size=1, max_size=25))
def test_no_write_with_a_stale_epoch_ever_lands(db: Db, ops: list[tuple[int, str]]) -> None:
    """Any interleaving of takeovers and writes by three owners: a write lands exactly when its writer's
    epoch is the run's; any other is refused (LeaseLost, or a renewal reported lost) and changes no row."""
    with contextlib.closing(db.store()) as store:
        check_interleaving(Writers(db, store), ops)


def check_interleaving(w: Writers, ops: list[tuple[int, str]]) -> None:
    """Play ``ops`` (writer, write) and check each write landed exactly when it should have."""
    current = 1
    for who, kind in ops:
        if kind == "acquire":
            w.end_lease()
            w.epochs[who] = w.run(lambda: core.acquire(w.d, "db", w.rid, "elsewhere:1:1", None, 30.0))
            current += 1
            assert w.epochs[who] == current
            continue
        if who not in w.epochs:
            continue  # never acquired: it has nothing to write with
        before = w.rows()
        fresh = w.epochs[who] == current
        if kind == "renew":
            lost = w.run(w.write(who, kind))
            assert lost == ([] if fresh else [w.rid])
            if not fresh:
                assert w.rows() == before
            continue
        if fresh:
            w.run(w.write(who, kind))
            if kind == "step":
                w.steps += 1
        else:
            with pytest.raises(LeaseLost) as info:
                w.run(w.write(who, kind))
            assert (info.value.epoch, info.value.now_epoch) == (w.epochs[who], current)
            assert w.rows() == before
    def epoch() -> core.Op:
        return (yield core.QUERY, f"SELECT epoch FROM runs WHERE id = {w.ph}", (w.rid,))[0][0]

    assert w.store.run_read(epoch) == current


def test_a_lease_is_decided_by_the_database_clock_and_a_live_owner_keeps_it(db: Db) -> None:
    """A run whose lease is still running is refused to another owner (RunLocked) even when that owner
    names another host; once its lease_until has passed by the database's clock it is taken, epoch + 1."""
    store = db.store(lease_ttl=60)
    try:
        store.begin_run(NewRun(spec_hash="h", run_id="r", owner="far-away-host:1:1"))
        with pytest.raises(RunLocked, match="far-away-host"):
            store.acquire("r", "another-host:2:2")
        db.execute(f"UPDATE runs SET lease_until = {db.sql.NOW} - 1 WHERE id = 'r'")
        assert store.get_run("r").status is RunStatus.CRASHED  # type: ignore[union-attr]
        store.acquire("r", "another-host:2:2")
        assert store.epoch_of("r") == 2
        assert store.get_run("r").status is RunStatus.RUNNING  # type: ignore[union-attr]
    finally:
        store.close()


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf"), "30", True])
def test_a_bad_lease_ttl_is_refused_when_the_store_is_made(tmp_path: Path, ttl: Any) -> None:
    """``lease_ttl`` must be a positive number of seconds; anything else is a ValueError saying so."""
    with pytest.raises(ValueError, match=r"lease_ttl=.*use a positive number of seconds"):
        SQLiteStore(tmp_path / "x.db", lease_ttl=ttl)
    with pytest.raises(ValueError, match=r"lease_ttl=.*use a positive number of seconds"):
        PostgresStore("postgresql://nobody@127.0.0.1:1/none", lease_ttl=ttl)  # refused before any connection


def test_lease_lost_is_a_loomc_error_naming_the_run_and_what_to_do() -> None:
    """The error names the run, says it was taken over, and what to do about it."""
    exc = LeaseLost("abc123", 2, now_epoch=3, owner="host:9:9")
    assert isinstance(exc, LoomcError)
    msg = str(exc)
    assert "run abc123 was taken over by host:9:9" in msg
    assert "epoch 3" in msg
    assert "loomc show abc123" in msg


def test_every_write_of_a_taken_over_run_is_refused_sync_and_async(db: Db) -> None:
    """After a takeover, the old owner's step, finish, meta, cost, hold and wait writes all raise LeaseLost
    (sync store and async store: aiosqlite, psycopg's async pool) and change nothing; its renewal reports
    the run lost."""
    import anyio

    from loomc.store.postgres.aio import AsyncPostgresStore
    from loomc.store.protocol import Question, WaitRow
    from loomc.store.sqlite.aio import AsyncSQLiteStore

    store = db.store()
    try:
        run_id = store.begin_run(NewRun(spec_hash="h", run_id="w", owner="here:1:1"))
        assert store.epoch_of(run_id) == 1
        db.take_over_behind_its_back(run_id)
        before = db.snapshot()
        row = StepRow(0, '{"n": 1}', 0.1, None, "2026-01-01T00:00:00+00:00", None, None, 0, 0.0, 0.1, 1, 0.0, 0.1,
                      "running", None)
        writes = [
            lambda: store.commit_step(run_id, row),
            lambda: store.finish_run(run_id, RunStatus.COMPLETED, None, 1.0),
            lambda: store.set_meta(run_id, {"a": 1}),
            lambda: store.add_cost(run_id, 1.0),
            lambda: store.put_hold(run_id, 77, 0.5),
            lambda: store.wait_for_input(run_id, WaitRow(0.1, 1.0, "waiting", Question(run_id, 0, 0, "ok?", None, None, ""))),
        ]
        for write in writes:
            with pytest.raises(LeaseLost, match=f"run {run_id} was taken over by far-away-host:7:7"):
                write()
        assert store.renew_leases("here:1:1", [run_id]) == [run_id]
        assert db.snapshot() == before

        async def stale_async_writes() -> None:
            twin: Any = AsyncPostgresStore(sync=store) if db.kind == "postgres" else AsyncSQLiteStore(sync=store)
            async with twin as astore:
                with pytest.raises(LeaseLost):
                    await astore.commit_step(run_id, row)
                with pytest.raises(LeaseLost):
                    await astore.finish_run(run_id, RunStatus.COMPLETED, None, 1.0)
                assert await astore.renew_leases("here:1:1", [run_id]) == [run_id]

        anyio.run(stale_async_writes)
        assert db.snapshot() == before
    finally:
        store.close()


def test_the_heartbeat_notices_a_lost_lease_and_no_further_step_starts(db: Db) -> None:
    """Taken over while its step runs: the heartbeat finds the lease lost (without any commit), the step's
    commit raises LeaseLost, and the run's row stays the new owner's."""
    import threading

    from loomc import Budget, loop
    from loomc.store import lease as _lease

    store = db.store(lease_ttl=0.3)
    noticed = threading.Event()
    ran: list[int] = []

    @loop(checkpoint=store, budget=Budget(iterations=5), name="noticing")
    def work(n: int) -> int:
        ran.append(n)
        if n == 1:
            (run_id,) = [c.run_id for c in _lease._held.values() if c.store is store]
            db.take_over_behind_its_back(run_id)
            deadline = time.monotonic() + 30
            while not any(c.lost for c in _lease._held.values() if c.store is store):
                assert time.monotonic() < deadline, "the heartbeat never noticed"
                time.sleep(0.02)
            noticed.set()
        return n + 1

    with pytest.raises(LeaseLost):
        work.run(0)
    assert noticed.is_set()
    assert ran == [0, 1]
    (info,) = store.list_runs()
    assert info.steps == 1  # step 1 never landed
    assert info.owner == "far-away-host:7:7"
    store.close()
