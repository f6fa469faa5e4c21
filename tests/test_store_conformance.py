"""One conformance suite for every checkpoint store, and a store written from the protocol alone.

Every test runs against the SQLite store (sync), the memory store, the async face of the
SQLite store on asyncio (``AsyncSQLiteStore``, aiosqlite) and on trio (worker threads), and
the same three faces of the PostgreSQL store (a real server, a schema per test).
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

import loomc
from loomc import AmbiguousRunId, Budget, LoomcError, MemoryStore, RunNotFound, RunStatus, SQLiteStore, StepRecord, loop, predicate
from loomc.store.codec import decode, encode
from loomc.store.lease import owner_token
from loomc.store.postgres.aio import AsyncPostgresStore
from loomc.store.postgres.sync import PostgresStore
from loomc.store.protocol import (
    AsyncCheckpointStore,
    CheckpointStore,
    NewRun,
    Question,
    ResumePoint,
    RunLifeStore,
    SchemaInfo,
    StepRow,
    StoredInput,
    StoredStep,
    WaitRow,
)
from loomc.store.sqlite.aio import AsyncSQLiteStore, async_twin
from loomc.store.sqlite.sql import SCHEMA_VERSION, now_iso

pytestmark = pytest.mark.anyio

KINDS = [
    "sqlite", "memory", "sqlite-async-asyncio", "sqlite-async-trio",
    "postgres", "postgres-async-asyncio", "postgres-async-trio",
]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """Which store a test runs against."""
    return str(request.param)


@pytest.fixture
def anyio_backend(kind: str) -> str:
    """The async SQLite store runs on asyncio and on trio; the others on asyncio."""
    return "trio" if kind.endswith("trio") else "asyncio"


class Face:
    """One store with every method awaitable (a sync store's methods are called directly)."""

    def __init__(self, store: Any, *, is_async: bool) -> None:
        self.store, self.is_async = store, is_async

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.store, name)
        if self.is_async:
            return method  # type: ignore[no-any-return]

        async def call(*args: Any, **kwargs: Any) -> Any:
            return method(*args, **kwargs)

        return call


@pytest.fixture
async def store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Face]:
    """A fresh store of each kind (the async ones fail a test that blocks the event loop)."""
    if kind == "memory":
        yield Face(MemoryStore(), is_async=False)
        return
    sync: Any
    if kind.startswith("postgres"):
        sync = PostgresStore(request.getfixturevalue("pg_dsn"))
        sync.open()  # before the event-loop watch: a sync store connects in the caller's thread
    else:
        sync = SQLiteStore(tmp_path / "conf.db")
    if "-async" in kind:
        request.getfixturevalue("no_blocking")
    if kind in ("sqlite", "postgres"):
        yield Face(sync, is_async=False)
    else:
        twin = async_twin(sync)  # aiosqlite / psycopg's async pool under asyncio, worker threads under trio
        assert isinstance(twin, (AsyncSQLiteStore, AsyncPostgresStore)) == kind.endswith("-asyncio")
        async with twin:
            yield Face(twin, is_async=True)
    await anyio.to_thread.run_sync(sync.close)  # a pool's workers are joined: not on the event loop


def row(
    n: int, state: Any, cost: float, total: float, *, status: str = "running", next_from: int | None = None,
    error: str | None = None, ancestors: tuple[str, ...] = (), holds: tuple[int, ...] | None = None,
) -> StepRow:
    """A committed step row with its run totals."""
    return StepRow(
        n, encode(state), cost, n / 10, now_iso(), error, None, n if next_from is None else next_from, 0.01,
        total, n + 1, 0.1 * (n + 1), cost, status, None, ancestors, holds,
    )


def protocol_methods(proto: type) -> set[str]:
    """The method names a protocol lists."""
    return {n for n in vars(proto) if not n.startswith("_") and n not in {"is_async", "db_path"}} - {"close"}


def test_every_store_has_every_protocol_method() -> None:
    """The SQLite, memory and async SQLite stores implement every method of their protocol, async ones awaited."""
    sync_methods = protocol_methods(CheckpointStore)
    assert {"step_history", "charge_holds", "put_hold", "drop_holds", "renew_leases", "stored_state"} <= sync_methods
    assert protocol_methods(AsyncCheckpointStore) == sync_methods
    for cls in (SQLiteStore, MemoryStore, PostgresStore):
        assert sync_methods <= set(dir(cls)), cls
    for name in sync_methods:
        assert inspect.iscoroutinefunction(getattr(AsyncSQLiteStore, name)), name
        assert inspect.iscoroutinefunction(getattr(AsyncPostgresStore, name)), name


async def test_satisfies_the_protocol(store: Face) -> None:
    """Each store is a CheckpointStore, or (async) an AsyncCheckpointStore."""
    assert isinstance(store.store, AsyncCheckpointStore if store.is_async else CheckpointStore)


