"""Graph.map: one child run per item, in order, resumable item by item, under the graph's budget."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

import loomc
from loomc import Budget, RunStatus, loop, predicate
from orchestration import Graph, ProgressEvent


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test runs on asyncio and on trio."""
    return str(request.param)


def _one_step(history: Any) -> bool:
    return bool(history) and history[-1].error is None


def rows(db: str) -> dict[str, dict[str, Any]]:
    """Every run of the database by id, read on a connection of its own."""
    with sqlite3.connect(db) as c:
        c.row_factory = sqlite3.Row
        return {r["id"]: dict(r) for r in c.execute("SELECT * FROM runs")}


def items_of(db: str) -> list[dict[str, Any]]:
    """The item runs of the database."""
    return [r for r in rows(db).values() if r["kind"] == "item"]


class Calls:
    """Thread-safe count of each item's step calls."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count: Counter[int] = Counter()

    def add(self, i: int) -> None:
        with self.lock:
            self.count[i] += 1


def test_outputs_come_in_item_order_whatever_order_items_finish(db: str) -> None:
    """The map's output is the list of final states in item order, not finishing order."""

    @loop(converge_on=predicate(_one_step))
    async def square(s: dict[str, Any]) -> dict[str, Any]:
        await anyio.sleep(0.002 * (8 - s["x"]))  # later items finish first
        return {"x": s["x"], "y": s["x"] ** 2}

    def tail(s: list[Any]) -> list[int]:
        return [d["y"] for d in s]

    g = Graph("order", checkpoint=db)
    g.map("sq", square, over=lambda up, gi: [{"x": x} for x in gi], max_concurrency=4)
    g.add(tail, after="sq")
    result = g.run(list(range(8)))
    assert result.status is RunStatus.COMPLETED
    assert result.outputs["tail"] == [x * x for x in range(8)]
    info = result.nodes["sq"]
    assert info.items is not None
    assert (info.items.total, info.items.done, info.items.failed, info.items.pending) == (8, 8, 0, 0)
    runs = rows(db)
    items = sorted(items_of(db), key=lambda r: r["call_index"])
    assert [r["call_index"] for r in items] == list(range(8))
    node_run = runs[info.run_id or ""]
    assert all(r["parent_run_id"] == node_run["id"] and r["parent_step"] == 0 for r in items)
    assert node_run["parent_run_id"] == result.run_id


def test_max_concurrency_bounds_items_at_once(db: str) -> None:
    """At most max_concurrency sync items run at the same time."""
    lock = threading.Lock()
    active = [0, 0]

    @loop(converge_on=predicate(_one_step))
    def work(s: int) -> int:
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])
        time.sleep(0.01)
        with lock:
            active[0] -= 1
        return s + 1

    g = Graph("bounded", checkpoint=db)
    g.map("work", work, over=lambda up, gi: list(range(12)), max_concurrency=3)
    result = g.run(None)
    assert result.outputs["work"] == list(range(1, 13))
    assert active[1] == 3


MAP_KILLED = textwrap.dedent(
    """
    import os
    import signal
    import sys

    import loomc
    from loomc import Budget, loop, predicate
    from orchestration import Graph

    DB = os.environ["DB"]
    LOG = DB + ".log"

    @loop(budget=Budget(iterations=2), converge_on=predicate(lambda h: len(h) >= 2), checkpoint=DB)
    def item(s):
        if s["i"] == 5 and s["n"] == 1 and not os.path.exists(DB + ".killed"):
            open(DB + ".killed", "w").close()
            os.kill(os.getpid(), signal.SIGKILL)  # in item 5's second step, before it charges
        loomc.charge(0.01)
        with open(LOG, "a") as f:
            f.write(f"{s['i']}:{s['n']}\\n")
        return {"i": s["i"], "n": s["n"] + 1}

    def total(states):
        return sum(s["n"] for s in states)

    graph = Graph("killed", checkpoint=DB, budget=Budget(usd=10.0))
    graph.map("items", item, over=lambda up, gi: [{"i": i, "n": 0} for i in range(gi)], max_concurrency=1)
    graph.add(total, after="items")

    if __name__ == "__main__":
        print(graph.run(8).run_id)
    """
)


