"""Nested loops: child runs in the root's store, costs rolled up at once, caps of the whole tree, resume."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

import loomc
from loomc import Budget, BudgetExhausted, RunStatus, SQLiteStore, loop, predicate

pytestmark = pytest.mark.usefixtures("no_blocking")

def runs_table(db: str) -> list[dict[str, Any]]:
    """Every run of the database, oldest first, as dicts."""
    with sqlite3.connect(db) as c:
        c.row_factory = sqlite3.Row
        return [dict(r) for r in c.execute("SELECT * FROM runs ORDER BY created_at, rowid")]


def step_costs(db: str, run_id: str) -> list[float]:
    """The committed step costs of a run."""
    with sqlite3.connect(db) as c:
        return [r[0] for r in c.execute("SELECT cost_usd FROM steps WHERE run_id=? ORDER BY step_n", (run_id,))]


def upto(key: str, n: int) -> Any:
    """Converge once ``state[key] >= n``."""
    return predicate(lambda h: h[-1].state[key] >= n)


# -- a three-level tree, sync ------------------------------------------------------


def sync_tree(db: str, root_usd: float | None, elsewhere: str, seen: list[Any]) -> Any:
    """root -> mid -> leaf; a leaf charges $0.01, $0.02, $0.03 (3 steps), a mid runs 2 leaves, the root mids."""

    @loop(checkpoint=elsewhere, budget=Budget(usd=1.0, iterations=10), converge_on=upto("n", 3), name="leaf")
    def leaf(state: dict[str, int]) -> dict[str, int]:
        view = loomc.current_run()
        assert view is not None
        seen.append(view)
        loomc.charge(0.01 * (state["n"] + 1))
        return {"n": state["n"] + 1}

    @loop(checkpoint=elsewhere, budget=Budget(iterations=10), converge_on=upto("m", 2), name="mid")
    def mid(state: dict[str, int]) -> dict[str, int]:
        leaf({"n": 0})
        return {"m": state["m"] + 1}

    @loop(checkpoint=db, budget=Budget(usd=root_usd, iterations=3), name="root")
    def root(state: dict[str, int]) -> dict[str, int]:
        mid({"m": 0})
        return {"r": state["r"] + 1}

    return root


def test_three_deep_uncapped_rolls_every_cost_up_to_the_root(db: str, tmp_path: Path) -> None:
    """Three levels: each run's total includes its subtree; each parent step's cost is its children's."""
    elsewhere = str(tmp_path / "never.db")
    seen: list[Any] = []
    result = sync_tree(db, None, elsewhere, seen).run({"r": 0})
    assert result.status is RunStatus.BUDGET_EXHAUSTED  # its iterations
    assert result.cost_usd == pytest.approx(3 * 2 * 3 * 0.02)
    assert not Path(elsewhere).exists()  # children write to the root's database
    runs = runs_table(db)
    by_name = Counter(r["name"] for r in runs)
    assert by_name == {"root": 1, "mid": 3, "leaf": 6}
    root = next(r for r in runs if r["name"] == "root")
    mids = [r for r in runs if r["name"] == "mid"]
    assert [(m["parent_run_id"], m["parent_step"], m["call_index"]) for m in mids] == [(root["id"], k, 0) for k in range(3)]
    for m in mids:
        leaves = [r for r in runs if r["parent_run_id"] == m["id"]]
        assert [(lf["parent_step"], lf["call_index"]) for lf in leaves] == [(0, 0), (1, 0)]
        assert step_costs(db, m["id"]) == pytest.approx([lf["cost_usd"] for lf in leaves])
        assert m["cost_usd"] == pytest.approx(0.12)
    assert step_costs(db, root["id"]) == pytest.approx([m["cost_usd"] for m in mids])
    assert seen[0].parent_run_id is not None
    # every nested run names the root of its tree
    assert {r["root_run_id"] for r in runs if r["id"] != root["id"]} == {root["id"]}
    assert root["root_run_id"] is None
    assert seen[0].step == 0