async def test_0_3_0_api(store: Face) -> None:
    """create_run / get_run / update_run_status / save_step / load_steps / list_runs."""
    rid = await store.create_run("abc123")
    assert len(rid) == 12
    info = await store.get_run(rid)
    assert (info.spec_hash, info.status) == ("abc123", RunStatus.RUNNING)
    await store.update_run_status(rid, RunStatus.COMPLETED)
    assert (await store.get_run(rid)).status is RunStatus.COMPLETED
    for i in range(3):
        await store.save_step(rid, StepRecord(step_n=i, state={"i": i}, cost_usd=0.01, score=i / 10))
    steps = await store.load_steps(rid)
    assert [(s.step_n, s.state, s.score) for s in steps] == [(0, {"i": 0}, 0.0), (1, {"i": 1}, 0.1), (2, {"i": 2}, 0.2)]
    assert all(isinstance(s.timestamp, datetime) for s in steps)
    assert (await store.get_run(rid)).cost_usd == pytest.approx(0.03)
    assert await store.get_run("nonexistent") is None
    assert [r.id for r in await store.list_runs()] == [rid]
    with pytest.raises(RunNotFound):
        await store.save_step("nonexistent", StepRecord(step_n=0, state={}))


async def test_search_runs_narrows_and_pages(store: Face) -> None:
    """``search_runs``: newest first, by status, id prefix and name (either case), roots only, page after page."""
    from loomc.store.protocol import RunSearch

    assert isinstance(store.store, RunSearch) or store.is_async
    made: list[str] = []
    for i in range(23):
        rid = await store.begin_run(NewRun(spec_hash="s", name=f"pkg.mod:Agent_{i % 3}", run_id=f"{i % 4:x}{i:011x}"))
        made.append(rid)
        if i % 5 == 0:
            await store.update_run_status(rid, RunStatus.FAILED)
    # (an id of its own: a random one starting with "2" would join the id-prefix search below)
    child = await store.begin_run(NewRun(spec_hash="s", name="pkg.mod:agent_1", parent_run_id=made[0], parent_step=0,
                                         call_index=0, run_id="feedfacecafe"))
    newest_first = [r.id for r in await store.list_runs()]
    assert newest_first[0] == child
    # every run, 5 at a time: the pages join up to list_runs' order, none twice, none left out
    seen: list[str] = []
    before = None
    while True:
        page = await store.search_runs(limit=5, before=before)
        seen += [r.id for r in page]
        if len(page) < 5:
            break
        before = (page[-1].created_at, page[-1].id)
    assert seen == newest_first
    roots = [r.id for r in await store.search_runs(roots_only=True, limit=100)]
    assert child not in roots
    assert len(roots) == 23
    failed = await store.search_runs(status="failed", limit=100)
    assert [r.id for r in failed] == [m for m in reversed(made) if int(m[1:], 16) % 5 == 0]
    by_prefix = await store.search_runs(id_prefix="2", limit=100)
    assert sorted(r.id for r in by_prefix) == sorted(m for m in made if m.startswith("2"))
    by_name = await store.search_runs(name="AGENT_1", limit=100)
    assert {r.name for r in by_name} == {"pkg.mod:Agent_1", "pkg.mod:agent_1"}
    assert len(by_name) == len([i for i in range(23) if i % 3 == 1]) + 1
    assert await store.search_runs(name="no such agent", limit=10) == []
    assert [r.id for r in await store.search_runs(status="failed", id_prefix="0", limit=2)] == [
        m for m in reversed(made) if m.startswith("0") and int(m[1:], 16) % 5 == 0
    ][:2]


async def test_commit_step_updates_totals_and_resume_point(store: Face) -> None:
    """A committed step moves the run's totals; the resume point starts from next_from."""
    rid = await store.begin_run(NewRun(spec_hash="h", name="m:f", input_blob=encode({"n": 0}), owner=owner_token()))
    await store.commit_step(rid, row(0, {"n": 1}, 0.1, 0.1))
    await store.commit_step(rid, row(1, {"n": 2}, 0.2, 0.3, next_from=0))
    info = await store.get_run(rid)
    assert (info.steps, info.cost_usd, info.max_step_cost) == (2, pytest.approx(0.3), 0.2)
    rp = await store.resume_point(rid)
    assert isinstance(rp, ResumePoint)
    assert (rp.next_from, rp.state_type, rp.start_blob) == (0, "json", encode({"n": 1}))
    # the history holds the last step, or all of them; the rest is read when needed
    assert [h.step_n for h in rp.history] == ([1] if rp.partial else [0, 1])
    earlier = await store.step_history(rid, rp.history[0].step_n)
    assert [h.step_n for h in earlier + rp.history] == [0, 1]
    # states load lazily, synchronously: off the event loop
    assert await anyio.to_thread.run_sync(lambda: rp.history[-1].state) == {"n": 2}
    assert await anyio.to_thread.run_sync(lambda: earlier[0].state) == {"n": 1} if rp.partial else earlier == []
    assert await store.load_state(rid, -1) == {"n": 0}
    assert await store.load_state(rid, 1) == {"n": 2}
    assert await store.stored_state(rid, 0) == encode({"n": 1})
    assert await store.stored_state(rid, 7) is None
    assert await store.stored_input(rid) == StoredInput("json", encode({"n": 0}), 0)
    assert await store.stored_input("nonexistent") is None
    with pytest.raises(RunNotFound):
        await store.resume_point("nonexistent")


