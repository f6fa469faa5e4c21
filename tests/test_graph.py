"""orchestration.Graph: building, concurrency, input wiring, budgets, failures and graph-wide resume."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from blockbuster import BlockBuster, blockbuster_ctx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loomc
from loomc import Budget, Escalate, RunStatus, SpecMismatch, SQLiteStore, loop, predicate
from orchestration import Graph, GraphResult, ProgressEvent

EPS = 1e-9


class Log:
    """Thread-safe record of (node, start, end) intervals and of every executed step."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: dict[str, tuple[float, float]] = {}
        self.calls: Counter[str] = Counter()
        self.active = 0
        self.max_active = 0

    def enter(self, name: str) -> float:
        with self.lock:
            self.calls[name] += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        return time.monotonic()

    def leave(self, name: str, start: float) -> None:
        with self.lock:
            self.active -= 1
            self.spans[name] = (start, time.monotonic())

    def overlap(self, a: str, b: str) -> bool:
        (s1, e1), (s2, e2) = self.spans[a], self.spans[b]
        return s1 < e2 and s2 < e1


def sleeper(log: Log, name: str, seconds: float, out: Callable[[Any], Any] = lambda s: s) -> Callable[[Any], Any]:
    """A plain sync node that sleeps ``seconds`` and returns ``out(state)``."""

    def node(state: Any) -> Any:
        t = log.enter(name)
        time.sleep(seconds)
        log.leave(name, t)
        return out(state)

    node.__name__ = node.__qualname__ = name
    return node


def runs_table(db: str) -> list[dict[str, Any]]:
    """Every run of the database as dicts."""
    with sqlite3.connect(db) as c:
        c.row_factory = sqlite3.Row
        return [dict(r) for r in c.execute("SELECT * FROM runs ORDER BY created_at")]


# -- building ----------------------------------------------------------------------


def test_add_refuses_duplicates_unknown_upstreams_and_cycles() -> None:
    """Duplicate names, unknown upstreams and self-edges are ValueErrors naming the node."""
    g = Graph("g")
    g.add(lambda s: s, name="a")
    with pytest.raises(ValueError, match="'a' already exists"):
        g.add(lambda s: s, name="a")
    with pytest.raises(ValueError, match="node 'b' comes after unknown node 'nope'"):
        g.add(lambda s: s, name="b", after="nope")
    with pytest.raises(ValueError, match="node 'c' cannot come after itself"):
        g.add(lambda s: s, name="c", after=["a", "c"])
    assert g.nodes == ["a"]
    with pytest.raises(ValueError, match="iterations"):
        Graph("g", budget=Budget(iterations=3))
    with pytest.raises(ValueError, match="max_concurrency"):
        Graph("g", max_concurrency=0)
    with pytest.raises(ValueError, match="no nodes"):
        Graph("empty").run(None)


def test_after_accepts_the_added_objects_and_the_dag_is_networkx() -> None:
    """``after=`` takes the function or loop that was added; the graph draws as text and mermaid."""

    @loop(budget=Budget(iterations=1))
    def first(s: Any) -> Any:
        return s

    def second(s: Any) -> Any:
        return s

    g = Graph("shape")
    assert g.add(first) is first
    g.add(second, after=first)
    g.add(lambda s: s, name="third", after=[first, second])
    assert list(g.dag.edges) == [("first", "second"), ("first", "third"), ("second", "third")]
    assert g.upstream("third") == ["first", "second"]
    assert g.downstream("first") == ["second", "third"]
    text = g.to_text()
    assert "stage 3" in text
    assert "third" in text
    assert "<- first, second" in text
    assert g.to_mermaid().splitlines()[0] == "flowchart TD"
    assert "n0 --> n2" in g.to_mermaid()


# -- concurrency -------------------------------------------------------------------