def test_three_deep_with_a_cap_on_the_root_never_crosses_it(db: str, tmp_path: Path) -> None:
    """A $0.05 cap on the root refuses a leaf's charge two levels down; the tree spends at most $0.05."""
    seen: list[Any] = []
    root = sync_tree(db, 0.05, str(tmp_path / "never.db"), seen)
    result = root.run({"r": 0})
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert isinstance(result.error, BudgetExhausted)
    assert result.error.limit == "usd"
    assert result.error.run_id == result.run_id
    assert result.cost_usd == pytest.approx(0.03)
    assert result.cost_usd <= 0.05
    runs = runs_table(db)
    statuses = sorted((r["name"], r["status"]) for r in runs)
    assert statuses == [("leaf", "budget_exhausted"), ("mid", "budget_exhausted"), ("root", "budget_exhausted")]
    (leaf,) = (r for r in runs if r["name"] == "leaf")
    assert leaf["stop_reason"] == f"budget: usd (enclosing run {result.run_id})"
    assert leaf["cost_usd"] == pytest.approx(0.03)  # the refused $0.03 charge was not recorded
    assert step_costs(db, leaf["id"]) == pytest.approx([0.01, 0.02, 0.0])
    # the leaf saw the tightest remaining budget: the root's, not its own $1.00
    assert [round(v.usd_remaining, 6) for v in seen] == [0.05, 0.04, 0.02]
    with pytest.raises(BudgetExhausted) as caught:
        root({"r": 0})
    assert caught.value.run_id != result.run_id


def test_a_child_charge_reaches_every_ancestor_at_once(db: str) -> None:
    """While a grandchild's step runs, its charge is already visible on the parent and the root."""
    views: list[tuple[float, float, float]] = []
    ledgers: list[Any] = []

    @loop(checkpoint=db, budget=Budget(iterations=1), name="g")
    def grandchild(state: dict[str, int]) -> dict[str, int]:
        loomc.charge(0.5)
        led = loomc._core.context.current_ledger()
        assert led is not None
        views.append(tuple(round(x.spent, 9) for x in led.chain()))  # type: ignore[arg-type]
        return state

    @loop(checkpoint=db, budget=Budget(iterations=1), name="c")
    def child(state: dict[str, int]) -> dict[str, int]:
        loomc.charge(0.25)
        grandchild.run(state)
        return state

    @loop(checkpoint=db, budget=Budget(iterations=1), name="p")
    def parent(state: dict[str, int]) -> dict[str, int]:
        loomc.charge(0.125)
        child.run(state)
        ledgers.append(loomc.current_run())
        return state

    result = parent.run({"x": 0})
    assert views == [(0.5, 0.75, 0.875)]
    assert result.cost_usd == 0.875
    assert ledgers[0].usd_spent == 0.875


# -- the same tree across the sync/async boundary ------------------------------------


