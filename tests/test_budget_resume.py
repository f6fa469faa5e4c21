"""Limits given on resume replace only the limits they name (API, async, CLI and graph alike)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from loomc import Budget, BudgetExhausted, RunStatus, SQLiteStore, loop, predicate


def _counter(db: str, budget: Budget, *, stop_at: int = 10**9, cost: float = 0.01) -> Any:
    @loop(
        checkpoint=db,
        budget=budget,
        cost_fn=lambda s: cost,
        converge_on=predicate(lambda h: h[-1].state["n"] >= stop_at),
        name="budget_resume:counter",
    )
    def counter(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    return counter


def _stored_budget(db: str, run_id: str) -> dict[str, Any]:
    info = SQLiteStore(db, create=False).get_run(run_id)
    assert info is not None
    return dict(info.budget)


# ---------------------------------------------------------------------------------
# Budget.merged, the one rule


def test_merged_replaces_named_keeps_others_and_inf_removes() -> None:
    """A named limit replaces the stored one, None keeps it, math.inf removes it."""
    stored = Budget(usd=0.5, iterations=5, wall_clock="10m")
    assert Budget.merged(stored, None) == stored
    assert Budget.merged(stored, Budget(usd=1.0)).to_dict() == {"usd": 1.0, "iterations": 5, "wall_clock": 600.0}
    assert Budget.merged(stored, Budget(iterations=math.inf)).to_dict() == {"usd": 0.5, "iterations": None, "wall_clock": 600.0}
    assert Budget.merged(stored.to_dict(), Budget(wall_clock=math.inf, usd=2)).to_dict() == {
        "usd": 2.0, "iterations": 5, "wall_clock": None,
    }
    assert Budget.merged(None, Budget(wall_clock=timedelta(seconds=3))).to_dict() == {"usd": None, "iterations": None, "wall_clock": 3.0}


def test_budget_accepts_inf_as_no_limit_and_still_refuses_bad_values() -> None:
    """inf (or "inf" for wall_clock) means no limit and is stored as none; NaN and -inf stay errors."""
    b = Budget(usd=math.inf, iterations=math.inf, wall_clock="inf")
    assert (b.usd, b.iterations, b.wall_clock_seconds) == (None, None, None)
    assert b.to_dict() == {"usd": None, "iterations": None, "wall_clock": None}
    assert b.removed == {"usd", "iterations", "wall_clock"}
    assert repr(Budget(usd=1.0, iterations=math.inf)) == "Budget(usd=1.0, iterations=math.inf)"
    assert Budget(usd=math.inf) != Budget()  # one removes a limit on resume, the other keeps it
    for bad in ({"usd": math.nan}, {"usd": -math.inf}, {"iterations": -math.inf}, {"wall_clock": "-inf"}, {"iterations": 2.5}):
        with pytest.raises(ValueError, match=r"Budget|duration"):
            Budget(**bad)


# ---------------------------------------------------------------------------------
# The API


def test_resume_with_usd_keeps_the_iteration_cap(db: str) -> None:
    """resume(budget=Budget(usd=...)) raises the usd cap and keeps iterations=5."""
    counter = _counter(db, Budget(usd=0.03, iterations=5))
    first = counter.run({"n": 0})
    assert (first.status, first.steps) == (RunStatus.BUDGET_EXHAUSTED, 3)
    with pytest.raises(BudgetExhausted) as caught:
        counter.resume(first.run_id, budget=Budget(usd=1.00))
    assert caught.value.limit == "iterations"
    assert SQLiteStore(db, create=False).get_run(first.run_id).steps == 5  # type: ignore[union-attr]
    assert _stored_budget(db, first.run_id) == {"usd": 1.0, "iterations": 5, "wall_clock": None}


def test_resume_with_inf_removes_a_limit_and_the_removal_is_stored(db: str) -> None:
    """math.inf removes the iteration cap; a later plain resume keeps it removed."""
    counter = _counter(db, Budget(usd=1.0, iterations=2), stop_at=6)
    first = counter.run({"n": 0})
    assert (first.status, first.steps) == (RunStatus.BUDGET_EXHAUSTED, 2)
    state = counter.resume(first.run_id, budget=Budget(iterations=math.inf))
    assert state == {"n": 6}
    assert _stored_budget(db, first.run_id) == {"usd": 1.0, "iterations": None, "wall_clock": None}
    assert counter.resume(first.run_id) == {"n": 6}


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_resume_merges_limits_too(db: str, backend: str) -> None:
    """The async driver resumes with the same merged limits."""

    @loop(checkpoint=db, budget=Budget(usd=0.02, iterations=4), cost_fn=lambda s: 0.01, name="budget_resume:acounter")
    async def acounter(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    async def main() -> tuple[Any, Any]:
        first = await acounter.run({"n": 0})
        again = await acounter.resume_run(first.run_id, budget=Budget(usd=5.0))
        return first, again

    first, again = anyio.run(main, backend=backend)
    assert first.steps == 2
    assert (again.status, again.steps, again.stop_reason) == (RunStatus.BUDGET_EXHAUSTED, 4, "budget: iterations")


# ---------------------------------------------------------------------------------
# The graph


def test_graph_resume_merges_limits(db: str) -> None:
    """Graph.resume(budget=Budget(usd=...)) keeps the graph's wall clock; inf removes the usd cap."""
    from orchestration import Graph

    @loop(checkpoint=db, budget=Budget(iterations=3), cost_fn=lambda s: 0.1, name="budget_resume:node")
    def work(state: Any) -> Any:
        return state

    graph = Graph("budget-resume", budget=Budget(usd=0.15, wall_clock="1h"), checkpoint=db)
    graph.add(work)
    first = graph.run({"n": 0})
    assert first.status is RunStatus.BUDGET_EXHAUSTED
    graph.resume(first.run_id, budget=Budget(usd=0.25))
    assert _stored_budget(db, first.run_id) == {"usd": 0.25, "iterations": None, "wall_clock": 3600.0}
    done = graph.resume(first.run_id, budget=Budget(usd=math.inf))
    assert done.status is RunStatus.COMPLETED
    assert _stored_budget(db, first.run_id) == {"usd": None, "iterations": None, "wall_clock": 3600.0}