async def test_a_fresh_run_resumes_from_its_input(store: Face) -> None:
    """A run with no step starts from its input (``next_from`` -1) with an empty history."""
    rid = await store.begin_run(NewRun(spec_hash="h", input_blob=encode({"n": 0})))
    rp = await store.resume_point(rid)
    assert (rp.next_from, rp.start_blob, rp.history, rp.in_flight_usd) == (-1, encode({"n": 0}), [], 0.0)


async def test_duplicate_run_id_is_refused(store: Face) -> None:
    """A second run with an existing id is refused (naming resume), the first left as it was."""
    await store.begin_run(NewRun(spec_hash="h", run_id="same0000id"))
    with pytest.raises(LoomcError, match="already exists"):
        await store.begin_run(NewRun(spec_hash="other", run_id="same0000id"))
    assert (await store.get_run("same0000id")).spec_hash == "h"


async def test_prefix_resolution(store: Face) -> None:
    """A unique prefix resolves; an ambiguous one and an unknown one raise."""
    a = await store.begin_run(NewRun(spec_hash="h", run_id="aaaa11112222"))
    await store.begin_run(NewRun(spec_hash="h", run_id="aaaa33334444"))
    assert await store.resolve("aaaa1") == a
    assert await store.resolve(a) == a
    with pytest.raises(AmbiguousRunId):
        await store.resolve("aaaa")
    with pytest.raises(RunNotFound, match="nearest"):
        await store.resolve("aaab")
    with pytest.raises(RunNotFound):
        await store.resolve("")


async def test_children_and_find_child(store: Face) -> None:
    """Child runs are found by (parent, parent step, call index) and listed in call order."""
    parent = await store.begin_run(NewRun(spec_hash="p"))
    c1 = await store.begin_run(NewRun(spec_hash="c", parent_run_id=parent, parent_step=0, call_index=1))
    c0 = await store.begin_run(NewRun(spec_hash="c", parent_run_id=parent, parent_step=0, call_index=0))
    assert (await store.find_child(parent, 0, 1)).id == c1
    assert await store.find_child(parent, 1, 0) is None
    assert [c.id for c in await store.children(parent)] == [c0, c1]
    assert [r.id for r in await store.list_runs(roots_only=True)] == [parent]
    assert len(await store.list_runs()) == 3


async def test_list_runs_filters(store: Face) -> None:
    """Newest first, with status and limit filters."""
    ids = [await store.begin_run(NewRun(spec_hash="h")) for _ in range(4)]
    await store.finish_run(ids[1], RunStatus.COMPLETED, "converged", 1.0)
    assert [r.id for r in await store.list_runs()] == ids[::-1]
    assert [r.id for r in await store.list_runs(status="completed")] == [ids[1]]
    assert len(await store.list_runs(limit=2)) == 2
    info = await store.get_run(ids[1])
    assert (info.stop_reason, info.wall_s) == ("converged", 1.0)


async def test_list_runs_running_and_crashed_honour_a_limit(store: Face, kind: str, gone: int) -> None:
    """``running`` and ``crashed`` (stored alike, told apart by the lease) find the runs asked for past many of the other."""
    dead_owner = f"{owner_token().split(':')[0]}:{gone}:0"  # this host, a process that has exited
    live = await store.begin_run(NewRun(spec_hash="h", run_id="000000000000"))
    await store.acquire(live, owner_token())
    dead = []
    for i in range(70):  # newer than the live run, and after it in id order: every page is full of them
        rid = await store.begin_run(NewRun(spec_hash="h", run_id=f"ffff{i:08x}"))
        await store.acquire(rid, dead_owner)
        dead.append(rid)
    if kind == "memory":  # a memory store's runs die with their process: none reads as crashed
        assert [r.id for r in await store.list_runs(status="running", limit=1)] == [dead[-1]]
        assert await store.list_runs(status="crashed") == []
        return
    assert [r.id for r in await store.list_runs(status="running", limit=1)] == [live]
    assert [r.id for r in await store.list_runs(status="running")] == [live]
    crashed = await store.list_runs(status="crashed", limit=3)
    assert len(crashed) == 3
    assert {r.status for r in crashed} == {RunStatus.CRASHED}
    assert {r.id for r in await store.list_runs(status="crashed")} == set(dead)
    assert len(await store.list_runs(status="crashed", limit=69)) == 69


@pytest.fixture(scope="module")
def gone() -> int:
    """The pid of a child process that has exited and been reaped."""
    with subprocess.Popen([sys.executable, "-c", "pass"]) as proc:
        proc.wait()
    return proc.pid


async def test_meta_and_cost(store: Face) -> None:
    """Free-form metadata and out-of-step cost additions persist."""
    rid = await store.begin_run(NewRun(spec_hash="h"))
    await store.set_meta(rid, {"breakers": {"search": "open"}})
    await store.add_cost(rid, 0.5)
    info = await store.get_run(rid)
    assert info.meta == {"breakers": {"search": "open"}}
    assert info.cost_usd == 0.5


