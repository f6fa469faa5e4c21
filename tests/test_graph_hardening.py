"""Graph and nested-run totals as they happen, after a SIGKILL and after resume; graph resume reports; CLI limits."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

import loomc
from loomc import Budget, RunStatus, loop, predicate
from orchestration import Graph
from orchestration._cli import graph_run


def rows(db: str) -> dict[str, dict[str, Any]]:
    """Every run of the database by id, read on a connection of its own (as another process would)."""
    with sqlite3.connect(db) as c:
        c.row_factory = sqlite3.Row
        return {r["id"]: dict(r) for r in c.execute("SELECT * FROM runs")}


def committed(db: str, run_id: str) -> float:
    """The sum of a run's committed step costs."""
    with sqlite3.connect(db) as c:
        return float(c.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM steps WHERE run_id = ?", (run_id,)).fetchone()[0])


def leaf_spend(db: str, run_id: str, runs: dict[str, dict[str, Any]]) -> float:
    """What the leaves under ``run_id`` (the only runs that charge money here) have committed."""
    kids = [i for i, r in runs.items() if r["parent_run_id"] == run_id]
    if not kids:
        return committed(db, run_id)
    return sum(leaf_spend(db, k, runs) for k in kids)


def check_totals_cover_descendants(db: str) -> None:
    """Every run's stored total is at least what its descendants have committed."""
    runs = rows(db)
    for rid, r in runs.items():
        assert r["cost_usd"] >= leaf_spend(db, rid, runs) - 1e-9, (r["name"], r["kind"])


def _done(h: Any) -> bool:
    return bool(h) and h[-1].error is None


# -- totals while a tree runs ---------------------------------------------------------------------------


def test_graph_and_parent_totals_include_committed_child_steps_while_running(db: str) -> None:
    """Mid-run, another connection sees the graph and a nested parent cover what the leaves committed."""
    gate, reached = threading.Event(), threading.Event()

    @loop(budget=Budget(iterations=6))
    def leaf(s: dict[str, Any]) -> dict[str, Any]:
        if s["n"] == 4:
            reached.set()
            assert gate.wait(20)
        loomc.charge(0.01)
        return {"n": s["n"] + 1}

    @loop(budget=Budget(iterations=1))
    def worker(s: dict[str, Any]) -> dict[str, Any]:
        return {"leaf": leaf.run({"n": 0}).state}

    g = Graph("live", checkpoint=db, budget=Budget(usd=5.0))
    g.add(worker)
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(g.run({})))
    t.start()
    try:
        assert reached.wait(20)
        runs = rows(db)
        graph_id = next(i for i, r in runs.items() if r["kind"] == "graph")
        node_id = next(i for i, r in runs.items() if r["kind"] == "node")
        leaf_id = next(i for i, r in runs.items() if r["parent_run_id"] == node_id)
        assert committed(db, leaf_id) == pytest.approx(0.04)
        assert runs[leaf_id]["cost_usd"] == pytest.approx(0.04)
        assert runs[node_id]["cost_usd"] == pytest.approx(0.04)  # its step is still running
        assert runs[graph_id]["cost_usd"] == pytest.approx(0.04)
        check_totals_cover_descendants(db)
    finally:
        gate.set()
        t.join(20)
    result = out[0]
    assert result.status is RunStatus.COMPLETED
    runs = rows(db)
    assert result.cost_usd == pytest.approx(0.06)
    assert runs[result.run_id]["cost_usd"] == pytest.approx(0.06)  # exact at the end: no double count
    assert runs[result.nodes["worker"].run_id]["cost_usd"] == pytest.approx(0.06)
    assert committed(db, result.nodes["worker"].run_id) == pytest.approx(0.06)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
async def test_async_parent_total_follows_its_child_as_it_commits(db: str, anyio_backend: str) -> None:
    """An async parent's stored total rises with each committed step of its async child (asyncio and trio)."""
    seen: list[tuple[float, float]] = []

    @loop(budget=Budget(iterations=4), checkpoint=db)
    async def child(s: dict[str, Any]) -> dict[str, Any]:
        if s["n"]:  # the previous step is committed: read the tree from another connection
            runs = await anyio.to_thread.run_sync(rows, db)
            me = next(r for r in runs.values() if r["parent_run_id"] is not None)
            parent = runs[me["parent_run_id"]]
            seen.append((parent["cost_usd"], me["cost_usd"]))
        loomc.charge(0.5)
        return {"n": s["n"] + 1}

    @loop(budget=Budget(iterations=1), checkpoint=db)
    async def parent(s: dict[str, Any]) -> dict[str, Any]:
        return {"child": (await child.run({"n": 0})).state}

    result = await parent.run({})
    assert seen == [
        (pytest.approx(0.5), pytest.approx(0.5)),
        (pytest.approx(1.0), pytest.approx(1.0)),
        (pytest.approx(1.5), pytest.approx(1.5)),
    ]
    assert result.cost_usd == pytest.approx(2.0)
    assert rows(db)[result.run_id]["cost_usd"] == pytest.approx(2.0)