def test_diamond_runs_the_middle_nodes_concurrently(db: str) -> None:
    """In a diamond A -> (B, C) -> D, B and C overlap in time and D starts after both."""
    log = Log()
    g = Graph("diamond", checkpoint=db)
    g.add(sleeper(log, "a", 0.05))
    g.add(sleeper(log, "b", 0.4), after="a")
    g.add(sleeper(log, "c", 0.4), after="a")
    g.add(sleeper(log, "d", 0.05), after=["b", "c"])
    t0 = time.monotonic()
    result = g.run({"x": 1})
    elapsed = time.monotonic() - t0
    assert result.status is RunStatus.COMPLETED
    assert log.overlap("b", "c")
    assert log.spans["d"][0] >= max(log.spans["b"][1], log.spans["c"][1])
    assert log.spans["b"][0] >= log.spans["a"][1]
    assert elapsed < 0.8 + 0.5  # sequential would take > 0.9 s of sleeps alone
    assert result.outputs["d"] == {"b": {"x": 1}, "c": {"x": 1}}


def test_max_concurrency_bounds_the_nodes_running_at_once(db: str) -> None:
    """Five independent nodes with max_concurrency=2 never run more than two at a time."""
    log = Log()
    g = Graph("bounded", checkpoint=db, max_concurrency=2)
    for i in range(5):
        g.add(sleeper(log, f"n{i}", 0.12))
    result = g.run(None)
    assert result.status is RunStatus.COMPLETED
    assert log.max_active == 2
    assert sum(log.calls.values()) == 5


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The async graph tests run on asyncio and on trio."""
    return str(request.param)


@pytest.fixture
def blockbuster() -> Iterator[BlockBuster]:
    """Fail a test that makes a blocking call on the event loop."""
    with blockbuster_ctx() as bb:
        for name in ("io.BufferedReader.read", "io.FileIO.read", "os.stat", "os.path.exists"):
            if name in bb.functions:
                bb.functions[name].can_block_in("loomc/store/lease.py", {"_start_time", "is_alive"})
        yield bb


@pytest.mark.anyio
async def test_arun_mixes_async_and_sync_nodes_concurrently(db: str, anyio_backend: str, blockbuster: BlockBuster) -> None:
    """``await graph.arun``: async loops run as tasks, sync ones in threads, side by side, never blocking the loop."""
    log = Log()

    @loop(budget=Budget(iterations=2), converge_on=predicate(lambda h: len(h) >= 2))
    async def slow_async(s: dict[str, Any]) -> dict[str, Any]:
        t = log.enter("slow_async")
        loomc.charge(0.01)
        await anyio.sleep(0.2)
        log.leave("slow_async", t)
        return {**s, "n": s.get("n", 0) + 1}

    def sync_node(s: dict[str, Any]) -> dict[str, Any]:
        t = log.enter("sync_node")
        loomc.charge(0.02)
        time.sleep(0.3)  # runs in a worker thread, not on the event loop
        log.leave("sync_node", t)
        return {"seen": s["topic"]}

    async def join(up: dict[str, Any]) -> dict[str, Any]:
        return {"n": up["slow_async"]["n"], "seen": up["sync_node"]["seen"]}

    g = Graph("mixed", checkpoint=db, budget=Budget(usd=1.0))
    g.add(slow_async)
    g.add(sync_node)
    g.add(join, after=[slow_async, sync_node])
    result = await g.arun({"topic": "t"})
    assert result.status is RunStatus.COMPLETED, result
    assert log.overlap("slow_async", "sync_node")
    assert result.outputs["join"] == {"n": 2, "seen": "t"}
    assert result.cost_usd == pytest.approx(0.04)


# -- input wiring ------------------------------------------------------------------


def test_inputs_root_single_several_and_override(db: str) -> None:
    """Root: the graph input; one upstream: its final state; several: {name: state}; inputs= overrides."""
    seen: dict[str, Any] = {}

    def rec(name: str, out: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def node(state: Any) -> Any:
            seen[name] = state
            return out(state)

        node.__name__ = node.__qualname__ = name
        return node

    g = Graph("wiring", checkpoint=db)
    g.add(rec("root", lambda s: {"r": s["q"] * 2}))
    g.add(rec("one", lambda s: {"o": s["r"] + 1}), after="root")
    g.add(rec("two", lambda s: {"t": s["r"] + 2}), after="root")
    g.add(rec("many", lambda s: s), after=["one", "two"])
    g.add(
        rec("custom", lambda s: s),
        after=["one", "two"],
        inputs=lambda up, graph_input: {"sum": up["one"]["o"] + up["two"]["t"], "q": graph_input["q"]},
    )
    result = g.run({"q": 5})
    assert result.status is RunStatus.COMPLETED
    assert seen["root"] == {"q": 5}
    assert seen["one"] == {"r": 10}
    assert seen["many"] == {"one": {"o": 11}, "two": {"t": 12}}
    assert seen["custom"] == {"sum": 23, "q": 5}
    assert result.outputs["custom"] == {"sum": 23, "q": 5}


def test_a_failing_inputs_function_fails_only_its_node(db: str) -> None:
    """An ``inputs=`` that raises fails its node (and its branch), with the error kept."""
    g = Graph("bad-inputs", checkpoint=db)
    g.add(lambda s: s, name="a")
    g.add(lambda s: s, name="b", after="a", inputs=lambda up, gi: up["missing"])
    g.add(lambda s: s, name="c", after="a")
    result = g.run({})
    assert result.status is RunStatus.FAILED
    assert result.nodes["b"].status == "failed"
    assert isinstance(result.nodes["b"].error, KeyError)
    assert result.nodes["c"].status == "completed"


# -- budgets -----------------------------------------------------------------------


def test_global_cap_holds_with_concurrent_nodes_charging(db: str) -> None:
    """Four concurrent loops charging into one graph cap never cross it; later nodes are not started."""
    started: list[str] = []

    def spender(name: str) -> Any:
        def step(s: dict[str, Any]) -> dict[str, Any]:
            loomc.charge(0.07)
            time.sleep(0.01)
            loomc.charge(0.06)
            return {"n": s.get("n", 0) + 1}

        step.__name__ = step.__qualname__ = name
        return loop(budget=Budget(iterations=100))(step)

    def after_all(s: Any) -> Any:
        started.append("after_all")
        return s

    g = Graph("capped", checkpoint=db, budget=Budget(usd=1.0))
    for i in range(4):
        g.add(spender(f"s{i}"), inputs=lambda up, gi: {"n": 0})
    g.add(after_all, after=["s0", "s1", "s2", "s3"])
    result = g.run(None)
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert result.cost_usd <= 1.0 + EPS
    assert result.cost_usd > 1.0 - 0.13 - EPS  # it spent up to the cap, less than one step short
    assert started == []
    assert result.nodes["after_all"].status == "pending"
    node_costs = [result.nodes[f"s{i}"].cost_usd for i in range(4)]
    assert sum(node_costs) == pytest.approx(result.cost_usd)
    assert all(c > 0 for c in node_costs)  # they really ran side by side
    rows = {r["id"]: r for r in runs_table(db)}
    graph_row = rows[result.run_id]
    assert graph_row["kind"] == "graph"
    assert graph_row["status"] == "budget_exhausted"
    assert graph_row["cost_usd"] == pytest.approx(result.cost_usd)
    children = [r for r in rows.values() if r["parent_run_id"] == result.run_id]
    assert sorted(r["call_index"] for r in children) == [0, 1, 2, 3]
    assert {r["kind"] for r in children} == {"node"}
    assert sum(r["cost_usd"] for r in children) == pytest.approx(result.cost_usd)


def test_concurrent_nodes_hold_their_next_step_estimate_against_the_graph_cap(db: str) -> None:
    """Nodes whose cost is only known after the step (cost_fn) reserve their estimate first: no overshoot."""
    log = Log()

    def reporter(name: str) -> Any:
        def step(s: dict[str, Any]) -> dict[str, Any]:
            t = log.enter(name)
            time.sleep(0.02)
            log.leave(name, t)
            return {"n": s.get("n", 0) + 1}

        step.__name__ = step.__qualname__ = name
        return loop(budget=Budget(iterations=50), cost_fn=lambda s: 0.10)(step)

    g = Graph("estimates", checkpoint=db, budget=Budget(usd=1.0))
    for i in range(4):
        g.add(reporter(f"r{i}"), inputs=lambda up, gi: {"n": 0})
    result = g.run(None)
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    # The first step of each node has no estimate (cost unknown); from then on every
    # step is held against the graph before it starts, so the total lands exactly on the cap.
    assert result.cost_usd == pytest.approx(1.0)
    assert sum(result.nodes[f"r{i}"].steps for i in range(4)) == 10
    assert log.max_active > 1


def test_node_out_of_its_own_budget_hands_its_last_state_on(db: str) -> None:
    """A node that exhausts its own budget says so, and its last state flows downstream."""

    @loop(budget=Budget(iterations=3))
    def grind(s: dict[str, Any]) -> dict[str, Any]:
        return {"n": s["n"] + 1}

    g = Graph("handoff", checkpoint=db)
    g.add(grind)
    g.add(lambda s: {"got": s["n"]}, name="use", after=grind)
    result = g.run({"n": 0})
    assert result.status is RunStatus.COMPLETED
    assert result.nodes["grind"].status == "budget_exhausted"
    assert result.nodes["grind"].stop_reason == "budget: iterations"
    assert result.outputs["grind"] == {"n": 3}
    assert result.outputs["use"] == {"got": 3}


def test_graph_budget_stops_new_nodes_and_resume_with_more_finishes(db: str) -> None:
    """When the graph cap runs out mid-node, later nodes wait; resume with a bigger budget continues."""
    calls: Counter[str] = Counter()

    @loop(budget=Budget(iterations=3))
    def costly(s: dict[str, Any]) -> dict[str, Any]:
        calls["costly"] += 1
        loomc.charge(0.3)
        return {"n": s["n"] + 1}

    def tail(s: dict[str, Any]) -> dict[str, Any]:
        calls["tail"] += 1
        return {"final": s["n"]}

    g = Graph("tight", checkpoint=db, budget=Budget(usd=0.7))
    g.add(costly)
    g.add(tail, after=costly)
    first = g.run({"n": 0})
    assert first.status is RunStatus.BUDGET_EXHAUSTED
    assert first.cost_usd == pytest.approx(0.6)
    assert first.nodes["tail"].status == "pending"
    assert calls["tail"] == 0
    again = g.resume(first.run_id)  # same budget: nothing more can run
    assert again.status is RunStatus.BUDGET_EXHAUSTED
    assert again.cost_usd == pytest.approx(0.6)
    done = g.resume(first.run_id[:6], budget=Budget(usd=2.0))
    assert done.status is RunStatus.COMPLETED
    assert done.outputs["tail"] == {"final": 3}
    assert done.cost_usd == pytest.approx(0.9)
    assert done.nodes["costly"].run_id == first.nodes["costly"].run_id  # the same run, continued
    assert calls["tail"] == 1


def test_graph_wall_clock_stops_the_running_node_and_starts_no_more(db: str) -> None:
    """The graph's wall clock caps its nodes: the running one stops, later ones are not started."""

    @loop(budget=Budget(iterations=50))
    def slow(s: dict[str, Any]) -> dict[str, Any]:
        time.sleep(0.1)
        return {"n": s["n"] + 1}

    g = Graph("timed", checkpoint=db, budget=Budget(wall_clock="0.35s"))
    g.add(slow)
    g.add(lambda s: s, name="later", after=slow)
    t0 = time.monotonic()
    result = g.run({"n": 0})
    assert time.monotonic() - t0 < 1.5
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert "wall_clock" in (result.stop_reason or "")
    assert result.nodes["slow"].status == "budget_exhausted"
    assert 1 <= result.nodes["slow"].steps <= 5
    assert result.nodes["later"].status == "pending"