async def test_acquire_and_renew_leases(store: Face) -> None:
    """``acquire`` takes a run's lease (and its budget); ``renew_leases`` keeps it; an unknown run is refused."""
    me = owner_token()
    rid = await store.begin_run(NewRun(spec_hash="h"))
    await store.finish_run(rid, RunStatus.INTERRUPTED, "interrupted", 0.5)
    await store.acquire(rid, me, {"usd": 2.0})
    await store.renew_leases(me, [rid])
    info = await store.get_run(rid)
    assert (info.status, info.owner, info.budget, info.stop_reason) == (RunStatus.RUNNING, me, {"usd": 2.0}, None)
    with pytest.raises(RunNotFound):
        await store.acquire("nonexistent", me)


async def test_rolls_a_step_up_to_its_ancestors(store: Face) -> None:
    """A nested run's step cost is added to every ancestor's total as it commits."""
    top = await store.begin_run(NewRun(spec_hash="t"))
    mid = await store.begin_run(NewRun(spec_hash="m", parent_run_id=top, parent_step=0, call_index=0))
    leaf = await store.begin_run(NewRun(spec_hash="l", parent_run_id=mid, parent_step=0, call_index=0))
    await store.commit_step(leaf, row(0, {"n": 1}, 0.25, 0.25, ancestors=(mid, top)))
    await store.commit_step(leaf, row(1, {"n": 2}, 0.5, 0.75, ancestors=(mid, top)))
    costs = [(await store.get_run(r)).cost_usd for r in (leaf, mid, top)]
    assert costs == [pytest.approx(0.75)] * 3
    # the top's open step has children that spent: a resume takes it into account
    assert (await store.resume_point(top)).in_flight_usd == pytest.approx(0.75)


async def test_holds_are_charged_dropped_and_cleared_by_their_step(store: Face) -> None:
    """put_hold / charge_holds (the run's tree, to the run and its ancestors) / drop_holds / commit_step(holds)."""
    top = await store.begin_run(NewRun(spec_hash="t"))
    kid = await store.begin_run(NewRun(spec_hash="k", parent_run_id=top, parent_step=0, call_index=0))
    assert await store.charge_holds(top) is None
    await store.put_hold(top, 11, 0.5)
    await store.put_hold(kid, 12, 0.25)
    await store.put_hold(kid, 13, 1.0)
    await store.drop_holds((13,))
    charge = await store.charge_holds(kid)
    assert (charge.usd, charge.holds) == (0.25, 1)
    assert (await store.get_run(kid)).meta["held_charges"] == [charge.record()]
    assert (await store.get_run(top)).cost_usd == pytest.approx(0.25)  # rolled up
    await store.put_hold(top, 14, 2.0)
    await store.commit_step(top, row(0, {"n": 1}, 0.5, 0.75, holds=(11,)))  # the step accounts for hold 11
    charge = await store.charge_holds(top)
    assert (charge.usd, charge.holds) == (2.0, 1)
    assert await store.charge_holds(top) is None


async def test_step_window_and_totals(store: Face) -> None:
    """Windowed step metadata (after, first, last, errors cut) and the totals a window leaves out."""
    rid = await store.begin_run(NewRun(spec_hash="h"))
    total = 0.0
    for n in range(6):
        total += 0.1
        await store.commit_step(rid, row(n, {"n": n}, 0.1, total, error="boom" * 10 if n == 4 else None))
    window = await store.step_window(rid)
    assert [s.step_n for s in window] == list(range(6))
    assert all(isinstance(s, StepRecord) and s.state is None for s in window)
    assert [s.step_n for s in await store.step_window(rid, 1, first=2)] == [2, 3]
    last = await store.step_window(rid, last=2)
    assert [s.step_n for s in last] == [4, 5]
    assert last[0].error == "boom" * 10
    assert (await store.step_window(rid, last=3, error_chars=6))[1].error == "boombo"
    assert [s.step_n for s in await store.step_window(rid, 4, last=3)] == [5]
    assert (await store.step_window(rid, 2))[0].score == 0.3
    assert await store.step_totals(rid, 3) == (3, pytest.approx(0.3))
    assert await store.step_totals(rid, 0) == (0, 0.0)


async def test_large_states_and_stored_steps(store: Face) -> None:
    """A compressed state round-trips; ``stored_steps`` gives states as stored, whole."""
    rid = await store.begin_run(NewRun(spec_hash="h", input_blob=encode({"doc": ""})))
    big = {"doc": "tide " * 5000}
    await store.commit_step(rid, row(0, {"doc": "small"}, 0.1, 0.1))
    await store.commit_step(rid, row(1, big, 0.1, 0.2))
    assert await store.load_state(rid, 0) == {"doc": "small"}
    assert await store.load_state(rid, 1) == big
    assert [s.state for s in await store.load_steps(rid)] == [{"doc": "small"}, big]
    stored = await store.stored_steps(rid)
    assert all(isinstance(s, StoredStep) for s in stored)
    assert [decode(s.state, "json") for s in stored] == [{"doc": "small"}, big]
    assert [(s.step_n, s.cost_usd, s.score) for s in stored] == [(0, 0.1, 0.0), (1, 0.1, 0.1)]


