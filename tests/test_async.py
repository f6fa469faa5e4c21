"""Async loops on anyio (asyncio and trio): concurrency, a store that never blocks the loop, wall clock."""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import loomc
from loomc import AsyncCheckpointStore, Budget, BudgetExhausted, MemoryStore, RunStatus, SQLiteStore, loop, predicate
from loomc._core.types import StepRecord
from loomc.store.sqlite.aio import AsyncSQLiteStore, ThreadedStore, async_twin
from loomc.store.sqlite.sync import NewRun

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("no_blocking")]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test runs on asyncio and on trio."""
    return str(request.param)


def counter_loop(db: str, name: str, steps: int, sleep: float, log: list[tuple[str, int, float, float]]) -> Any:
    """An async loop of ``steps`` steps that sleeps ``sleep`` per step and logs (name, step, start, end)."""

    @loop(checkpoint=db, budget=Budget(iterations=steps + 5), converge_on=predicate(lambda h: h[-1].state["n"] >= steps), name=name)
    async def step(state: dict[str, int]) -> dict[str, int]:
        t0 = time.monotonic()
        await anyio.sleep(sleep)
        loomc.charge(0.01)
        log.append((name, state["n"], t0, time.monotonic()))
        return {"n": state["n"] + 1}

    return step


async def off(fn: Any, *args: Any) -> Any:
    """Run a sync check (SQLite reads) in a worker thread, off the event loop."""
    return await anyio.to_thread.run_sync(lambda: fn(*args))


def committed(db: str) -> list[tuple[str, int]]:
    """(run name, step_n) of every committed step, straight from SQLite."""
    with sqlite3.connect(db) as c:
        return c.execute(
            "SELECT r.name, s.step_n FROM steps s JOIN runs r ON r.id = s.run_id ORDER BY r.name, s.step_n"
        ).fetchall()


async def test_two_loops_on_one_database_overlap(db: str) -> None:
    """Two async loops on one database interleave their steps: total time is about one loop's, not two."""
    log: list[tuple[str, int, float, float]] = []
    a, b = counter_loop(db, "a", 5, 0.1, log), counter_loop(db, "b", 5, 0.1, log)
    t0 = time.monotonic()
    results: dict[str, Any] = {}

    async def go(fn: Any, key: str) -> None:
        results[key] = await fn.run({"n": 0})

    async with anyio.create_task_group() as tg:
        tg.start_soon(go, a, "a")
        tg.start_soon(go, b, "b")
    total = time.monotonic() - t0

    assert results["a"].status is RunStatus.COMPLETED
    assert results["b"].status is RunStatus.COMPLETED
    assert results["a"].cost_usd == pytest.approx(0.05)
    assert results["b"].cost_usd == pytest.approx(0.05)
    # each step of a overlaps the same-numbered step of b in time
    by = {(name, n): (s, e) for name, n, s, e in log}
    for n in range(5):
        (sa, ea), (sb, eb) = by[("a", n)], by[("b", n)]
        assert max(sa, sb) < min(ea, eb), f"step {n} of a and b did not overlap"
    order = [name for name, *_ in sorted(log, key=lambda r: r[2])]
    assert order != sorted(order)  # interleaved, not a then b
    assert total < 0.9, f"two 0.5 s loops took {total:.2f}s: they ran one after the other"
    assert await off(committed, db) == [("a", n) for n in range(5)] + [("b", n) for n in range(5)]


async def test_fifty_loops_on_one_database(db: str) -> None:
    """Fifty async loops on one database run concurrently; every step of every loop is committed."""
    log: list[tuple[str, int, float, float]] = []
    loops = [counter_loop(db, f"l{i:02d}", 3, 0.05, log) for i in range(50)]
    t0 = time.monotonic()
    async with anyio.create_task_group() as tg:
        for fn in loops:
            tg.start_soon(fn.run, {"n": 0})
    total = time.monotonic() - t0
    assert total < 3.0, f"50 loops of 0.15 s took {total:.2f}s (sequential would be 7.5 s)"
    assert await off(committed, db) == [(f"l{i:02d}", n) for i in range(50) for n in range(3)]
    runs = await off(lambda: SQLiteStore(db, create=False).list_runs())
    assert len(runs) == 50
    assert {r.status for r in runs} == {RunStatus.COMPLETED}
    assert sum(r.cost_usd for r in runs) == pytest.approx(1.5)