# ---------------------------------------------------------------------------------
# The CLI

MODULE = textwrap.dedent(
    """
    from loomc import Budget, loop, predicate

    @loop(
        budget=Budget(usd=0.03, iterations=6),
        cost_fn=lambda s: 0.01,
        converge_on=predicate(lambda h: h[-1].state["n"] >= 100),
    )
    def count(state):
        return {"n": state["n"] + 1}
    """
)


def _loomc(*args: str, cwd: Path, db: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LOOMC_DB": str(db)}
    return subprocess.run(
        [sys.executable, "-m", "loomc", *args, "--db", str(db)], capture_output=True, text=True, cwd=cwd, env=env, timeout=60
    )


def test_cli_resume_limits_follow_the_same_rule(tmp_path: Path) -> None:
    """`--usd inf` removes the usd cap and keeps iterations=6; `--iterations inf` removes that one."""
    (tmp_path / "countmod.py").write_text(MODULE)
    db = tmp_path / "count.db"
    env = {**os.environ, "LOOMC_DB": str(db)}
    subprocess.run([sys.executable, "-c", "import countmod; countmod.count.run({'n': 0})"], cwd=tmp_path, env=env, check=True, timeout=60)
    run_id = SQLiteStore(db, create=False).list_runs()[0].id

    more = _loomc("resume", run_id, "--run", "--usd", "inf", cwd=tmp_path, db=db)
    assert more.returncode == 1, more.stderr
    assert "budget: iterations" in more.stderr
    assert _stored_budget(str(db), run_id) == {"usd": None, "iterations": 6, "wall_clock": None}

    unbounded = _loomc("resume", run_id, "--run", "--iterations", "inf", "--usd", "0.08", cwd=tmp_path, db=db)
    assert unbounded.returncode == 1, unbounded.stderr
    assert "budget: usd" in unbounded.stderr
    info = SQLiteStore(db, create=False).get_run(run_id)
    assert info is not None
    assert (info.steps, info.budget) == (8, {"usd": 0.08, "iterations": None, "wall_clock": None})

    bad = _loomc("resume", run_id, "--run", "--usd", "nan", cwd=tmp_path, db=db)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr


def test_merging_twice_is_merging_once() -> None:
    """A merged budget merged again onto the same stored limits changes nothing (a removal stays removed)."""
    stored = {"usd": 0.5, "iterations": 5, "wall_clock": 60.0}
    for given in (Budget(usd=math.inf), Budget(iterations=9, wall_clock=math.inf), Budget()):
        once = Budget.merged(stored, given)
        assert Budget.merged(stored, once).to_dict() == once.to_dict()


GRAPH_FILE = textwrap.dedent(
    """
    from loomc import Budget, loop
    from orchestration import Graph

    @loop(budget=Budget(iterations=3), cost_fn=lambda s: 0.1)
    def work(state):
        return state

    graph = Graph("cli-inf", budget=Budget(usd=0.15, wall_clock="1h"))
    graph.add(work)
    """
)


def test_cli_graph_resume_inf_removes_the_graph_usd_cap(tmp_path: Path) -> None:
    """`loomc graph run FILE --resume ID --usd inf` removes the graph's usd cap and keeps its wall clock."""
    pipeline = tmp_path / "infpipe.py"
    pipeline.write_text(GRAPH_FILE)
    db = tmp_path / "graph.db"
    first = _loomc("graph", "run", str(pipeline), "--input", "{}", cwd=tmp_path, db=db)
    assert first.returncode == 1, first.stderr
    run_id = next(r.id for r in SQLiteStore(db, create=False).list_runs() if r.kind == "graph")
    done = _loomc("graph", "run", str(pipeline), "--resume", run_id, "--usd", "inf", cwd=tmp_path, db=db)
    assert done.returncode == 0, done.stderr
    assert _stored_budget(str(db), run_id) == {"usd": None, "iterations": None, "wall_clock": 3600.0}