def test_sigkill_mid_map_resumes_only_unfinished_items_and_pays_nothing_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 inside an item: resume re-runs no finished item and no committed step; totals are exact."""
    db = str(tmp_path / "killed.db")
    script = tmp_path / "killed.py"
    script.write_text(MAP_KILLED)
    monkeypatch.setenv("DB", db)
    proc = subprocess.run([sys.executable, str(script)], env=dict(os.environ), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == -9, proc.stderr
    runs = rows(db)
    root = next(i for i, r in runs.items() if r["kind"] == "graph")
    # items 0-4: two steps each; item 5: its first step
    assert runs[root]["cost_usd"] == pytest.approx(0.11)

    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        sys.modules.pop("killed", None)
        mod = importlib.import_module("killed")
        result = mod.graph.resume(root)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("killed", None)
    assert result.status is RunStatus.COMPLETED, result.stop_reason
    assert result.outputs["total"] == 16
    assert result.cost_usd == pytest.approx(0.16)  # 8 items x 2 steps x $0.01, each paid once
    log = Path(db + ".log").read_text().split()
    assert sorted(log) == sorted(f"{i}:{n}" for i in range(8) for n in range(2))  # every step ran once
    runs = rows(db)
    assert runs[root]["cost_usd"] == pytest.approx(0.16)
    node = next(r for r in runs.values() if r["kind"] == "node" and r["meta"] and '"items"' in r["meta"] and
                r["parent_run_id"] == root)
    assert node["cost_usd"] == pytest.approx(0.16)
    assert len(items_of(db)) == 8


def _failing_graph(db: str, mode: str, broken: dict[str, bool], calls: Calls) -> Graph:
    @loop(converge_on=predicate(_one_step))
    def item(s: int) -> int:
        calls.add(s)
        if s == 2 and broken["on"]:
            raise ValueError("item two is broken")
        loomc.charge(0.01)
        return s * 10

    def after_map(states: list[Any]) -> list[Any]:
        return states

    g = Graph("failing", checkpoint=db)
    g.map("m", item, over=lambda up, gi: list(range(5)), max_concurrency=1, on_item_error=mode)
    g.add(after_map, after="m")
    return g


def test_failing_item_fails_the_node_and_resume_reruns_only_that_item(db: str) -> None:
    """on_item_error="fail": the item's error fails the node, later items wait; resume runs only what is left."""
    broken, calls = {"on": True}, Calls()
    g = _failing_graph(db, "fail", broken, calls)
    result = g.run(None)
    assert result.status is RunStatus.FAILED
    info = result.nodes["m"]
    assert info.status is RunStatus.FAILED
    assert isinstance(info.error, ValueError)
    assert any("item 2 of map node 'm'" in n for n in info.error.__notes__)
    assert info.stop_reason is not None
    assert "item 2 failed" in info.stop_reason
    assert info.items is not None
    assert (info.items.done, info.items.failed, info.items.pending) == (2, 1, 2)
    assert result.nodes["after_map"].status == "skipped"
    assert dict(calls.count) == {0: 1, 1: 1, 2: 1}  # items 3 and 4 were not started

    broken["on"] = False
    again = g.resume(result.run_id)
    assert again.status is RunStatus.COMPLETED, again.stop_reason
    assert again.outputs["after_map"] == [0, 10, 20, 30, 40]
    assert dict(calls.count) == {0: 1, 1: 1, 2: 2, 3: 1, 4: 1}
    assert again.cost_usd == pytest.approx(0.05)
    assert len(items_of(db)) == 5


def test_failing_item_is_skipped_with_none_and_counted(db: str) -> None:
    """on_item_error="skip": the slot is None, the node completes and counts the failed item."""
    calls = Calls()
    g = _failing_graph(db, "skip", {"on": True}, calls)
    result = g.run(None)
    assert result.status is RunStatus.COMPLETED
    assert result.outputs["after_map"] == [0, 10, None, 30, 40]
    info = result.nodes["m"]
    assert info.status is RunStatus.COMPLETED
    assert info.items is not None
    assert (info.items.done, info.items.failed) == (4, 1)
    assert str(info.items) == "4/5 items, 1 failed"
    assert dict(calls.count) == dict.fromkeys(range(5), 1)


def test_graph_budget_out_mid_map_leaves_items_pending_and_resume_finishes(db: str) -> None:
    """The graph's budget runs out mid-map: later items never start; a resume with more budget finishes."""
    calls = Calls()

    @loop(converge_on=predicate(_one_step))
    def item(s: int) -> int:
        calls.add(s)
        loomc.charge(0.01)
        return s

    def downstream(states: list[int]) -> int:
        return sum(states)

    g = Graph("broke", checkpoint=db, budget=Budget(usd=0.05))
    g.map("m", item, over=lambda up, gi: list(range(10)), max_concurrency=1)
    g.add(downstream, after="m")
    result = g.run(None)
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert result.nodes["m"].status is RunStatus.BUDGET_EXHAUSTED
    items = result.nodes["m"].items
    assert items is not None
    assert (items.done, items.pending) == (5, 5)
    assert result.nodes["downstream"].status == "pending"
    assert "5 of 10 items not finished" in (result.stop_reason or "")
    assert result.cost_usd == pytest.approx(0.05)
    assert len(items_of(db)) == 5  # the others were never started

    again = g.resume(result.run_id, budget=Budget(usd=1.0))
    assert again.status is RunStatus.COMPLETED, again.stop_reason
    assert again.outputs["downstream"] == 45
    assert again.cost_usd == pytest.approx(0.10)
    assert dict(calls.count) == dict.fromkeys(range(10), 1)