async def test_a_checkpoint_write_waiting_on_the_database_does_not_block_the_loop(db: str) -> None:
    """While another process-level writer holds the database, a commit waits off the event loop."""
    release = threading.Event()
    locked = threading.Event()
    ticks: list[float] = []

    def hold_write_lock() -> None:
        c = sqlite3.connect(db, isolation_level=None)
        c.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(5)
        c.execute("COMMIT")
        c.close()

    await off(lambda: SQLiteStore(db).list_runs())  # the schema exists before the other writer locks the file

    @loop(checkpoint=db, budget=Budget(iterations=1), name="writer")
    async def step(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    async def ticker() -> None:
        while not release.is_set():
            ticks.append(time.monotonic())
            await anyio.sleep(0.01)

    holder = threading.Thread(target=hold_write_lock)
    holder.start()
    await anyio.to_thread.run_sync(locked.wait)
    result: list[Any] = []

    async def run_it() -> None:
        result.append(await step.run({"n": 0}))

    async def let_go() -> None:
        await anyio.sleep(0.5)
        release.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        tg.start_soon(run_it)
        tg.start_soon(let_go)
    await anyio.to_thread.run_sync(holder.join)
    assert result[0].status is RunStatus.BUDGET_EXHAUSTED
    assert result[0].state == {"n": 1}
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert len(ticks) >= 20, f"the event loop ticked {len(ticks)} times in 0.5 s: it was blocked"
    assert max(gaps) < 0.25, f"the event loop stalled for {max(gaps):.2f}s"


async def test_wall_clock_cancels_an_async_step_at_the_deadline(db: str) -> None:
    """A step still running at the wall-clock deadline is cancelled; the last checkpoint is intact."""

    @loop(checkpoint=db, budget=Budget(wall_clock="400ms"), name="slow")
    async def slow(state: dict[str, int]) -> dict[str, int]:
        await anyio.sleep(0.1 if state["n"] < 2 else 30)
        return {"n": state["n"] + 1}

    t0 = time.monotonic()
    result = await slow.run({"n": 0})
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0, f"the step was not cancelled at the deadline ({elapsed:.2f}s)"
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert isinstance(result.error, BudgetExhausted)
    assert result.error.limit == "wall_clock"
    assert result.state == {"n": 2}
    store = SQLiteStore(db)
    info = await off(store.get_run, result.run_id)
    assert info is not None
    assert info.status is RunStatus.BUDGET_EXHAUSTED
    assert info.stop_reason == "budget: wall_clock"
    steps = await off(store.load_steps, result.run_id)
    assert [s.state for s in steps[:2]] == [{"n": 1}, {"n": 2}]
    assert steps[-1].error is not None
    assert "wall_clock" in steps[-1].error
    assert (await off(store.resume_point, result.run_id)).start_blob is not None
    with pytest.raises(BudgetExhausted) as caught:
        await slow({"n": 0})
    assert caught.value.limit == "wall_clock"
    assert caught.value.state == {"n": 2}


async def test_resume_with_a_larger_wall_clock_continues_from_the_checkpoint(db: str) -> None:
    """An async run stopped by its wall clock resumes from its last state with new limits."""
    seen: list[int] = []

    @loop(checkpoint=db, budget=Budget(wall_clock="250ms"), converge_on=predicate(lambda h: h[-1].state["n"] >= 4), name="r")
    async def step(state: dict[str, int]) -> dict[str, int]:
        seen.append(state["n"])
        await anyio.sleep(0.1)
        return {"n": state["n"] + 1}

    first = await step.run({"n": 0})
    assert first.status is RunStatus.BUDGET_EXHAUSTED
    done_before = first.state["n"]
    final = await step.resume(first.run_id[:6], budget=Budget(wall_clock="10s"))
    assert final == {"n": 4}
    assert seen[len(seen) - (4 - done_before) :] == list(range(done_before, 4))


async def test_an_outer_cancel_marks_the_run_interrupted_and_leaves_the_store_usable(db: str) -> None:
    """Cancelling the caller mid-step records ``interrupted``; the next run on the store works."""

    caller = anyio.CancelScope()

    @loop(checkpoint=db, budget=Budget(iterations=10), name="cancelled")
    async def step(state: dict[str, int]) -> dict[str, int]:
        if state["n"] == 2:
            caller.cancel()  # the caller gives up while step 2 runs
        await anyio.sleep(0.01 if state["n"] < 2 else 30)
        return {"n": state["n"] + 1}

    with caller:
        await step.run({"n": 0})
    (info,) = await off(lambda: SQLiteStore(db).list_runs())
    assert info.status is RunStatus.INTERRUPTED
    assert info.steps == 2
    resumed = await step.resume_run(info.id, budget=Budget(iterations=2))
    assert resumed.status is RunStatus.BUDGET_EXHAUSTED
    assert resumed.state == {"n": 2}


async def test_async_loop_with_a_memory_store() -> None:
    """``checkpoint="memory"`` works for async loops (through worker threads)."""

    @loop(checkpoint="memory", budget=Budget(iterations=3), name="mem")
    async def step(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    result = await step.run({"n": 0})
    assert result.state == {"n": 3}
    assert result.status is RunStatus.BUDGET_EXHAUSTED


async def test_async_twin_is_one_aiosqlite_store_per_event_loop(db: str, anyio_backend: str) -> None:
    """Under asyncio a SQLiteStore's twin is an AsyncSQLiteStore (same file and durability); under trio, threads."""
    sync = SQLiteStore(db, durability="process")
    twin = async_twin(sync)
    if anyio_backend == "asyncio":
        assert isinstance(twin, AsyncSQLiteStore)
        assert twin is async_twin(sync)
        assert twin.path == sync.path
        assert twin.durability == "process"
        assert isinstance(twin, AsyncCheckpointStore)
        async with twin:
            assert twin._conn is not None
            async with twin:  # nested users share the connection
                pass
            assert twin._conn is not None
        assert twin._conn is None  # closed when its last user leaves
        other = await anyio.to_thread.run_sync(lambda: anyio.run(_twin_in_new_loop, sync))
        assert other is not twin
    else:
        assert isinstance(twin, ThreadedStore)
    assert isinstance(async_twin(MemoryStore()), ThreadedStore)
    sync.close()


async def _twin_in_new_loop(sync: SQLiteStore) -> Any:
    twin = async_twin(sync)
    async with twin:
        await twin.list_runs()
    return twin


def aiosqlite_threads() -> list[threading.Thread]:
    """The live aiosqlite connection threads."""
    return [t for t in threading.enumerate() if "_connection_worker_thread" in t.name]


async def test_aiosqlite_connection_closes_when_the_runs_end(db: str) -> None:
    """No aiosqlite connection or thread outlives the runs of an event loop."""
    log: list[tuple[str, int, float, float]] = []
    fn = counter_loop(db, "t", 2, 0.0, log)
    await fn.run({"n": 0})
    await fn.run({"n": 0})
    for _ in range(200):
        if not aiosqlite_threads():
            break
        await anyio.sleep(0.01)
    assert aiosqlite_threads() == []
    assert not any(t._conn is not None for t in _all_twins())


def _all_twins() -> list[Any]:
    from loomc.store.sqlite import aio as _astore

    return [t for twins in list(_astore._per_loop.values()) for t in twins.values()]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_async_sqlite_store_matches_the_sync_store(tmp_path: Path, anyio_backend: str) -> None:
    """Every AsyncSQLiteStore method reads and writes exactly what SQLiteStore does."""
    from loomc import AmbiguousRunId, RunLocked, RunNotFound

    path = tmp_path / "conf.db"
    real = SQLiteStore(path)

    class Off:
        """The sync store, each call in a worker thread (blocking calls stay off the event loop)."""

        def __getattr__(self, name: str) -> Any:
            return lambda *a, **k: anyio.to_thread.run_sync(lambda: getattr(real, name)(*a, **k))

    sync = Off()
    async with AsyncSQLiteStore(path) as astore:
        rid = await astore.create_run("h1", name="m:f", run_id="abc123000000")
        other = await sync.create_run("h2", name="m:g", run_id="abc124000000")
        assert await astore.resolve("abc123") == rid
        with pytest.raises(AmbiguousRunId):
            await astore.resolve("abc12")
        with pytest.raises(RunNotFound) as nf:
            await astore.resolve("zzz")
        assert "abc1" in str(nf.value)
        await astore.save_step(rid, StepRecord(0, {"x": 1}, 0.25, 0.5))
        await sync.save_step(rid, StepRecord(1, {"x": 2}, 0.25, 0.75))
        assert [(s.step_n, s.state, s.cost_usd) for s in await astore.load_steps(rid)] == [
            (s.step_n, s.state, s.cost_usd) for s in await sync.load_steps(rid)
        ]
        assert await astore.get_run(rid) == await sync.get_run(rid)
        assert await astore.list_runs() == await sync.list_runs()
        assert await astore.list_runs(status="running", limit=1) == await sync.list_runs(status="running", limit=1)
        assert await astore.load_state(rid, 1) == {"x": 2}
        rp_a, rp_s = await astore.resume_point(rid), await sync.resume_point(rid)
        states_a = await off(lambda: [h.state for h in rp_a.history])  # lazy loads read SQLite
        assert (rp_a.next_from, rp_a.start_blob, states_a) == (
            rp_s.next_from, rp_s.start_blob, await off(lambda: [h.state for h in rp_s.history])
        )
        child = await astore.begin_run(NewRun(spec_hash="c", name="kid", parent_run_id=rid, parent_step=1, call_index=0))
        assert (await astore.find_child(rid, 1, 0)) == await sync.find_child(rid, 1, 0)
        assert [c.id for c in await astore.children(rid)] == [child]
        await astore.set_meta(rid, {"k": "v"})
        await astore.add_cost(rid, 1.0)
        await astore.update_run_status(other, RunStatus.COMPLETED)
        info = await sync.get_run(rid)
        assert info is not None
        assert info.meta == {"k": "v"}
        assert info.cost_usd == pytest.approx(1.5)
        await astore.acquire(rid, "somehost:1:1")
        with pytest.raises(RunLocked):
            await astore.acquire(rid, "otherhost:2:2")  # a fresh heartbeat from another host is alive
        await astore.finish_run(rid, RunStatus.FAILED, "error: x", 3.0)
        info = await sync.get_run(rid)
        assert info is not None
        assert info.status is RunStatus.FAILED
        assert info.wall_s == 3.0
    await sync.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_concurrent_writes_share_a_transaction_and_fail_alone(tmp_path: Path, anyio_backend: str) -> None:
    """Writes made while a transaction is under way are committed together; within such a
    group, a write that fails (a duplicate run id, a lease held elsewhere) fails alone."""
    from loomc import RunLocked

    async with AsyncSQLiteStore(tmp_path / "g.db") as astore:
        held = await astore.begin_run(NewRun(spec_hash="h", run_id="held"))
        await astore.acquire(held, "otherhost:2:2")  # a fresh heartbeat from another host: alive
        outcomes: dict[str, Any] = {}

        async def attempt(name: str, coro: Any) -> None:
            try:
                outcomes[name] = await coro
            except Exception as exc:
                outcomes[name] = exc

        calls = {
            "first": astore.begin_run(NewRun(spec_hash="h", run_id="first")),
            "dup": astore.begin_run(NewRun(spec_hash="h", run_id="held")),
            "ok": astore.begin_run(NewRun(spec_hash="h", run_id="ok")),
            "locked": astore.acquire(held, "somehost:1:1"),
            "meta": astore.set_meta(held, {"k": "v"}),
        }
        async with anyio.create_task_group() as tg:
            for name, coro in calls.items():
                tg.start_soon(attempt, name, coro)
        assert outcomes["first"] == "first"
        assert outcomes["ok"] == "ok"
        assert outcomes["meta"] is None
        assert isinstance(outcomes["dup"], RunLocked)  # the id is taken by a live run
        assert isinstance(outcomes["locked"], RunLocked)
        ids = {r.id for r in await astore.list_runs()}
        assert ids == {"held", "first", "ok"}
        info = await astore.get_run(held)
        assert info is not None
        assert info.meta == {"k": "v"}
        assert info.owner == "otherhost:2:2"


async def test_nested_async_runs_resume_after_an_outer_cancel(db: str) -> None:
    """Cancel a parent while its async child runs; resuming the parent resumes the child, paying once."""
    ran: list[int] = []
    outer = anyio.CancelScope()

    @loop(checkpoint=db, budget=Budget(usd=1.0), converge_on=predicate(lambda h: h[-1].state["n"] >= 5), name="kid")
    async def kid(state: dict[str, int]) -> dict[str, int]:
        ran.append(state["n"])
        if len(ran) == 8:  # the second kid's third step: two of its steps are committed
            outer.cancel()
        await anyio.sleep(0.01)
        loomc.charge(0.01)
        return {"n": state["n"] + 1}

    @loop(checkpoint=db, budget=Budget(usd=1.0, iterations=5), converge_on=predicate(lambda h: h[-1].state["k"] >= 2), name="boss")
    async def boss(state: dict[str, int]) -> dict[str, int]:
        await kid({"n": 0})
        loomc.charge(0.005)
        return {"k": state["k"] + 1}

    with outer:
        await boss.run({"k": 0})
    runs = await off(lambda: SQLiteStore(db).list_runs())
    by = {(r.name, r.parent_step): r for r in runs}
    assert by[("boss", None)].status is RunStatus.INTERRUPTED
    assert by[("kid", 0)].status is RunStatus.COMPLETED
    assert by[("kid", 1)].status is RunStatus.INTERRUPTED
    done = by[("kid", 1)].steps
    assert done == 2
    ran.clear()
    result = await boss.resume_run(by[("boss", None)].id)
    assert result.status is RunStatus.COMPLETED
    assert result.cost_usd == pytest.approx(2 * (0.05 + 0.005))
    assert ran == list(range(done, 5))  # the second kid continued from its own checkpoint
    assert len(await off(lambda: SQLiteStore(db).list_runs())) == 3


async def test_detectors_comparing_the_last_two_states_never_read_sqlite_on_the_loop(db: str) -> None:
    """A detector reading history[-1] and history[-2] works from memory, after a resume too."""
    compared: list[tuple[int, int]] = []

    def settled(history: list[Any]) -> bool:
        if len(history) < 2:
            return False
        compared.append((history[-2].state["n"], history[-1].state["n"]))
        return bool(history[-1].state["n"] >= 6)

    @loop(checkpoint=db, budget=Budget(iterations=3), converge_on=predicate(settled), name="pairs")
    async def step(state: dict[str, int]) -> dict[str, int]:
        await anyio.sleep(0)
        return {"n": state["n"] + 1}

    first = await step.run({"n": 0})
    assert first.status is RunStatus.BUDGET_EXHAUSTED
    final = await step.resume(first.run_id, budget=Budget(iterations=10))
    assert final == {"n": 6}
    assert compared == [(0 + k, 1 + k) for k in range(1, 6)]


async def test_an_async_sqlite_store_as_checkpoint_serves_sync_and_async_loops(tmp_path: Path, anyio_backend: str) -> None:
    """``checkpoint=AsyncSQLiteStore(path)`` works for async loops and, through its file, for sync ones."""
    path = tmp_path / "given.db"
    store = AsyncSQLiteStore(path, durability="process")

    @loop(checkpoint=store, budget=Budget(iterations=2), name="a")
    async def a(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    @loop(checkpoint=store, budget=Budget(iterations=2), name="s")
    def s(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    assert (await a.run({"n": 0})).state == {"n": 2}
    assert (await anyio.to_thread.run_sync(s.run, {"n": 0})).state == {"n": 2}
    if anyio_backend == "asyncio":
        async with store:
            assert sorted(r.name for r in await store.list_runs()) == ["a", "s"]
    else:
        with pytest.raises(loomc.StoreError, match="asyncio only"):
            await store.list_runs()


async def test_runs_starting_while_the_last_one_closes_the_connection(db: str) -> None:
    """Staggered short runs share, close and reopen the loop's connection; every step commits."""
    log: list[tuple[str, int, float, float]] = []
    loops = [counter_loop(db, f"s{i:02d}", 1, 0.0, log) for i in range(30)]

    async def staggered(i: int) -> None:
        await anyio.sleep(0.002 * (i % 7))
        result = await loops[i].run({"n": 0})
        assert result.status is RunStatus.COMPLETED

    async with anyio.create_task_group() as tg:
        for i in range(30):
            tg.start_soon(staggered, i)
    assert await off(committed, db) == [(f"s{i:02d}", 0) for i in range(30)]
    assert await _threads_gone()


async def _threads_gone() -> bool:
    for _ in range(200):
        if not aiosqlite_threads():
            return True
        await anyio.sleep(0.01)
    return False


async def test_an_unusable_database_is_a_store_error(tmp_path: Path) -> None:
    """A database that cannot be opened fails the async run with a StoreError naming the path."""
    not_a_db = tmp_path / "notes.db"
    await off(not_a_db.write_bytes, b"this is not a database, just some text" * 100)

    @loop(checkpoint=str(not_a_db), budget=Budget(iterations=1), name="nowhere")
    async def step(state: dict[str, int]) -> dict[str, int]:
        return state

    with pytest.raises(loomc.StoreError, match=r"notes\.db"):
        await step.run({"n": 0})
    assert await _threads_gone()
    assert all(t._loop is None for t in _all_twins())  # nothing holds on to the event loop
