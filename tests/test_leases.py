"""Leases: one driver per run (threads, tasks, processes), taken ids, nested runs, heartbeats."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loomc
from loomc import Budget, LoomcError, MemoryStore, RunLocked, RunStatus, SQLiteStore, StoreError, loop, predicate
from loomc.store import lease as _lease
from loomc.store.sqlite.aio import AsyncSQLiteStore
from loomc.store.sqlite.sync import NewRun
from orchestration import Graph


def rows(db: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of a query on ``db``, through a connection of its own."""
    with sqlite3.connect(db) as c:
        return c.execute(sql, args).fetchall()


def steps_of(db: str, run_id: str) -> list[int]:
    """The committed step numbers of a run."""
    return [r[0] for r in rows(db, "SELECT step_n FROM steps WHERE run_id = ? ORDER BY step_n", run_id)]


class Gate:
    """Holds the step that runs until every other caller has returned (or a timeout)."""

    def __init__(self, others: int) -> None:
        self.others = others
        self.returned = 0
        self.cond = threading.Condition()
        self.entered: list[int] = []

    def one_returned(self) -> None:
        with self.cond:
            self.returned += 1
            self.cond.notify_all()

    def wait_for_others(self, timeout: float = 20.0) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.returned >= self.others, timeout)


def interrupted_run(checkpoint: Any, *, steps: int, stop_at: int, entered: list[int], gate: Gate | None,
                    is_async: bool = False) -> tuple[Any, str]:
    """A loop of ``steps`` steps costing $0.01 each, interrupted at step ``stop_at``; its id."""
    boom = {"on": True}

    def body(state: dict[str, int]) -> dict[str, int]:
        if boom["on"] and state["n"] == stop_at:
            raise KeyboardInterrupt
        entered.append(state["n"])
        if gate is not None and state["n"] == stop_at:
            gate.wait_for_others()
        return {"n": state["n"] + 1}

    kwargs: dict[str, Any] = {
        "checkpoint": checkpoint, "budget": Budget(usd=1.0, iterations=100), "cost_fn": lambda s: 0.01,
        "converge_on": predicate(lambda h: h[-1].state["n"] >= steps), "name": "leased",
    }
    if is_async:

        @loop(**kwargs)
        async def work(state: dict[str, int]) -> dict[str, int]:
            if gate is not None and state["n"] == stop_at and not boom["on"]:
                entered.append(state["n"])
                await anyio.to_thread.run_sync(gate.wait_for_others)
                return {"n": state["n"] + 1}
            return body(state)

        with pytest.raises(KeyboardInterrupt):
            anyio.run(work.run, {"n": 0})
    else:

        @loop(**kwargs)
        def work(state: dict[str, int]) -> dict[str, int]:
            return body(state)

        with pytest.raises(KeyboardInterrupt):
            work.run({"n": 0})
    boom["on"] = False
    store = checkpoint if not isinstance(checkpoint, str) else SQLiteStore(checkpoint)
    (info,) = store.list_runs()
    assert info.status is RunStatus.INTERRUPTED
    entered.clear()
    return work, info.id