def test_an_empty_list_of_items_gives_an_empty_output(db: str) -> None:
    """over returning [] completes the node with [] and hands it downstream."""

    @loop(converge_on=predicate(_one_step))
    def item(s: int) -> int:
        raise AssertionError("no item to run")

    def count(states: list[Any]) -> int:
        return len(states)

    g = Graph("empty", checkpoint=db)
    g.map("m", item, over=lambda up, gi: [])
    g.add(count, after="m")
    result = g.run(None)
    assert result.status is RunStatus.COMPLETED
    assert result.outputs["m"] == []
    assert result.outputs["count"] == 0


@pytest.mark.anyio
@pytest.mark.usefixtures("no_blocking")
async def test_async_items_run_concurrently_on_the_event_loop(db: str, anyio_backend: str) -> None:
    """Async item loops run as tasks on asyncio and trio, bounded by max_concurrency, in order."""
    active = [0, 0]

    @loop(converge_on=predicate(_one_step))
    async def item(s: int) -> int:
        active[0] += 1
        active[1] = max(active[1], active[0])
        await anyio.sleep(0.005)
        active[0] -= 1
        loomc.charge(0.001)
        return s * 2

    g = Graph("async-items", checkpoint=db, budget=Budget(usd=1.0))
    g.map("m", item, over=lambda up, gi: list(range(20)), max_concurrency=5)
    result = await g.arun(None)
    assert result.status is RunStatus.COMPLETED
    assert result.outputs["m"] == [i * 2 for i in range(20)]
    assert active[1] == 5
    assert result.cost_usd == pytest.approx(0.02)


@pytest.mark.anyio
async def test_sync_items_under_an_async_graph_resume_item_by_item(db: str, anyio_backend: str) -> None:
    """Sync item loops run in worker threads under arun (asyncio and trio); aresume skips finished items."""
    calls, broken = Calls(), {"on": True}

    @loop(converge_on=predicate(_one_step))
    def item(s: int) -> int:
        calls.add(s)
        if s == 3 and broken["on"]:
            raise RuntimeError("flaky")
        return -s

    g = Graph("sync-items", checkpoint=db)
    g.map("m", item, over=lambda up, gi: list(range(6)), max_concurrency=2)
    first = await g.arun(None)
    assert first.status is RunStatus.FAILED
    broken["on"] = False
    again = await g.aresume(first.run_id)
    assert again.status is RunStatus.COMPLETED
    assert again.outputs["m"] == [0, -1, -2, -3, -4, -5]
    assert calls.count[3] == 2
    assert all(calls.count[i] == 1 for i in (0, 1, 2))


def test_a_thousand_items(db: str) -> None:
    """1,000 items complete in order, each its own run, and the progress hook counts them all."""

    @loop(converge_on=predicate(_one_step))
    async def item(s: int) -> int:
        return s + 1

    seen: list[ProgressEvent] = []
    g = Graph("thousand", checkpoint=db)
    g.map("m", item, over=lambda up, gi: list(range(1000)), max_concurrency=50)
    t0 = time.monotonic()
    result = g.run(None, on_progress=seen.append)
    assert time.monotonic() - t0 < 30
    assert result.status is RunStatus.COMPLETED
    assert result.outputs["m"] == list(range(1, 1001))
    assert len(items_of(db)) == 1000
    counts = [e.items_done for e in seen if e.status == "items"]
    assert counts[-1] == 1000
    assert counts == sorted(counts)
    assert {e.items_total for e in seen if e.status == "items"} == {1000}


# -- bad input --------------------------------------------------------------------------------------------


def test_over_returning_a_non_list_fails_the_node_by_name(db: str) -> None:
    """over returning a dict fails the map node, with a message naming it and what to return."""

    @loop(converge_on=predicate(_one_step))
    def item(s: int) -> int:
        return s

    g = Graph("bad-over", checkpoint=db)
    g.map("m", item, over=lambda up, gi: {"a": 1})
    result = g.run(None)
    assert result.status is RunStatus.FAILED
    info = result.nodes["m"]
    assert isinstance(info.error, TypeError)
    assert "map node 'm': over returned dict, not a list" in str(info.error)