# -- failures and resume -----------------------------------------------------------


def test_a_failed_node_skips_its_descendants_only(db: str) -> None:
    """A -> B(fails) -> C and A -> D -> E: C is skipped, D and E finish, the graph is failed."""
    ran: list[str] = []

    def mk(name: str, fail: bool = False) -> Callable[[Any], Any]:
        def node(s: Any) -> Any:
            ran.append(name)
            if fail:
                raise RuntimeError(f"{name} broke")
            return s

        node.__name__ = node.__qualname__ = name
        return node

    g = Graph("isolation", checkpoint=db)
    g.add(mk("a"))
    g.add(mk("b", fail=True), after="a")
    g.add(mk("c"), after="b")
    g.add(mk("d"), after="a")
    g.add(mk("e"), after="d")
    result = g.run({})
    assert result.status is RunStatus.FAILED
    assert "node 'b'" in (result.stop_reason or "")
    assert {n: i.status for n, i in result.nodes.items()} == {
        "a": "completed", "b": "failed", "c": "skipped", "d": "completed", "e": "completed",
    }
    assert isinstance(result.nodes["b"].error, RuntimeError)
    assert result.nodes["a"].status is RunStatus.COMPLETED
    assert result.nodes["b"].status is RunStatus.FAILED
    assert "c" not in ran
    assert sorted(ran) == ["a", "b", "d", "e"]
    assert result.nodes["c"].run_id is None  # never started: no run row
    assert len([r for r in runs_table(db) if r["parent_run_id"] == result.run_id]) == 4