# -- after a SIGKILL, and after resume ------------------------------------------------------------------

NESTED = textwrap.dedent(
    """
    import os
    import signal
    import sys

    import loomc
    from loomc import Budget, loop, predicate
    from orchestration import Graph

    DB = os.environ["DB"]

    def leaf_done(h):
        return len(h) >= 3

    @loop(budget=Budget(iterations=5), converge_on=predicate(leaf_done), checkpoint=DB)
    def leaf(s):
        # crash once, in the leaf's third step of the mid loop's second step (nothing charged yet)
        if s["n"] == 2 and s["tag"] == "m1" and not os.path.exists(DB + ".killed"):
            open(DB + ".killed", "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        loomc.charge(0.01)
        return {**s, "n": s["n"] + 1}

    @loop(budget=Budget(iterations=5), converge_on=predicate(lambda h: len(h) >= 3), checkpoint=DB)
    def mid(s):
        st = leaf.run({"n": 0, "tag": f"m{s['k']}"}).state
        return {"k": s["k"] + 1, "leaf": st["n"]}

    @loop(budget=Budget(iterations=5), converge_on=predicate(lambda h: len(h) >= 2), checkpoint=DB)
    def top(s):
        st = mid.run({"k": 0}).state
        return {"i": s["i"] + 1, "mid": st["k"]}

    graph = Graph("tree", checkpoint=DB, budget=Budget(usd=10.0))
    graph.add(top)

    if __name__ == "__main__":
        if sys.argv[1] == "graph":
            print(graph.run({"i": 0}).run_id)
        else:
            print(top.run({"i": 0}).run_id)
    """
)