def assert_ran_once(outcomes: list[Any], entered: list[int], stop_at: int, steps: int) -> None:
    """Exactly one caller ran the run (the rest got RunLocked), every step ran once."""
    results = [o for o in outcomes if isinstance(o, loomc.RunResult)]
    locked = [o for o in outcomes if isinstance(o, RunLocked)]
    assert len(results) == 1, outcomes
    assert len(locked) == len(outcomes) - 1, outcomes
    assert "another thread or task of this process" in str(locked[0]) if locked else True
    assert sorted(entered) == list(range(stop_at, steps)), entered
    (result,) = results
    assert result.status is RunStatus.COMPLETED
    assert result.cost_usd == pytest.approx(0.01 * steps)
    assert result.steps == steps


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_concurrent_resumes_in_threads_run_it_once(tmp_path: Path, kind: str) -> None:
    """Eight threads resume one run at once: one runs it, seven get RunLocked; no step is paid twice."""
    n = 8
    gate = Gate(n - 1)
    entered: list[int] = []
    checkpoint: Any = str(tmp_path / "l.db") if kind == "sqlite" else MemoryStore()
    work, run_id = interrupted_run(checkpoint, steps=6, stop_at=2, entered=entered, gate=gate)
    outcomes: list[Any] = []
    barrier = threading.Barrier(n)

    def resume() -> None:
        barrier.wait()
        try:
            outcomes.append(work.resume_run(run_id))
        except RunLocked as exc:
            outcomes.append(exc)
            gate.one_returned()

    threads = [threading.Thread(target=resume) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert_ran_once(outcomes, entered, 2, 6)
    if kind == "sqlite":
        assert steps_of(checkpoint, run_id) == list(range(6))


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_concurrent_resumes_in_tasks_run_it_once(tmp_path: Path, backend: str, kind: str) -> None:
    """Eight tasks of one event loop resume one run at once: one runs it, seven get RunLocked."""
    n = 8
    gate = Gate(n - 1)
    entered: list[int] = []
    checkpoint: Any = str(tmp_path / "l.db") if kind == "sqlite" else MemoryStore()
    work, run_id = interrupted_run(checkpoint, steps=6, stop_at=2, entered=entered, gate=gate, is_async=True)
    outcomes: list[Any] = []

    async def resume() -> None:
        try:
            outcomes.append(await work.resume_run(run_id))
        except RunLocked as exc:
            outcomes.append(exc)
            gate.one_returned()

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(resume)

    anyio.run(main, backend=backend)
    assert_ran_once(outcomes, entered, 2, 6)
    if kind == "sqlite":
        assert steps_of(checkpoint, run_id) == list(range(6))


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    threads=st.integers(min_value=0, max_value=5),
    asyncio_tasks=st.integers(min_value=0, max_value=5),
    trio_tasks=st.integers(min_value=0, max_value=5),
    stop_at=st.integers(min_value=0, max_value=3),
)
def test_many_resumers_of_every_kind_run_it_once(threads: int, asyncio_tasks: int, trio_tasks: int, stop_at: int) -> None:
    """Any mix of threads and asyncio/trio tasks resuming one run at once: exactly one runs it,
    its steps are contiguous and its cost is counted once."""
    import tempfile

    total = threads + asyncio_tasks + trio_tasks
    if total < 2:
        total, threads = 2, max(threads, 2 - asyncio_tasks - trio_tasks)
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "h.db")
        gate = Gate(total - 1)
        entered: list[int] = []
        work, run_id = interrupted_run(db, steps=5, stop_at=stop_at, entered=entered, gate=gate, is_async=True)
        outcomes: list[Any] = []
        lock = threading.Lock()
        barrier = threading.Barrier(1 + (1 if asyncio_tasks else 0) + (1 if trio_tasks else 0) + threads)

        def record(outcome: Any) -> None:
            with lock:
                outcomes.append(outcome)
            if isinstance(outcome, RunLocked):
                gate.one_returned()

        async def one() -> None:
            try:
                record(await work.resume_run(run_id))
            except RunLocked as exc:
                record(exc)

        def event_loop(backend: str, tasks: int) -> None:
            async def main() -> None:
                async with anyio.create_task_group() as tg:
                    for _ in range(tasks):
                        tg.start_soon(one)

            barrier.wait()
            anyio.run(main, backend=backend)

        def thread_body() -> None:
            barrier.wait()
            anyio.run(one)

        workers = [threading.Thread(target=thread_body) for _ in range(threads)]
        if asyncio_tasks:
            workers.append(threading.Thread(target=event_loop, args=("asyncio", asyncio_tasks)))
        if trio_tasks:
            workers.append(threading.Thread(target=event_loop, args=("trio", trio_tasks)))
        for w in workers:
            w.start()
        barrier.wait()
        for w in workers:
            w.join(60)
        assert len(outcomes) == total
        assert_ran_once(outcomes, entered, stop_at, 5)
        assert steps_of(db, run_id) == list(range(5))
        assert rows(db, "SELECT cost_usd FROM runs WHERE id = ?", run_id)[0][0] == pytest.approx(0.05)