def test_a_stalled_node_stops_its_branch(db: str) -> None:
    """A node that stalls (Escalate) keeps its state, skips its descendants, and the graph ends stalled."""

    @loop(budget=Budget(iterations=20), scorer=lambda s: 0.5, on_stall=Escalate(after=2))
    def stuck(s: dict[str, Any]) -> dict[str, Any]:
        return {"n": s.get("n", 0) + 1}

    g = Graph("stall", checkpoint=db)
    g.add(stuck)
    g.add(lambda s: s, name="next", after=stuck)
    g.add(lambda s: "ok", name="side")
    result = g.run({})
    assert result.status is RunStatus.STALLED
    assert result.nodes["stuck"].status is RunStatus.STALLED
    assert result.outputs["stuck"]["n"] == result.nodes["stuck"].steps
    assert result.nodes["next"].status == "skipped"
    assert result.outputs["side"] == "ok"


def test_resume_reruns_only_what_did_not_finish(db: str) -> None:
    """Completed nodes come from the store; the failed node resumes from its own checkpoint; pending ones run."""
    calls: Counter[str] = Counter()
    broken = {"on": True}

    def research(s: dict[str, Any]) -> dict[str, Any]:
        calls["research"] += 1
        loomc.charge(0.1)
        return {"notes": ["n1"]}

    @loop(budget=Budget(usd=1.0, iterations=10), converge_on=predicate(lambda h: h[-1].state["v"] >= 3))
    def draft(s: dict[str, Any]) -> dict[str, Any]:
        calls["draft"] += 1
        v = s.get("v", 0) + 1
        loomc.charge(0.05)
        if v == 2 and broken["on"]:
            raise RuntimeError("flaky model")
        return {**s, "v": v}

    def publish(s: dict[str, Any]) -> dict[str, Any]:
        calls["publish"] += 1
        return {"published": s["v"]}

    g = Graph("resumable", checkpoint=db, budget=Budget(usd=5.0))
    g.add(research)
    g.add(draft, after=research)
    g.add(publish, after=draft)
    first = g.run({"topic": "t"})
    assert first.status is RunStatus.FAILED
    assert first.nodes["publish"].status == "skipped"
    assert calls == Counter(research=1, draft=2)
    spent = first.cost_usd
    assert spent == pytest.approx(0.2)

    broken["on"] = False
    second = g.resume(first.run_id)
    assert second.status is RunStatus.COMPLETED, second
    assert calls == Counter(research=1, draft=4, publish=1)  # draft: steps 1 (retried) and 2 only
    assert second.nodes["research"].reused
    assert second.outputs["research"] == {"notes": ["n1"]}
    assert second.outputs["publish"] == {"published": 3}
    assert second.nodes["draft"].run_id == first.nodes["draft"].run_id
    assert second.nodes["draft"].steps == 4  # the failed step counts: 0, 1 (failed), 1 again, 2
    assert second.cost_usd == pytest.approx(spent + 0.1)  # the budget keeps what was spent
    info = SQLiteStore(db).get_run(first.run_id)
    assert info is not None
    assert info.status is RunStatus.COMPLETED
    assert info.cost_usd == pytest.approx(second.cost_usd)

    third = g.resume(first.run_id)  # a completed graph runs nothing
    assert third.status is RunStatus.COMPLETED
    assert calls == Counter(research=1, draft=4, publish=1)
    assert third.outputs == second.outputs