def test_map_refuses_a_plain_function_and_bad_arguments_at_map_time() -> None:
    """A plain function, a non-callable over, a bad bound or error mode: refused when the node is added."""

    def plain(s: int) -> int:
        return s

    @loop(converge_on=predicate(_one_step))
    def item(s: int) -> int:
        return s

    g = Graph("bad", checkpoint="memory")
    with pytest.raises(TypeError, match=r"map node 'm': fn='plain' is not a @loop; decorate it with @loop"):
        g.map("m", plain, over=lambda up, gi: [])
    with pytest.raises(TypeError, match=r"over=.* must be a callable"):
        g.map("m", item, over=[1, 2])
    with pytest.raises(ValueError, match="max_concurrency=0"):
        g.map("m", item, over=lambda up, gi: [], max_concurrency=0)
    with pytest.raises(ValueError, match="on_item_error='ignore'; use 'fail' or 'skip'"):
        g.map("m", item, over=lambda up, gi: [], on_item_error="ignore")
    with pytest.raises(ValueError, match="non-empty name"):
        g.map("", item, over=lambda up, gi: [])
    g.map("m", item, over=lambda up, gi: [])
    with pytest.raises(ValueError, match="already exists"):
        g.map("m", item, over=lambda up, gi: [])


MAP_INTERRUPTED = textwrap.dedent(
    """
    import os
    import signal
    import time

    import loomc
    from loomc import loop, predicate
    from orchestration import Graph

    DB = os.environ["DB"]
    LOG = DB + ".log"

    @loop(converge_on=predicate(lambda h: True), checkpoint=DB)
    def item(s):
        if s == 3 and not os.path.exists(DB + ".stopped"):
            open(DB + ".stopped", "w").close()
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while item 3 runs: it finishes its step
            time.sleep(0.2)
        loomc.charge(0.01)
        with open(LOG, "a") as f:
            f.write(f"{s}\\n")
        return s

    graph = Graph("ctrl-c", checkpoint=DB)
    graph.map("items", item, over=lambda up, gi: list(range(gi)), max_concurrency=1)

    if __name__ == "__main__":
        graph.run(8)
    """
)


def test_ctrl_c_mid_map_interrupts_the_node_and_resume_runs_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGINT mid-map: the item in flight finishes its step, no new item starts, the node is interrupted."""
    db = str(tmp_path / "ctrl_c.db")
    script = tmp_path / "ctrl_c.py"
    script.write_text(MAP_INTERRUPTED)
    monkeypatch.setenv("DB", db)
    proc = subprocess.run([sys.executable, str(script)], env=dict(os.environ), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in proc.stderr
    runs = rows(db)
    root = next(i for i, r in runs.items() if r["kind"] == "graph")
    node = next(r for r in runs.values() if r["kind"] == "node")
    assert runs[root]["status"] == "interrupted"
    assert node["status"] == "interrupted"
    assert len(items_of(db)) == 4  # items 0-3; none started after the signal

    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        sys.modules.pop("ctrl_c", None)
        mod = importlib.import_module("ctrl_c")
        result = mod.graph.resume(root)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("ctrl_c", None)
    assert result.status is RunStatus.COMPLETED, result.stop_reason
    assert result.outputs["items"] == list(range(8))
    assert sorted(Path(db + ".log").read_text().split()) == [str(i) for i in range(8)]
    assert result.cost_usd == pytest.approx(0.08)


def test_graph_cap_reached_inside_concurrent_items_is_exact_and_resumable(db: str) -> None:
    """Concurrent items hit the graph's cap mid-item: nothing crosses it; resume finishes each item once."""

    # (a step refused by the graph's cap still counts as one of the item's iterations)
    @loop(budget=Budget(iterations=4), converge_on=predicate(lambda h: h[-1].state["n"] >= 2))
    def item(s: dict[str, int]) -> dict[str, int]:
        time.sleep(0.002)
        loomc.charge(0.03)
        return {**s, "n": s["n"] + 1}

    g = Graph("cap", checkpoint=db, budget=Budget(usd=0.10))
    g.map("m", item, over=lambda up, gi: [{"i": i, "n": 0} for i in range(6)], max_concurrency=3)
    first = g.run(None)
    assert first.status is RunStatus.BUDGET_EXHAUSTED
    assert first.cost_usd <= 0.10 + 1e-9
    assert first.nodes["m"].status is RunStatus.BUDGET_EXHAUSTED
    assert rows(db)[first.run_id]["cost_usd"] == pytest.approx(first.cost_usd)

    again = g.resume(first.run_id, budget=Budget(usd=1.0))
    assert again.status is RunStatus.COMPLETED, again.stop_reason
    assert [s["n"] for s in again.outputs["m"]] == [2] * 6
    assert again.cost_usd == pytest.approx(6 * 2 * 0.03)  # every step paid once
    assert rows(db)[again.run_id]["cost_usd"] == pytest.approx(0.36)