def mixed_tree(db: str, kind: str) -> Any:
    """A three-level tree whose levels are sync or async, crossing the boundary as ``kind`` says."""

    @loop(checkpoint=db, budget=Budget(iterations=10), converge_on=upto("n", 3), name="leaf")
    def sync_leaf(state: dict[str, int]) -> dict[str, int]:
        loomc.charge(0.01 * (state["n"] + 1))
        return {"n": state["n"] + 1}

    @loop(checkpoint=db, budget=Budget(iterations=10), converge_on=upto("n", 3), name="leaf")
    async def async_leaf(state: dict[str, int]) -> dict[str, int]:
        await anyio.sleep(0)
        loomc.charge(0.01 * (state["n"] + 1))
        return {"n": state["n"] + 1}

    if kind == "async":

        @loop(checkpoint=db, budget=Budget(iterations=10), converge_on=upto("m", 2), name="mid")
        async def mid(state: dict[str, int]) -> dict[str, int]:
            await async_leaf({"n": 0})
            return {"m": state["m"] + 1}

        @loop(checkpoint=db, budget=Budget(usd=0.05, iterations=3), name="root")
        async def root(state: dict[str, int]) -> dict[str, int]:
            await mid({"m": 0})
            return {"r": state["r"] + 1}

    elif kind == "async>sync>async":
        # an async root runs a sync mid in a worker thread; the mid calls back into the loop

        @loop(checkpoint=db, budget=Budget(iterations=10), converge_on=upto("m", 2), name="mid")
        def mid(state: dict[str, int]) -> dict[str, int]:
            anyio.from_thread.run(async_leaf, {"n": 0})
            return {"m": state["m"] + 1}

        @loop(checkpoint=db, budget=Budget(usd=0.05, iterations=3), name="root")
        async def root(state: dict[str, int]) -> dict[str, int]:
            await anyio.to_thread.run_sync(mid, {"m": 0})
            return {"r": state["r"] + 1}

    else:  # "sync>async>sync": a sync root starts an event loop inside its step
        backend = kind.split(":")[1]

        @loop(checkpoint=db, budget=Budget(iterations=10), converge_on=upto("m", 2), name="mid")
        async def mid(state: dict[str, int]) -> dict[str, int]:
            await anyio.to_thread.run_sync(sync_leaf, {"n": 0})
            return {"m": state["m"] + 1}

        @loop(checkpoint=db, budget=Budget(usd=0.05, iterations=3), name="root")
        def root(state: dict[str, int]) -> dict[str, int]:
            anyio.run(mid, {"m": 0}, backend=backend)
            return {"r": state["r"] + 1}

    return root


def check_capped_tree(db: str, result: Any) -> None:
    """The capped three-level tree ended exactly as the sync one does."""
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert result.cost_usd == pytest.approx(0.03)
    runs = runs_table(db)
    assert sorted((r["name"], r["status"]) for r in runs) == [
        ("leaf", "budget_exhausted"), ("mid", "budget_exhausted"), ("root", "budget_exhausted"),
    ]
    root = next(r for r in runs if r["name"] == "root")
    mid = next(r for r in runs if r["name"] == "mid")
    assert mid["parent_run_id"] == root["id"]
    assert {r["parent_run_id"] for r in runs if r["name"] == "leaf"} == {mid["id"]}
    assert root["cost_usd"] == pytest.approx(0.03)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("kind", ["async", "async>sync>async"])
def test_three_deep_async_and_across_the_boundary(db: str, kind: str, backend: str) -> None:
    """Async in async, and sync children in worker threads calling back into the loop, keep the tree."""
    root = mixed_tree(db, kind)
    result = anyio.run(root.run, {"r": 0}, backend=backend)
    check_capped_tree(db, result)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_sync_parent_runs_an_async_child_with_anyio_run(db: str, backend: str) -> None:
    """A sync step may start an event loop (``anyio.run``) for an async child: the context follows."""
    result = mixed_tree(db, f"sync>async>sync:{backend}").run({"r": 0})
    check_capped_tree(db, result)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_concurrent_children_of_one_step_are_keyed_by_call_order(db: str, anyio_backend: str) -> None:
    """Children started together by one step get call indexes 0..n-1 and all roll up into that step."""

    @loop(checkpoint=db, budget=Budget(iterations=2), name="kid")
    async def kid(state: dict[str, int]) -> dict[str, int]:
        await anyio.sleep(0.01)
        loomc.charge(0.01 * state["i"])
        return state

    @loop(checkpoint=db, budget=Budget(iterations=1), name="fan")
    async def fan(state: dict[str, int]) -> dict[str, int]:
        async with anyio.create_task_group() as tg:
            for i in range(1, 5):
                tg.start_soon(kid.run, {"i": i})
        return state

    result = await fan.run({"x": 0})
    runs = await anyio.to_thread.run_sync(runs_table, db)
    kids = [r for r in runs if r["name"] == "kid"]
    assert sorted(k["call_index"] for k in kids) == [0, 1, 2, 3]
    assert {k["parent_step"] for k in kids} == {0}
    assert result.cost_usd == pytest.approx(2 * 0.01 * (1 + 2 + 3 + 4))
    assert await anyio.to_thread.run_sync(step_costs, db, result.run_id) == pytest.approx([0.2])