def test_resume_keeps_earlier_spending_against_the_cap(db: str) -> None:
    """Money spent before a resume still counts: a resumed graph cannot spend it again."""
    flaky = {"on": True}

    @loop(budget=Budget(iterations=5), converge_on=predicate(lambda h: h[-1].state["v"] >= 2))
    def spend(s: dict[str, Any]) -> dict[str, Any]:
        loomc.charge(0.3)
        if flaky["on"] and s.get("v", 0) == 1:
            raise RuntimeError("boom")
        return {"v": s.get("v", 0) + 1}

    @loop(budget=Budget(iterations=20))
    def other(s: dict[str, Any]) -> dict[str, Any]:
        loomc.charge(0.1)
        return {"v": s.get("v", 0) + 1}

    g = Graph("carry", checkpoint=db, budget=Budget(usd=1.0))
    g.add(spend, inputs=lambda up, gi: {"v": 0})
    g.add(other, after=spend, inputs=lambda up, gi: {"v": 0})
    first = g.run(None)
    assert first.status is RunStatus.FAILED
    assert first.cost_usd == pytest.approx(0.6)
    flaky["on"] = False
    second = g.resume(first.run_id)
    # spend: +0.3 (its retried step); other can only use what is left of $1.00
    assert second.cost_usd <= 1.0 + EPS
    assert second.status is RunStatus.BUDGET_EXHAUSTED
    assert second.nodes["other"].cost_usd == pytest.approx(0.1)