async def test_schema_info(store: Face) -> None:
    """The store reports its schema version and the ones this loomc handles."""
    info = await store.schema_info()
    assert info == SchemaInfo(SCHEMA_VERSION, info.reads_from, SCHEMA_VERSION)
    assert 1 <= info.reads_from <= SCHEMA_VERSION


def test_every_store_has_the_run_life_methods() -> None:
    """The SQLite, memory and async SQLite stores keep questions, fork and prune (RunLifeStore)."""
    methods = protocol_methods(RunLifeStore)
    assert methods == {"questions", "wait_for_input", "answer", "fork", "prune"}
    for cls in (SQLiteStore, MemoryStore, AsyncSQLiteStore):
        assert methods <= set(dir(cls)), cls
    assert isinstance(SQLiteStore(":memory:"), RunLifeStore)
    assert not isinstance(TinyStore(), RunLifeStore)  # optional: a store of one's own may leave them out


async def test_questions_fork_and_prune(store: Face) -> None:
    """Every store waits with a question, stores one answer, forks a run's history and prunes whole trees."""
    rid = await store.begin_run(NewRun(spec_hash="h", name="tests:life"))
    for n in range(3):
        await store.commit_step(rid, row(n, {"n": n}, 0.1, round(0.1 * (n + 1), 12)))
    asked = Question(rid, 3, 0, "ok?", None, '{"type": "boolean"}', "")
    await store.wait_for_input(rid, WaitRow(0.35, 1.0, "waiting: ok?", asked))
    info = await store.get_run(rid)
    assert info.status is RunStatus.WAITING
    assert info.cost_usd == pytest.approx(0.35)
    assert info.steps == 3
    (stored,) = await store.questions(rid)
    assert (stored.step_n, stored.text, stored.answer) == (3, "ok?", None)
    await store.answer(stored, "true")
    with pytest.raises(LoomcError, match="already answered"):
        await store.answer(stored, "false")
    assert [q.answer for q in await store.questions(rid, True)] == ["true"]

    fid = await store.fork(rid, 1, new_run_id="f0rk00000001")
    fork = await store.get_run(fid)
    assert (fork.forked_from, fork.forked_step, fork.steps, fork.status) == (rid, 1, 2, RunStatus.INTERRUPTED)
    assert fork.cost_usd == pytest.approx(0.2)
    assert [s.state for s in await store.load_steps(fid)] == [{"n": 0}, {"n": 1}]
    assert (await store.resume_point(fid)).next_from == 1
    with pytest.raises(ValueError, match=r"steps 0\.\.2"):
        await store.fork(rid, 3, new_run_id="f0rk00000002")
    edited = await store.fork(rid, 0, new_run_id="f0rk00000003", state_blob=encode({"n": 99}))
    assert decode((await store.resume_point(edited)).start_blob) == {"n": 99}
    assert [s.state for s in await store.load_steps(rid)] == [{"n": 0}, {"n": 1}, {"n": 2}]  # the original's

    report = await store.prune(name="tests:*", older_than=0, dry_run=True)
    assert {r.id for r in report.roots} == {fid, edited}  # never the waiting run
    assert len(await store.list_runs()) == 3
    await store.finish_run(rid, RunStatus.COMPLETED, None, 1.0)
    report = await store.prune(status="completed", name="tests:life")
    assert [r.id for r in report.roots] == [rid]
    assert (report.runs, report.steps, report.questions) == (1, 3, 1)
    assert [s.state for s in await store.load_steps(fid)] == [{"n": 0}, {"n": 1}]  # the fork reads on
    assert await store.questions(rid) == []


def test_large_states_live_in_blobs(tmp_path: Path) -> None:
    """SQLite keeps a compressed state in the blobs table, small ones inline as JSON."""
    import sqlite3

    store = SQLiteStore(tmp_path / "blobs.db")
    rid = store.begin_run(NewRun(spec_hash="h", input_blob=encode({"doc": ""})))
    store.commit_step(rid, row(0, {"doc": "small"}, 0.1, 0.1))
    store.commit_step(rid, row(1, {"doc": "tide " * 5000}, 0.1, 0.2))
    store.close()
    with sqlite3.connect(tmp_path / "blobs.db") as c:
        inline, ref = c.execute("SELECT state_blob, blob_id FROM steps WHERE step_n = 0").fetchone()
        assert (inline, ref) == ('{"doc":"small"}', None)
        inline, ref = c.execute("SELECT state_blob, blob_id FROM steps WHERE step_n = 1").fetchone()
        assert inline is None
        (data,) = c.execute("SELECT data FROM blobs WHERE id = ?", (ref,)).fetchone()
        assert data[:1] == b"Z"
        assert len(data) < len("tide " * 5000) / 10


# -- a store written from the protocol alone ----------------------------------------------