# -- a re-run parent step resumes its children ---------------------------------------


def planner_worker(db: str, calls: Counter[str], interrupt_at: tuple[int, int] | None) -> Any:
    """A planner whose steps run two workers: ``scout`` (2 steps) then ``worker`` (4 steps)."""
    armed = [interrupt_at]

    @loop(checkpoint=db, budget=Budget(usd=1.0), converge_on=upto("n", 2), name="scout")
    def scout(state: dict[str, int]) -> dict[str, int]:
        view = loomc.current_run()
        assert view is not None
        calls[view.run_id] += 1
        loomc.charge(0.001)
        return {"n": state["n"] + 1}

    @loop(checkpoint=db, budget=Budget(usd=1.0), converge_on=upto("n", 4), name="worker")
    def worker(state: dict[str, int]) -> dict[str, int]:
        view = loomc.current_run()
        assert view is not None
        parent_step = runs_by_id(db)[view.run_id]["parent_step"]
        if armed[0] == (parent_step, state["n"]):
            armed[0] = None
            raise KeyboardInterrupt
        calls[view.run_id] += 1
        loomc.charge(0.01)
        return {"n": state["n"] + 1}

    @loop(checkpoint=db, budget=Budget(usd=1.0, iterations=10), converge_on=upto("k", 3), name="planner")
    def planner(state: dict[str, Any]) -> dict[str, Any]:
        scout({"n": 0})
        done = worker({"n": 0})
        loomc.charge(0.005)
        return {"k": state["k"] + 1, "got": [*state["got"], done["n"]]}

    return planner


def runs_by_id(db: str) -> dict[str, dict[str, Any]]:
    """The runs table keyed by id."""
    return {r["id"]: r for r in runs_table(db)}


def test_interrupted_parent_step_resumes_its_children_and_pays_once(tmp_path: Path) -> None:
    """After an interrupt inside a worker, resuming the planner re-runs its step: the finished scout
    returns without running, the worker continues from its own checkpoint; the total is exact."""
    clean_db, db = str(tmp_path / "clean.db"), str(tmp_path / "crash.db")
    clean = planner_worker(clean_db, Counter(), None).run({"k": 0, "got": []})
    assert clean.status is RunStatus.COMPLETED

    calls: Counter[str] = Counter()
    planner = planner_worker(db, calls, (1, 2))
    with pytest.raises(KeyboardInterrupt):
        planner({"k": 0, "got": []})
    before = runs_by_id(db)
    assert sorted(r["status"] for r in before.values()) == [
        "completed", "completed", "completed", "interrupted", "interrupted",
    ]
    planner_id = next(i for i, r in before.items() if r["name"] == "planner")
    calls_before = Counter(calls)

    result = planner.resume_run(planner_id)
    assert result.status is RunStatus.COMPLETED
    assert result.state == clean.state
    assert result.cost_usd == clean.cost_usd == pytest.approx(3 * (0.002 + 0.04 + 0.005))
    after = runs_by_id(db)
    assert len(after) == len(runs_by_id(clean_db)) == 7  # no child started twice
    scout1 = next(i for i, r in after.items() if r["name"] == "scout" and r["parent_step"] == 1)
    worker1 = next(i for i, r in after.items() if r["name"] == "worker" and r["parent_step"] == 1)
    assert calls[scout1] == calls_before[scout1] == 2  # finished: returned without running
    assert calls_before[worker1] == 2
    assert calls[worker1] == 4  # steps 2 and 3 only: continued from its checkpoint
    assert after[worker1]["attempts"] == 2
    assert after[worker1]["steps"] == 4
    assert step_costs(db, planner_id) == pytest.approx(step_costs(clean_db, next(
        i for i, r in runs_by_id(clean_db).items() if r["name"] == "planner"
    )))