@pytest.mark.parametrize("how", ["threads", "asyncio", "trio"])
def test_concurrent_starts_with_one_run_id_run_once(db: str, how: str) -> None:
    """Six callers start a new run with the same ``run_id=`` at once: one runs it, the others get RunLocked."""
    n = 6
    gate = Gate(n - 1)
    ran: list[int] = []

    def body(state: dict[str, int]) -> dict[str, int]:
        ran.append(state["n"])
        if state["n"] == 0:
            gate.wait_for_others()
        return {"n": state["n"] + 1}

    kwargs: dict[str, Any] = {"checkpoint": db, "budget": Budget(iterations=10), "cost_fn": lambda s: 0.01,
                              "converge_on": predicate(lambda h: h[-1].state["n"] >= 3)}
    outcomes: list[Any] = []

    def record(outcome: Any) -> None:
        outcomes.append(outcome)
        if isinstance(outcome, RunLocked):
            gate.one_returned()

    if how == "threads":

        @loop(**kwargs)
        def work(state: dict[str, int]) -> dict[str, int]:
            return body(state)

        barrier = threading.Barrier(n)

        def start() -> None:
            barrier.wait()
            try:
                record(work.run({"n": 0}, run_id="job-1"))
            except RunLocked as exc:
                record(exc)

        threads = [threading.Thread(target=start) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    else:

        @loop(**kwargs)
        async def awork(state: dict[str, int]) -> dict[str, int]:
            if state["n"] == 0:
                ran.append(0)
                await anyio.to_thread.run_sync(gate.wait_for_others)
                return {"n": 1}
            return body(state)

        async def one() -> None:
            try:
                record(await awork.run({"n": 0}, run_id="job-1"))
            except RunLocked as exc:
                record(exc)

        async def main() -> None:
            async with anyio.create_task_group() as tg:
                for _ in range(n):
                    tg.start_soon(one)

        anyio.run(main, backend=how)
    results = [o for o in outcomes if isinstance(o, loomc.RunResult)]
    assert len(results) == 1, outcomes
    assert sum(isinstance(o, RunLocked) for o in outcomes) == n - 1
    assert ran == [0, 1, 2]
    assert results[0].run_id == "job-1"
    assert steps_of(db, "job-1") == [0, 1, 2]


def test_a_taken_run_id_is_refused_by_name_not_by_a_constraint(db: str) -> None:
    """Creating a run whose id exists says the id is taken: RunLocked while a live process runs it,
    else a LoomcError saying to resume it or choose another id; the existing run is unchanged."""
    store = SQLiteStore(db)
    try:
        store.begin_run(NewRun(spec_hash="h", run_id="job", owner="otherhost:1:1", name="first"))
        with pytest.raises(RunLocked, match="job"):
            store.begin_run(NewRun(spec_hash="h", run_id="job", name="second"))
        store.finish_run("job", RunStatus.COMPLETED, None, 0.0)
        with pytest.raises(LoomcError, match=r"run id 'job' already exists .*resume it .*or choose another id") as info:
            store.begin_run(NewRun(spec_hash="h", run_id="job", name="second"))
        assert not isinstance(info.value, StoreError)
        run = store.get_run("job")
        assert run is not None
        assert (run.name, run.status) == ("first", RunStatus.COMPLETED)
    finally:
        store.close()

    async def twice() -> None:
        async with AsyncSQLiteStore(db) as astore:
            with pytest.raises(LoomcError, match="already exists") as info:
                await astore.begin_run(NewRun(spec_hash="h", run_id="job"))
            assert not isinstance(info.value, StoreError)

    anyio.run(twice)
    memory = MemoryStore()
    memory.begin_run(NewRun(spec_hash="h", run_id="job"))
    with pytest.raises(LoomcError, match="already exists"):
        memory.begin_run(NewRun(spec_hash="h", run_id="job"))


START_SCRIPT = """
import sys, time
from loomc import Budget, RunLocked, loop, predicate

@loop(checkpoint=sys.argv[1], budget=Budget(iterations=10), converge_on=predicate(lambda h: h[-1].state["n"] >= 3),
      name="race")
def work(state):
    time.sleep(0.3)
    return {"n": state["n"] + 1}

while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
try:
    result = work.run({"n": 0}, run_id="shared")
    print("ran", result.status.value, result.steps)
except RunLocked:
    print("locked")
"""


def test_processes_starting_one_run_id_at_once_never_hit_a_constraint(db: str, tmp_path: Path) -> None:
    """Four processes start ``run_id="shared"`` at the same instant: one runs it; the others are told
    it is running (or find it done); none reports a UNIQUE constraint."""
    script = tmp_path / "start.py"
    script.write_text(START_SCRIPT)
    SQLiteStore(db).conn.close()  # the schema exists before the race
    at = time.time() + 2.0
    procs = [
        subprocess.Popen([sys.executable, str(script), db, str(at)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    for (_, err), p in zip(outs, procs, strict=True):
        assert p.returncode == 0, err
        assert "UNIQUE" not in err
    said = sorted(out.split()[0] for out, _ in outs)
    assert said.count("ran") >= 1
    assert set(said) <= {"ran", "locked"}
    assert steps_of(db, "shared") == [0, 1, 2]


# -- nested runs are resumed through their root -------------------------------------


def test_resuming_a_nested_run_directly_is_refused_naming_its_root(db: str) -> None:
    """``child.resume_run(child_id)`` / ``child.resume`` / ``child.run(..., run_id=child_id)`` refuse
    with a LoomcError naming the root run; nothing runs, the parent's cap is never bypassed."""
    ran: list[int] = []
    boom = [True]

    @loop(checkpoint=db, budget=Budget(usd=10.0, iterations=10), cost_fn=lambda s: 0.1,
          converge_on=predicate(lambda h: h[-1].state["n"] >= 5), name="kid")
    def kid(state: dict[str, int]) -> dict[str, int]:
        ran.append(state["n"])
        if state["n"] == 2 and boom:
            boom.clear()  # once: the refused resumes below must not run into it again
            raise KeyboardInterrupt
        return {"n": state["n"] + 1}

    @loop(checkpoint=db, budget=Budget(usd=0.35), name="mid")
    def mid(state: dict[str, int]) -> dict[str, int]:
        return kid(state)

    @loop(checkpoint=db, budget=Budget(usd=1.0), name="top")
    def top(state: dict[str, int]) -> dict[str, int]:
        return mid(state)

    with pytest.raises(KeyboardInterrupt):
        top.run({"n": 0})
    runs = {r[1]: r[0] for r in rows(db, "SELECT id, name FROM runs")}
    kid_id, top_id = runs["kid"], runs["top"]
    before = rows(db, "SELECT status, steps, cost_usd FROM runs WHERE id = ?", kid_id)
    ran.clear()
    for attempt in (
        lambda: kid.resume_run(kid_id),
        lambda: kid.resume(kid_id[:6]),
        lambda: kid.run({"n": 0}, run_id=kid_id),
    ):
        with pytest.raises(LoomcError) as info:
            attempt()
        msg = str(info.value)
        assert f"resume the root run {top_id}" in msg
        assert f"loomc resume {top_id}" in msg
    assert ran == []
    assert rows(db, "SELECT status, steps, cost_usd FROM runs WHERE id = ?", kid_id) == before


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_resuming_a_nested_async_run_or_graph_node_directly_is_refused(db: str, backend: str) -> None:
    """An async child, and a graph's node run, resumed on their own are refused the same way."""

    @loop(checkpoint=db, budget=Budget(iterations=3), name="akid")
    async def akid(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    @loop(checkpoint=db, budget=Budget(iterations=1), name="aparent")
    async def aparent(state: dict[str, int]) -> dict[str, int]:
        return await akid(state)

    anyio.run(aparent.run, {"n": 0}, backend=backend)
    kid_id, parent_id = (rows(db, "SELECT id FROM runs WHERE name = ?", n)[0][0] for n in ("akid", "aparent"))
    with pytest.raises(LoomcError, match=f"resume the root run {parent_id}"):
        anyio.run(akid.resume_run, kid_id, backend=backend)

    @loop(checkpoint=db, budget=Budget(iterations=1), name="node-loop")
    def node(state: Any) -> dict[str, int]:
        return {"n": 1}

    graph = Graph("g", checkpoint=db)
    graph.add(node)
    result = graph.run({})
    node_run = result.nodes["node"].run_id
    assert node_run is not None
    with pytest.raises(LoomcError, match=rf"resume the root run {result.run_id} .*--resume {result.run_id}"):
        node.resume_run(node_run)


# -- heartbeats ----------------------------------------------------------------------


@pytest.fixture
def fast_heartbeat(monkeypatch: pytest.MonkeyPatch, db: str) -> Iterator[float]:
    """A 1 s staleness (heartbeat every 1/3 s) for this test, and the test's database created."""
    monkeypatch.setattr(_lease, "HEARTBEAT_STALE_S", 1.0)
    SQLiteStore(db).conn.close()
    yield 1.0
    deadline = time.monotonic() + 5
    while any(t.name == "loomc-heartbeat" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)


def watch_heartbeat(db: str, name: str, until: Callable[[], bool]) -> list[float]:
    """Ages of the heartbeat of the run called ``name`` while it is running, sampled every 50 ms."""
    ages: list[float] = []
    while not until():
        got = rows(db, "SELECT heartbeat, status FROM runs WHERE name = ?", name)
        if got and got[0][1] == "running" and got[0][0] is not None:
            ages.append(time.time() - got[0][0])
        time.sleep(0.05)
    return ages


def test_a_long_step_keeps_its_lease_fresh(db: str, fast_heartbeat: float) -> None:
    """A step longer than the staleness window: the heartbeat is renewed meanwhile (not only at commits),
    so another host never sees the live run as dead; the heartbeat thread stops once nothing runs."""

    @loop(checkpoint=db, budget=Budget(iterations=1), name="slow")
    def slow(state: dict[str, int]) -> dict[str, int]:
        time.sleep(3 * fast_heartbeat)
        return {"n": 1}

    t = threading.Thread(target=slow.run, args=({"n": 0},))
    t.start()
    ages = watch_heartbeat(db, "slow", lambda: not t.is_alive())
    t.join()
    assert len(ages) > 20
    assert max(ages) < fast_heartbeat, ages
    (owner,) = rows(db, "SELECT owner FROM runs WHERE name = 'slow'")[0]
    assert owner


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_long_async_step_keeps_its_lease_fresh(db: str, backend: str, fast_heartbeat: float) -> None:
    """The same for an async loop (its store is aiosqlite on asyncio, worker threads on trio)."""

    @loop(checkpoint=db, budget=Budget(iterations=1), name="aslow")
    async def aslow(state: dict[str, int]) -> dict[str, int]:
        await anyio.sleep(3 * fast_heartbeat)
        return {"n": 1}

    t = threading.Thread(target=lambda: anyio.run(aslow.run, {"n": 0}, backend=backend))
    t.start()
    ages = watch_heartbeat(db, "aslow", lambda: not t.is_alive())
    t.join()
    assert len(ages) > 20
    assert max(ages) < fast_heartbeat, ages


def test_a_graph_keeps_its_lease_fresh(db: str, fast_heartbeat: float) -> None:
    """A graph run commits no steps of its own: its lease (and its long node's) is renewed all the same."""

    @loop(checkpoint=db, budget=Budget(iterations=1), name="long-node")
    def long_node(state: Any) -> dict[str, int]:
        time.sleep(3 * fast_heartbeat)
        return {"n": 1}

    graph = Graph("beating", checkpoint=db)
    graph.add(long_node)
    t = threading.Thread(target=graph.run, args=({},))
    t.start()
    graph_ages: list[float] = []
    node_ages: list[float] = []
    while t.is_alive():
        got = {n: (b, s) for n, b, s in rows(db, "SELECT name, heartbeat, status FROM runs")}
        for name, ages in (("beating", graph_ages), ("long-node", node_ages)):
            if name in got and got[name][1] == "running":
                ages.append(time.time() - got[name][0])
        time.sleep(0.05)
    t.join()
    assert len(graph_ages) > 20
    assert len(node_ages) > 10
    assert max(graph_ages) < fast_heartbeat, graph_ages
    assert max(node_ages) < fast_heartbeat, node_ages
    assert rows(db, "SELECT status FROM runs WHERE name = 'beating'") == [("completed",)]


def test_the_staleness_window_is_configurable_from_the_environment(tmp_path: Path) -> None:
    """``LOOMC_HEARTBEAT_STALE_S`` sets the window; a value that is not a positive number is refused at import."""
    code = "import loomc.store.lease as l; print(l.HEARTBEAT_STALE_S)"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "LOOMC_HEARTBEAT_STALE_S": "4.5"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "4.5"
    bad = subprocess.run([sys.executable, "-c", code], env={**env, "LOOMC_HEARTBEAT_STALE_S": "-1"},
                         capture_output=True, text=True, check=False)
    assert bad.returncode != 0
    assert "LOOMC_HEARTBEAT_STALE_S='-1': use a positive number of seconds" in bad.stderr