def test_resume_with_a_changed_structure_is_refused_unless_forced(db: str) -> None:
    """The graph's structure is hashed: a changed graph refuses to resume unless force=True."""

    def a(s: Any) -> Any:
        return {"a": 1}

    def b(s: Any) -> Any:
        raise RuntimeError("not yet")

    g1 = Graph("evolving", checkpoint=db)
    g1.add(a)
    g1.add(b, after=a)
    first = g1.run(None)
    assert first.status is RunStatus.FAILED

    def b2(s: Any) -> Any:
        return {"b": s["a"] + 1}

    def c(s: Any) -> Any:
        return {"c": s["b"] + 1}

    g2 = Graph("evolving", checkpoint=db)
    g2.add(a)
    g2.add(b2, name="b", after=a)
    g2.add(c, after="b")
    with pytest.raises(SpecMismatch, match="force=True"):
        g2.resume(first.run_id)
    forced = g2.resume(first.run_id, force=True)
    assert forced.status is RunStatus.COMPLETED
    assert forced.nodes["a"].reused
    assert forced.outputs["c"] == {"c": 3}
    with pytest.raises(SpecMismatch, match="not a graph"):
        g2.resume(first.nodes["a"].run_id or "")


def test_store_records_the_graph_as_one_root_with_node_children(db: str) -> None:
    """The graph run is a root of kind 'graph'; nodes are children of kind 'node' named in meta."""
    events: list[ProgressEvent] = []

    @loop(budget=Budget(iterations=5), converge_on=predicate(lambda h: len(h) >= 2))
    def inner(s: dict[str, Any]) -> dict[str, Any]:
        loomc.charge(0.01)
        return {"k": s.get("k", 0) + 1}

    @loop(budget=Budget(iterations=1))
    def outer(s: dict[str, Any]) -> dict[str, Any]:
        return inner(s)  # a nested loop inside a node: a grandchild of the graph

    g = Graph("tree", checkpoint=db)
    g.add(outer)
    g.add(lambda s: s, name="last", after=outer)
    result: GraphResult = g.run({"k": 0}, on_progress=events.append)
    assert result.status is RunStatus.COMPLETED
    store = SQLiteStore(db)
    roots = store.list_runs(roots_only=True)
    assert [r.id for r in roots] == [result.run_id]
    assert roots[0].kind == "graph"
    assert roots[0].name == "tree"
    kids = store.children(result.run_id)
    assert [(k.kind, k.meta.get("node")) for k in kids] == [("node", "outer"), ("node", "last")]
    grandkids = store.children(kids[0].id)
    assert len(grandkids) == 1
    assert grandkids[0].cost_usd == pytest.approx(0.02)
    assert roots[0].cost_usd == pytest.approx(0.02)
    assert events[0].node is None
    assert events[0].graph_run_id == result.run_id
    assert [(e.node, e.status) for e in events[1:]] == [
        ("outer", "running"), ("outer", "budget_exhausted"), ("last", "running"), ("last", "completed"),
    ]