# -- SIGKILL while a child runs, resume in a new process ------------------------------

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import anyio
    import loomc
    from loomc import Budget, loop, predicate

    db, log_path = sys.argv[1], sys.argv[2]
    resume_id = sys.argv[3] if len(sys.argv) > 3 else None
    is_async = os.environ["MODE"] == "async"
    log = open(log_path, "a")

    def note(kind, n):
        view = loomc.current_run()
        log.write(json.dumps([os.getpid(), kind, view.run_id, n]) + "\\n")
        log.flush()

    if is_async:
        @loop(checkpoint=db, budget=Budget(usd=1.0), converge_on=predicate(lambda h: h[-1].state["n"] >= 4), name="worker")
        async def worker(s):
            note("worker", s["n"])
            await anyio.sleep(0.08)
            loomc.charge(0.01)
            return {"n": s["n"] + 1}

        @loop(checkpoint=db, budget=Budget(usd=1.0, iterations=10), converge_on=predicate(lambda h: h[-1].state["k"] >= 3), name="planner")
        async def planner(s):
            r = await worker({"n": 0})
            loomc.charge(0.005)
            return {"k": s["k"] + 1, "got": s["got"] + [r["n"]]}

        call = (lambda: planner.resume_run(resume_id)) if resume_id else (lambda: planner.run({"k": 0, "got": []}))
        result = anyio.run(call)
    else:
        @loop(checkpoint=db, budget=Budget(usd=1.0), converge_on=predicate(lambda h: h[-1].state["n"] >= 4), name="worker")
        def worker(s):
            note("worker", s["n"])
            time.sleep(0.08)
            loomc.charge(0.01)
            return {"n": s["n"] + 1}

        @loop(checkpoint=db, budget=Budget(usd=1.0, iterations=10), converge_on=predicate(lambda h: h[-1].state["k"] >= 3), name="planner")
        def planner(s):
            r = worker({"n": 0})
            loomc.charge(0.005)
            return {"k": s["k"] + 1, "got": s["got"] + [r["n"]]}

        result = planner.resume_run(resume_id) if resume_id else planner.run({"k": 0, "got": []})
    print(json.dumps({"run_id": result.run_id, "status": result.status.value, "cost": result.cost_usd, "state": result.state}))
    """
)


def worker_steps_under(db: str, parent_step: int) -> int:
    """Committed steps of the worker started by the planner's step ``parent_step``."""
    try:
        with sqlite3.connect(db) as c:
            return int(c.execute(
                "SELECT count(*) FROM steps s JOIN runs r ON r.id = s.run_id WHERE r.name='worker' AND r.parent_step=?",
                (parent_step,),
            ).fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def run_script(script: Path, db: Path, log: Path, mode: str, *extra: str) -> dict[str, Any]:
    """Run the planner script to its end; its result line."""
    out = subprocess.run(
        [sys.executable, str(script), str(db), str(log), *extra], capture_output=True, text=True,
        env={**os.environ, "MODE": mode}, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_while_a_child_runs_then_resume_pays_once(tmp_path: Path, mode: str) -> None:
    """Kill -9 the planner's process while its worker runs; a new process resumes the planner: the
    worker continues from its own checkpoint and the total spend equals an uninterrupted run's."""
    script = tmp_path / "planner.py"
    script.write_text(SCRIPT)
    clean = run_script(script, tmp_path / "clean.db", tmp_path / "clean.log", mode)
    assert clean["status"] == "completed"

    db, log = tmp_path / "crash.db", tmp_path / "crash.log"
    proc = subprocess.Popen([sys.executable, str(script), str(db), str(log)], env={**os.environ, "MODE": mode},
                            stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while worker_steps_under(str(db), 1) < 2:
        assert time.monotonic() < deadline, "the planner's second worker never got going"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed_before = worker_steps_under(str(db), 1)
    assert 2 <= committed_before < 4

    listing = {r.name: r for r in SQLiteStore(db).list_runs(roots_only=True)}
    assert listing["planner"].status is RunStatus.CRASHED
    resumed = run_script(script, db, log, mode, listing["planner"].id)

    assert resumed["status"] == "completed"
    assert resumed["state"] == clean["state"] == {"k": 3, "got": [4, 4, 4]}
    assert resumed["cost"] == clean["cost"] == pytest.approx(3 * (0.04 + 0.005))
    runs = runs_table(str(db))
    workers = [r for r in runs if r["name"] == "worker"]
    assert sorted(w["parent_step"] for w in workers) == [0, 1, 2]  # the killed step's worker was not restarted
    killed = next(w for w in workers if w["parent_step"] == 1)
    assert killed["attempts"] == 2
    assert killed["steps"] == 4
    assert killed["cost_usd"] == pytest.approx(0.04)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    pids = [p for p, *_ in lines]
    second_pid = pids[-1]
    resumed_worker_steps = [n for p, kind, rid, n in lines if p == second_pid and rid == killed["id"]]
    assert resumed_worker_steps == list(range(committed_before, 4))  # from its own checkpoint on
    assert step_costs(str(db), resumed["run_id"]) == pytest.approx([0.045, 0.045, 0.045])


def test_a_cap_in_the_middle_of_the_tree_holds_its_subtree(db: str) -> None:
    """A cap on a middle run (not the root) bounds what its own children spend."""

    @loop(checkpoint=db, budget=Budget(iterations=10), name="leaf")
    def leaf(state: dict[str, int]) -> dict[str, int]:
        loomc.charge(0.01 * (state["n"] + 1))
        return {"n": state["n"] + 1}

    @loop(checkpoint=db, budget=Budget(usd=0.05, iterations=5), name="mid")
    def mid(state: dict[str, int]) -> dict[str, int]:
        leaf.run({"n": 0})
        return {"m": state["m"] + 1}

    @loop(checkpoint=db, budget=Budget(usd=10.0, iterations=1), name="root")
    def root(state: dict[str, int]) -> dict[str, int]:
        mid.run({"m": 0})
        return state

    result = root.run({"r": 0})
    runs = {r["name"]: r for r in runs_table(db)}
    assert runs["mid"]["status"] == "budget_exhausted"
    assert runs["mid"]["cost_usd"] == pytest.approx(0.03)  # $0.01 + $0.02; the $0.03 charge was refused
    assert runs["leaf"]["stop_reason"] == f"budget: usd (enclosing run {runs['mid']['id']})"
    assert result.status is RunStatus.BUDGET_EXHAUSTED  # its one iteration; the root itself was never short
    assert result.stop_reason == "budget: iterations"
    assert result.cost_usd == pytest.approx(0.03)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_an_ancestors_wall_clock_cancels_an_async_child_mid_step(db: str, backend: str) -> None:
    """The root's deadline cancels its async child mid-step: the child keeps its committed steps, the
    root records the cancelled step (an iteration) and ends budget_exhausted; resume starts a new step."""
    ran: list[int] = []

    @loop(checkpoint=db, budget=Budget(iterations=20), converge_on=upto("n", 6), name="kid")
    async def kid(state: dict[str, int]) -> dict[str, int]:
        ran.append(state["n"])
        await anyio.sleep(0.1)
        return {"n": state["n"] + 1}

    @loop(checkpoint=db, budget=Budget(wall_clock="350ms"), converge_on=upto("n", 6), name="root")
    async def root(state: dict[str, int]) -> dict[str, int]:
        return await kid({"n": 0})

    t0 = time.monotonic()
    first = anyio.run(root.run, {"n": 0}, backend=backend)
    assert time.monotonic() - t0 < 1.5
    assert first.status is RunStatus.BUDGET_EXHAUSTED
    assert first.stop_reason == "budget: wall_clock"
    assert first.state == {"n": 0}
    (kid_row,) = (r for r in runs_table(db) if r["name"] == "kid")
    # cancelled from outside its own scope; when its own copy of the root's deadline fires first,
    # it records that step and stops on the enclosing wall clock instead: either way resumable
    assert kid_row["status"] in ("interrupted", "budget_exhausted")
    assert 1 <= kid_row["steps"] <= 4
    with sqlite3.connect(db) as c:
        (err,) = c.execute("SELECT error FROM steps WHERE run_id=?", (first.run_id,)).fetchone()
    assert "wall_clock" in err

    final = anyio.run(lambda: root.resume(first.run_id, budget=Budget(wall_clock="10s")), backend=backend)
    assert final == {"n": 6}
    kids = [r for r in runs_table(db) if r["name"] == "kid"]
    assert [(k["parent_step"], k["status"]) for k in kids] == [(0, kid_row["status"]), (1, "completed")]


def test_a_stalled_child_of_a_rerun_step_is_not_run_again(db: str) -> None:
    """A child that stalled before the parent was interrupted raises its StallError again on the re-run."""
    from loomc import Escalate, StallError

    calls: list[int] = []
    armed = [True]

    @loop(checkpoint=db, budget=Budget(iterations=20), scorer=lambda s: 1.0, on_stall=Escalate(after=2), name="stuck")
    def stuck(state: dict[str, int]) -> dict[str, int]:
        calls.append(state["n"])
        loomc.charge(0.01)
        return {"n": state["n"] + 1}

    @loop(checkpoint=db, budget=Budget(iterations=1), name="boss")
    def boss(state: dict[str, Any]) -> dict[str, Any]:
        try:
            stuck({"n": 0})
        except StallError as exc:
            outcome = f"stalled at {exc.state}"
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt
        return {"outcome": outcome}

    with pytest.raises(KeyboardInterrupt):
        boss({})
    assert len(calls) == 3
    boss_id = next(r["id"] for r in runs_table(db) if r["name"] == "boss")
    result = boss.resume_run(boss_id)
    assert result.state == {"outcome": "stalled at {'n': 3}"}
    assert len(calls) == 3  # not run again
    assert result.cost_usd == pytest.approx(0.03)


def test_the_planner_worker_example_runs_and_adds_up(tmp_path: Path) -> None:
    """``examples/planner_worker.py`` runs offline; the workers' costs sum to the planner's total."""
    example = Path(__file__).resolve().parents[1] / "examples" / "planner_worker.py"
    db = tmp_path / "pw.db"
    out = subprocess.run([sys.executable, str(example), "--db", str(db)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "completed" in out.stdout
    runs = runs_table(str(db))
    planner = next(r for r in runs if r["name"] == "planner")
    workers = [r for r in runs if r["name"] == "worker"]
    assert len(workers) == 4
    assert {w["parent_run_id"] for w in workers} == {planner["id"]}
    assert planner["cost_usd"] == pytest.approx(sum(w["cost_usd"] for w in workers))
    assert planner["cost_usd"] <= 0.20


def test_event_loops_started_by_sync_steps_are_not_kept_alive(db: str) -> None:
    """Each anyio.run inside a sync step gets its own async store, released with its event loop."""
    import gc

    from loomc.store.sqlite import aio as _astore

    @loop(checkpoint=db, budget=Budget(iterations=1), name="inner")
    async def inner(state: dict[str, int]) -> dict[str, int]:
        return state

    @loop(checkpoint=db, budget=Budget(iterations=5), name="outer")
    def outer(state: dict[str, int]) -> dict[str, int]:
        anyio.run(inner.run, state)
        return state

    gc.collect()
    before = {id(k) for k in _astore._per_loop}  # loops other tests keep alive (a test runner's own)
    outer.run({"x": 0})
    gc.collect()
    # no event loop started by the steps is still held (others may have been released meanwhile)
    assert {id(k) for k in _astore._per_loop} <= before
    assert len([r for r in runs_table(db) if r["name"] == "inner"]) == 5