class TinyStore:
    """A checkpoint store built from ``loomc.store.protocol`` and the state codec only: dicts and a lock."""

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, Any]] = {}
        self.steps: dict[str, dict[int, StepRow]] = {}
        self.calls: list[str] = []
        self.lock = threading.RLock()
        self.db_path = "tiny"
        self.n = 0

    def _info(self, run_id: str) -> loomc.RunInfo:
        r = self.runs[run_id]
        return loomc.RunInfo(
            id=run_id, spec_hash=r["spec_hash"], status=RunStatus(r["status"]), created_at=r["created_at"],
            updated_at=r["created_at"], name=r["name"], kind=r["kind"], parent_run_id=r["parent_run_id"],
            cost_usd=r["cost_usd"], steps=r["steps"], parent_step=r["parent_step"], call_index=r["call_index"],
            wall_s=r["wall_s"], budget=dict(r["budget"] or {}), stop_reason=r["stop_reason"], owner=r["owner"],
            meta=dict(r["meta"] or {}),
        )

    def _log(self, name: str) -> None:
        with self.lock:
            self.calls.append(name)

    def create_run(self, spec_hash: str, **kwargs: Any) -> str:
        return self.begin_run(NewRun(spec_hash=spec_hash, **kwargs))

    def begin_run(self, new: NewRun) -> str:
        self._log("begin_run")
        with self.lock:
            self.n += 1
            run_id = new.run_id or f"tiny{self.n:08d}"
            if run_id in self.runs:
                raise LoomcError(f"run id {run_id!r} already exists; resume it or choose another id")
            self.runs[run_id] = {
                "spec_hash": new.spec_hash, "status": "running", "created_at": f"{self.n:012d}", "name": new.name,
                "kind": new.kind, "parent_run_id": new.parent_run_id, "parent_step": new.parent_step,
                "call_index": new.call_index, "state_type": new.state_type, "input": new.input_blob,
                "budget": new.budget, "cost_usd": new.cost_usd, "steps": 0, "wall_s": 0.0, "next_from": None,
                "stop_reason": None, "owner": new.owner, "meta": new.meta,
            }
            self.steps[run_id] = {}
            return run_id

    def get_run(self, run_id: str) -> loomc.RunInfo | None:
        self._log("get_run")
        with self.lock:
            return self._info(run_id) if run_id in self.runs else None

    def list_runs(self, *, status: str | None = None, limit: int | None = None, roots_only: bool = False) -> list[loomc.RunInfo]:
        with self.lock:
            runs = [self._info(r) for r in reversed(self.runs)]
        runs = [r for r in runs if (status is None or r.status.value == status) and not (roots_only and r.parent_run_id)]
        return runs[:limit] if limit is not None else runs

    def update_run_status(self, run_id: str, status: RunStatus | str) -> None:
        with self.lock:
            self.runs[run_id]["status"] = RunStatus(status).value

    def save_step(self, run_id: str, record: StepRecord) -> None:
        raise NotImplementedError  # only 0.3.0 callers use it; the engine commits StepRows

    def load_steps(self, run_id: str) -> list[StepRecord]:
        return self.step_history(run_id, 1 << 62)

    def resolve(self, run_id: str) -> str:
        self._log("resolve")
        found = [r for r in self.runs if r.startswith(run_id)]
        if len(found) != 1:
            raise RunNotFound(run_id, where="tiny")
        return found[0]

    def acquire(self, run_id: str, owner: str, budget: dict[str, Any] | None = None) -> None:
        self._log("acquire")
        with self.lock:
            self.runs[run_id].update(status="running", owner=owner, stop_reason=None)
            if budget is not None:
                self.runs[run_id]["budget"] = budget

    def renew_leases(self, owner: str, run_ids: list[str]) -> None:
        self._log("renew_leases")

    def finish_run(self, run_id: str, status: RunStatus, stop_reason: str | None, wall_s: float) -> None:
        self._log("finish_run")
        with self.lock:
            r = self.runs[run_id]
            r.update(status=status.value, stop_reason=stop_reason, wall_s=max(r["wall_s"], wall_s))

    def set_meta(self, run_id: str, meta: dict[str, Any]) -> None:
        with self.lock:
            self.runs[run_id]["meta"] = dict(meta)

    def add_cost(self, run_id: str, usd: float) -> None:
        self._log("add_cost")
        with self.lock:
            self.runs[run_id]["cost_usd"] += usd

    def find_child(self, parent_run_id: str, parent_step: int, call_index: int) -> loomc.RunInfo | None:
        self._log("find_child")
        with self.lock:
            for rid, r in self.runs.items():
                if (r["parent_run_id"], r["parent_step"], r["call_index"]) == (parent_run_id, parent_step, call_index):
                    return self._info(rid)
        return None

    def children(self, run_id: str) -> list[loomc.RunInfo]:
        with self.lock:
            return [self._info(k) for k, r in self.runs.items() if r["parent_run_id"] == run_id]

    def schema_info(self) -> SchemaInfo:
        return SchemaInfo(1, 1, 1)

    def commit_step(self, run_id: str, row: StepRow) -> None:
        self._log("commit_step")
        with self.lock:
            rise = row.total_cost - self.runs[run_id]["cost_usd"]
            for up in row.ancestors:
                self.runs[up]["cost_usd"] += rise
            self.steps[run_id][row.step_n] = row
            self.runs[run_id].update(
                cost_usd=row.total_cost, steps=row.total_steps, wall_s=row.total_wall_s, next_from=row.next_from,
                status=row.status, stop_reason=row.stop_reason,
            )

    def _record(self, run_id: str, s: StepRow) -> StepRecord:
        state = decode(s.state_blob, self.runs[run_id]["state_type"])
        return StepRecord(s.step_n, state, s.cost_usd, s.score, s.timestamp, s.error, s.event)

    def resume_point(self, run_id: str) -> ResumePoint:
        self._log("resume_point")
        with self.lock:
            r = self.runs[run_id]
            history = [self._record(run_id, s) for _, s in sorted(self.steps[run_id].items())]
            next_from = r["next_from"] if r["next_from"] is not None else -1
            blob = r["input"] if next_from < 0 else self.steps[run_id][next_from].state_blob
            return ResumePoint(self._info(run_id), r["state_type"], blob, next_from, history)

    def step_history(self, run_id: str, before: int) -> list[StepRecord]:
        with self.lock:
            return [self._record(run_id, s) for n, s in sorted(self.steps[run_id].items()) if n < before]

    def load_state(self, run_id: str, step_n: int) -> Any:
        self._log("load_state")
        with self.lock:
            r = self.runs[run_id]
            blob = r["input"] if step_n < 0 else self.steps[run_id][step_n].state_blob
            return decode(blob, r["state_type"])

    def stored_state(self, run_id: str, step_n: int) -> str | bytes | None:
        s = self.steps[run_id].get(step_n)
        return s.state_blob if s is not None else None

    def stored_input(self, run_id: str) -> StoredInput | None:
        r = self.runs.get(run_id)
        return StoredInput(r["state_type"], r["input"], r["next_from"]) if r else None

    def stored_steps(self, run_id: str) -> list[StoredStep]:
        return [
            StoredStep(n, s.state_blob or "", s.cost_usd, s.score, s.timestamp, s.error, s.event)
            for n, s in sorted(self.steps[run_id].items())
        ]

    def step_window(
        self, run_id: str, after: int = -1, *, first: int | None = None, last: int | None = None,
        error_chars: int | None = None,
    ) -> list[StepRecord]:
        rows = [replace(s, state_blob=None) for n, s in sorted(self.steps[run_id].items()) if n > after]
        return [StepRecord(s.step_n, None, s.cost_usd, s.score, s.timestamp, s.error, s.event) for s in rows]

    def step_totals(self, run_id: str, before: int) -> tuple[int, float]:
        rows = [s for n, s in self.steps[run_id].items() if n < before]
        return len(rows), sum(s.cost_usd for s in rows)

    def put_hold(self, run_id: str, hold_id: int, usd: float) -> None:
        self._log("put_hold")

    def drop_holds(self, hold_ids: tuple[int, ...]) -> None:
        self._log("drop_holds")

    def charge_holds(self, run_id: str) -> None:
        self._log("charge_holds")

    def close(self) -> None:
        pass