@pytest.mark.parametrize("mode", ["graph", "loop"])
def test_sigkill_leaves_every_total_covering_its_descendants_and_resume_is_exact(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL three levels deep: stored totals cover committed spend; resume counts nothing twice."""
    db = str(tmp_path / "tree.db")
    script = tmp_path / "tree.py"
    script.write_text(NESTED)
    monkeypatch.setenv("DB", db)
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, str(script), mode], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    runs = rows(db)
    # top step 0 -> mid steps 0 (leaf: 3 steps) and 1 (leaf: 2 committed, killed in the third)
    assert sum(committed(db, i) for i, r in runs.items() if r["name"].endswith(":leaf")) == pytest.approx(0.05)
    check_totals_cover_descendants(db)
    root = next(i for i, r in runs.items() if r["parent_run_id"] is None)
    assert runs[root]["cost_usd"] == pytest.approx(0.05)

    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        sys.modules.pop("tree", None)
        mod = importlib.import_module("tree")
        # the script ran as __main__: the same loop, imported under another module name
        result = mod.graph.resume(root) if mode == "graph" else mod.top.resume_run(root, force=True)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("tree", None)
    assert result.status is RunStatus.COMPLETED
    # 2 top steps x 3 mid steps x 3 leaf steps x $0.01, each paid once
    assert result.cost_usd == pytest.approx(0.18)
    runs = rows(db)
    assert runs[root]["cost_usd"] == pytest.approx(0.18)
    check_totals_cover_descendants(db)
    for rid, r in runs.items():
        if r["kind"] != "graph":  # a run's total is its committed steps: no double count anywhere
            assert r["cost_usd"] == pytest.approx(committed(db, rid)), r["name"]
        kids = [k for k in runs.values() if k["parent_run_id"] == rid]
        if kids:
            assert r["cost_usd"] == pytest.approx(sum(k["cost_usd"] for k in kids)), r["name"]


def test_resumed_parent_step_counts_a_finished_child_once_on_every_ancestor(db: str) -> None:
    """A crashed parent step re-finds its finished child: each ancestor's step and total pay for it once."""
    state = {"fail": True}

    @loop(budget=Budget(iterations=3), converge_on=predicate(_done), checkpoint=db)
    def child(s: dict[str, Any]) -> dict[str, Any]:
        loomc.charge(0.25)
        return {"ok": True}

    @loop(budget=Budget(iterations=3), converge_on=predicate(_done), checkpoint=db)
    def parent(s: dict[str, Any]) -> dict[str, Any]:
        child.run({})
        if state["fail"]:
            raise KeyboardInterrupt  # the step is interrupted after its child finished
        loomc.charge(0.05)
        return {"done": True}

    with pytest.raises(KeyboardInterrupt):
        parent.run({})
    runs = rows(db)
    pid = next(i for i, r in runs.items() if r["parent_run_id"] is None)
    assert runs[pid]["cost_usd"] == pytest.approx(0.25)  # the child's spending is in its total already
    state["fail"] = False
    result = parent.resume_run(pid)
    assert result.status is RunStatus.COMPLETED
    assert result.cost_usd == pytest.approx(0.30)
    assert rows(db)[pid]["cost_usd"] == pytest.approx(0.30)
    assert committed(db, pid) == pytest.approx(0.30)  # the step's cost includes its child, once


# -- graph resume after its budget ran out ----------------------------------------------------------


def _tight_graph(db: str) -> Graph:
    @loop(budget=Budget(iterations=2))
    def first(s: dict[str, Any]) -> dict[str, Any]:
        loomc.charge(0.1)
        return {"v": s.get("v", 0) + 1}

    @loop(budget=Budget(iterations=5))
    def second(s: dict[str, Any]) -> dict[str, Any]:
        loomc.charge(0.2)
        return {"v": s["v"] + 10}

    @loop(converge_on=predicate(_done))
    def third(s: dict[str, Any]) -> dict[str, Any]:
        return {"v": s["v"] + 100}

    g = Graph("tight", checkpoint=db, budget=Budget(usd=0.6))  # spent to the cent
    g.add(first)
    g.add(second, after=first)
    g.add(third, after=second)
    return g


def test_graph_resumed_without_budget_reports_the_nodes_that_ran(db: str) -> None:
    """After the graph budget ran out, a resume keeps every node's run id, status, steps, cost and output."""
    g = _tight_graph(db)
    first = g.run({})
    assert first.status is RunStatus.BUDGET_EXHAUSTED
    assert first.nodes["second"].status is RunStatus.BUDGET_EXHAUSTED
    assert first.nodes["second"].steps == 2
    again = g.resume(first.run_id)
    assert again.status is RunStatus.BUDGET_EXHAUSTED
    for name in ("first", "second"):
        before, after = first.nodes[name], again.nodes[name]
        assert after.status == before.status
        assert (after.run_id, after.steps) == (before.run_id, before.steps)
        assert after.cost_usd == pytest.approx(before.cost_usd)
        assert again.outputs[name] == first.outputs[name]
    assert again.outputs["second"] == {"v": 22}
    assert again.nodes["third"].status == "pending"
    assert again.nodes["third"].run_id is None
    assert again.cost_usd == pytest.approx(first.cost_usd) == pytest.approx(0.6)
    assert rows(db)[first.run_id]["cost_usd"] == pytest.approx(0.6)


def test_graph_resume_with_more_budget_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`graph run --resume ID --usd X --iterations N` gives the graph more money and its nodes more steps."""
    db = tmp_path / "cli.db"
    pipeline = tmp_path / "tight_pipeline.py"
    pipeline.write_text(
        textwrap.dedent(
            """
        import loomc
        from loomc import Budget, loop, predicate

        from orchestration import Graph

        @loop(budget=Budget(iterations=2))
        def first(s):
            loomc.charge(0.1)
            return {"v": s.get("v", 0) + 1}

        @loop(budget=Budget(iterations=3, wall_clock="1h"))
        def second(s):
            loomc.charge(0.2)
            return {"v": s["v"] + 10}

        def third(s):
            return {"v": s["v"] + 100}

        graph = Graph("tight", budget=Budget(usd=0.7, wall_clock="1h"))
        graph.add(first)
        graph.add(second, after=first)
        graph.add(third, after=second)
        """
        )
    )
    assert graph_run(str(pipeline), input_json="{}", db=str(db)) == 1
    err = capsys.readouterr().err
    rid = next(i for i, r in rows(str(db)).items() if r["kind"] == "graph")
    assert f"--resume {rid} --usd" in err
    assert graph_run(str(pipeline), resume=rid, db=str(db), usd=2.0, iterations=4) == 0
    out = capsys.readouterr().out
    assert "completed" in out
    assert "of $2.0000" in out
    runs = rows(str(db))
    assert runs[rid]["cost_usd"] == pytest.approx(4 * 0.1 + 4 * 0.2)  # every node that resumed got 4 steps
    budget = Budget.from_dict(json.loads(runs[rid]["budget"]))
    assert (budget.usd, budget.wall_clock_seconds) == (2.0, 3600.0)  # the wall clock given at first is kept
    second = next(r for r in runs.values() if r["name"].endswith(":second"))
    assert second["steps"] == 4
    node_budget = Budget.from_dict(json.loads(second["budget"]))
    assert (node_budget.iterations, node_budget.wall_clock_seconds) == (4, 3600.0)


def test_graph_run_limits_need_resume_and_valid_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """New limits without --resume, or a bad one, are one clear line and exit 1."""
    pipeline = tmp_path / "p.py"
    pipeline.write_text("from orchestration import Graph\ngraph = Graph('g')\ngraph.add(lambda s: s, name='n')\n")
    db = str(tmp_path / "x.db")
    assert graph_run(str(pipeline), input_json="{}", db=db, usd=1.0) == 1
    assert "add --resume" in capsys.readouterr().err
    assert graph_run(str(pipeline), input_json="{}", db=db) == 0
    rid = next(i for i, r in rows(db).items() if r["kind"] == "graph")
    capsys.readouterr()
    assert graph_run(str(pipeline), resume=rid, db=db, wall_clock="10x") == 1
    err = capsys.readouterr().err
    assert "--wall-clock" in err
    assert "10x" in err


def test_loomc_graph_run_accepts_the_limit_options(tmp_path: Path) -> None:
    """The real command parses --usd/--iterations/--wall-clock and refuses them without --resume."""
    pipeline = tmp_path / "p.py"
    pipeline.write_text("from orchestration import Graph\ngraph = Graph('g')\ngraph.add(lambda s: s, name='n')\n")
    env = {**os.environ, "LOOMC_DB": str(tmp_path / "c.db")}
    base = [sys.executable, "-m", "loomc", "graph", "run", str(pipeline)]
    bad = subprocess.run([*base, "--usd", "1"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0
    assert "--resume" in bad.stderr
    ok = subprocess.run([*base, "--input", "{}"], env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    rid = rows(str(tmp_path / "c.db"))
    graph_id = next(i for i, r in rid.items() if r["kind"] == "graph")
    again = subprocess.run(
        [*base, "--resume", graph_id, "--usd", "3", "--iterations", "2", "--wall-clock", "5m"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr
    stored = json.loads(rows(str(tmp_path / "c.db"))[graph_id]["budget"])
    assert stored == {"usd": 3.0, "iterations": 2, "wall_clock": 300.0}


def test_graph_resumed_after_its_wall_clock_ran_out_keeps_its_nodes(db: str) -> None:
    """Out of wall-clock time, a resume still reports the node that ran, with its output."""

    @loop(budget=Budget(iterations=50))
    def slow(s: dict[str, Any]) -> dict[str, Any]:
        import time

        time.sleep(0.05)
        return {"v": s.get("v", 0) + 1}

    def after(s: dict[str, Any]) -> dict[str, Any]:
        return s

    g = Graph("clock", checkpoint=db, budget=Budget(wall_clock=0.3))
    g.add(slow)
    g.add(after, after=slow)
    first = g.run({})
    assert first.status is RunStatus.BUDGET_EXHAUSTED
    ran = first.nodes["slow"]
    assert ran.run_id is not None
    assert ran.steps > 0
    again = g.resume(first.run_id)
    assert again.status is RunStatus.BUDGET_EXHAUSTED
    node = again.nodes["slow"]
    assert node.status is RunStatus.BUDGET_EXHAUSTED
    assert (node.run_id, node.steps) == (ran.run_id, ran.steps)
    assert again.outputs["slow"] == first.outputs["slow"] == {"v": ran.steps}
    assert again.nodes["after"].status == "pending"


def test_memory_store_parent_total_follows_its_child_and_resume_is_exact() -> None:
    """On a memory store too: a parent's total covers its child's commits mid-step, and a resume pays once."""
    store = loomc.MemoryStore()
    seen: list[float] = []
    state = {"fail": True}

    @loop(budget=Budget(iterations=3), converge_on=predicate(lambda h: len(h) >= 3), checkpoint=store)
    def child(s: dict[str, Any]) -> dict[str, Any]:
        if s["n"]:
            top = next(r for r in store.list_runs() if r.parent_run_id is None)
            seen.append(top.cost_usd)
        loomc.charge(0.1)
        return {"n": s["n"] + 1}

    @loop(budget=Budget(iterations=3), converge_on=predicate(_done), checkpoint=store)
    def parent(s: dict[str, Any]) -> dict[str, Any]:
        child.run({"n": 0})
        if state["fail"]:
            raise KeyboardInterrupt
        return {"ok": True}

    with pytest.raises(KeyboardInterrupt):
        parent.run({})
    assert seen == [pytest.approx(0.1), pytest.approx(0.2)]
    pid = next(r.id for r in store.list_runs() if r.parent_run_id is None)
    assert store.get_run(pid).cost_usd == pytest.approx(0.3)  # type: ignore[union-attr]
    state["fail"] = False
    result = parent.resume_run(pid)
    assert result.status is RunStatus.COMPLETED
    assert result.cost_usd == pytest.approx(0.3)
    assert store.get_run(pid).cost_usd == pytest.approx(0.3)  # type: ignore[union-attr]
    assert [h.cost_usd for h in store.load_steps(pid)] == [pytest.approx(0.3)]