def test_graph_on_a_memory_store(tmp_path: Path) -> None:
    """``checkpoint="memory"`` runs the graph without touching disk."""
    g = Graph("mem", checkpoint="memory")
    g.add(lambda s: s + 1, name="inc")
    g.add(lambda s: s * 10, name="mul", after="inc")
    result = g.run(1)
    assert result.outputs == {"inc": 2, "mul": 20}
    again = g.resume(result.run_id)  # the graph keeps its memory store
    assert again.outputs == result.outputs
    assert all(n.reused for n in again.nodes.values())
    assert not list(tmp_path.iterdir()) or all(p.name != "checkpoints.db" for p in tmp_path.iterdir())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    charges=st.lists(st.lists(st.sampled_from([0.05, 0.1, 0.15, 0.2]), min_size=1, max_size=6), min_size=2, max_size=5),
    cap=st.sampled_from([0.3, 0.5, 0.8, 1.2]),
    concurrency=st.sampled_from([None, 2]),
)
def test_property_concurrent_nodes_never_cross_the_graph_cap(
    charges: list[list[float]], cap: float, concurrency: int | None
) -> None:
    """Whatever the nodes charge, side by side, the graph's total never crosses its cap and equals the nodes' sum."""
    g = Graph("prop", checkpoint="memory", budget=Budget(usd=cap), max_concurrency=concurrency)
    for i, plan in enumerate(charges):

        def step(s: dict[str, Any], plan: list[float] = plan) -> dict[str, Any]:
            for usd in plan:
                loomc.charge(usd)
            return {"n": s["n"] + 1}

        step.__name__ = step.__qualname__ = f"p{i}"
        g.add(loop(budget=Budget(iterations=3))(step), inputs=lambda up, gi: {"n": 0})
    result = g.run(None)
    assert result.cost_usd <= cap + EPS
    assert sum(n.cost_usd for n in result.nodes.values()) == pytest.approx(result.cost_usd)
    want = sum(sum(p) * 3 for p in charges)
    if want <= cap + EPS:
        assert result.status is RunStatus.COMPLETED
    else:
        assert result.status is RunStatus.BUDGET_EXHAUSTED