def test_tiny_store_is_a_checkpoint_store() -> None:
    """The tiny store satisfies the protocol it was written from."""
    assert isinstance(TinyStore(), CheckpointStore)


def _counter(tiny: TinyStore, budget: int = 4) -> Any:
    @loop(checkpoint=tiny, budget=Budget(iterations=budget), converge_on=predicate(lambda h: h[-1].state["n"] >= 3))
    def count(s: dict[str, Any]) -> dict[str, Any]:
        loomc.charge(0.01)
        return {"n": s["n"] + 1}

    return count


def test_tiny_store_runs_a_loop_and_resumes_it() -> None:
    """A loop runs on the tiny store, and a run interrupted there resumes from it."""
    tiny = TinyStore()
    result = _counter(tiny).run({"n": 0})
    assert (result.status, result.state, result.cost_usd) == (RunStatus.COMPLETED, {"n": 3}, pytest.approx(0.03))
    assert tiny.calls.count("commit_step") == 3
    rid = result.run_id
    assert tiny.runs[rid]["status"] == "completed"
    # pretend the process died after step 1: the same loop resumes from step 1's state
    del tiny.steps[rid][2]
    tiny.runs[rid].update(status="interrupted", next_from=1, steps=2, cost_usd=0.02)
    resumed = _counter(tiny).resume_run(rid)
    assert (resumed.status, resumed.state, resumed.steps) == (RunStatus.COMPLETED, {"n": 3}, 3)
    assert resumed.cost_usd == pytest.approx(0.03)


def test_tiny_store_runs_nested_loops() -> None:
    """A nested loop's run is a child in the tiny store; its spending reaches the parent."""
    tiny = TinyStore()

    @loop(budget=Budget(iterations=2))
    def inner(s: dict[str, Any]) -> dict[str, Any]:
        loomc.charge(0.1)
        return {"k": s["k"] + 1}

    @loop(checkpoint=tiny, budget=Budget(iterations=2, usd=5.0))
    def outer(s: dict[str, Any]) -> dict[str, Any]:
        inner.run({"k": 0})
        return {"n": s["n"] + 1}

    with pytest.raises(loomc.BudgetExhausted) as caught:
        outer({"n": 0})
    top = caught.value.run_id
    kids = tiny.children(top)
    assert [(k.parent_step, k.call_index) for k in kids] == [(0, 0), (1, 0)]
    assert tiny.runs[top]["cost_usd"] == pytest.approx(0.4)
    assert "find_child" in tiny.calls


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_tiny_store_runs_async_loops(anyio_backend: str) -> None:
    """Async loops (asyncio and trio) drive the tiny store from worker threads."""
    tiny = TinyStore()

    @loop(checkpoint=tiny, budget=Budget(iterations=5), converge_on=predicate(lambda h: h[-1].state["n"] >= 3))
    async def count(s: dict[str, Any]) -> dict[str, Any]:
        loomc.charge(0.01)
        await anyio.sleep(0)
        return {"n": s["n"] + 1}

    result = await count.run({"n": 0})
    assert (result.status, result.state) == (RunStatus.COMPLETED, {"n": 3})
    assert tiny.calls.count("commit_step") == 3


def test_tiny_store_runs_a_graph_sync() -> None:
    """A graph (its run and its nodes' runs) lives in the tiny store."""
    from orchestration import Graph

    tiny = TinyStore()

    @loop(budget=Budget(iterations=1))
    def double(s: dict[str, Any]) -> dict[str, Any]:
        loomc.charge(0.5)
        return {"x": s["x"] * 2}

    def plus_one(s: dict[str, Any]) -> dict[str, Any]:
        return {"x": s["double"]["x"] + 1} if "double" in s else {"x": s["x"] + 1}

    g = Graph("tiny-graph", checkpoint=tiny)
    g.add(double)
    g.add(plus_one, after=double)
    result = g.run({"x": 3})
    assert result.status is RunStatus.COMPLETED, result
    assert result.outputs["plus_one"] == {"x": 7}
    graph_run = tiny.runs[result.run_id]
    assert graph_run["kind"] == "graph"
    assert graph_run["cost_usd"] == pytest.approx(0.5)
    assert {k.name.rsplit(".", 1)[-1] for k in tiny.children(result.run_id)} >= {"double"}


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_tiny_store_runs_a_graph_async(anyio_backend: str) -> None:
    """``await graph.arun`` with async nodes on the tiny store (asyncio and trio)."""
    from orchestration import Graph

    tiny = TinyStore()

    @loop(budget=Budget(iterations=2))
    async def twice(s: dict[str, Any]) -> dict[str, Any]:
        loomc.charge(0.25)
        await anyio.sleep(0)
        return {"x": s["x"] + 1}

    g = Graph("tiny-async-graph", checkpoint=tiny)
    g.add(twice)
    result = await g.arun({"x": 0})
    assert result.status is RunStatus.COMPLETED, result
    assert result.outputs["twice"] == {"x": 2}
    assert tiny.runs[result.run_id]["cost_usd"] == pytest.approx(0.5)


# -- the CLI and the async group commit go through the same seams ------------------------


def test_the_cli_reads_steps_and_exports_through_the_protocol() -> None:
    """The step table and ``loomc export`` read any CheckpointStore (here the memory store), never SQL."""
    from loomc.cli import render
    from loomc.cli.app import _export_node

    store = MemoryStore()

    @loop(checkpoint=store, budget=Budget(iterations=4))
    def count(s: dict[str, Any]) -> dict[str, Any]:
        loomc.charge(0.5)
        return {"n": s["n"] + 1}

    with pytest.raises(loomc.BudgetExhausted) as caught:
        count({"n": 0})
    rid = caught.value.run_id
    assert [s.step_n for s in render.read_steps(store, rid, last=2)] == [2, 3]
    assert render.step_totals(store, rid, 2) == (2, 1.0)
    info = store.get_run(rid)
    assert info is not None
    exported = _export_node(store, info)  # type: ignore[arg-type]
    assert exported["input"] == {"n": 0}
    assert [(h["step"], h["state"], h["cumul_usd"]) for h in exported["history"]] == [
        (0, {"n": 1}, 0.5), (1, {"n": 2}, 1.0), (2, {"n": 3}, 1.5), (3, {"n": 4}, 2.0),
    ]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_async_writes_are_group_committed_by_the_sync_transaction_driver(tmp_path: Path, anyio_backend: str) -> None:
    """Steps committed by many tasks at once share transactions, run by ``SQLiteStore.write_batch``."""
    sync = SQLiteStore(tmp_path / "group.db", durability="process")
    commits: list[str] = []
    sync.conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    async with AsyncSQLiteStore(sync=sync) as store:
        ids = [await store.begin_run(NewRun(spec_hash="h")) for _ in range(20)]
        commits.clear()
        async with anyio.create_task_group() as tg:
            for rid in ids:
                tg.start_soon(store.commit_step, rid, row(0, {"n": 1}, 0.1, 0.1))
        assert 0 < len(commits) < 20  # one transaction served several tasks' steps
        assert [(await store.get_run(rid)).steps for rid in ids] == [1] * 20
    sync.close()
