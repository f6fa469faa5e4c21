"""Money entering the ledger: refused when it is not a finite amount >= 0, counted once, in the right run."""

from __future__ import annotations

import asyncio
import math
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import anthropic
import anyio
import pytest

import loomc
from loomc import (
    Budget,
    BudgetExhausted,
    CostError,
    LastGood,
    LoomcError,
    MemoryStore,
    Retry,
    RunContextLost,
    RunStatus,
    SQLiteStore,
    loop,
    predicate,
)
from loomc.adapters import AnthropicAdapter
from loomc.integrations.pricing import Price, anthropic_cost, openai_cost
from loomc.testing import FakeAPI, Usage, serve
from orchestration import Graph

pytestmark = pytest.mark.usefixtures("no_blocking")

BAD = [math.nan, math.inf, -math.inf, -0.01, None, "0.10", True]
FAST = Retry(attempts=3, initial=0.001, jitter=0)
DONE = predicate(lambda history: history[-1].error is None)  # one good step completes the run


def run_row(db: str, run_id: str) -> dict[str, Any]:
    """The run's row as stored."""
    with sqlite3.connect(db) as c:
        c.row_factory = sqlite3.Row
        return dict(c.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone())


def store_for(kind: str, tmp_path: Path) -> Any:
    """A real SQLite file or the in-memory store."""
    return str(tmp_path / "money.db") if kind == "sqlite" else MemoryStore()


# -- cost_fn, charge, reserve, settle: one check where money enters ----------------------------


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
@pytest.mark.parametrize("bad", BAD)
def test_a_cost_fn_that_returns_no_valid_amount_fails_that_step(tmp_path: Path, kind: str, bad: Any) -> None:
    """NaN, inf, negative, None or a string from cost_fn fails the step with a CostError naming cost_fn."""
    store = store_for(kind, tmp_path)
    calls = {"n": 0}

    def cost(state: dict[str, int]) -> Any:
        return 0.25 if state["n"] <= 2 else bad

    @loop(checkpoint=store, budget=Budget(usd=1.0, iterations=10), cost_fn=cost, name="costed")
    def step(state: dict[str, int]) -> dict[str, int]:
        calls["n"] += 1
        return {"n": state["n"] + 1}

    result = step.run({"n": 0})
    assert result.status is RunStatus.FAILED
    assert isinstance(result.error, CostError)
    assert isinstance(result.error, LoomcError)
    assert "cost_fn" in str(result.error)
    assert "finite, non-negative number of USD" in str(result.error)
    assert result.cost_usd == 0.5  # the two good steps; nothing refilled, nothing poisoned
    assert [s.cost_usd for s in result.history] == [0.25, 0.25, 0.0]
    assert result.history[-1].error is not None
    assert result.history[-1].error.startswith("CostError: the cost cost_fn returned for step 2")
    assert result.state == {"n": 2}  # the failed step's state is not kept
    with pytest.raises(CostError, match="cost_fn"):
        step({"n": 0})
    if kind == "sqlite":
        assert isinstance(store, str)
        row = run_row(store, result.run_id)
        assert (row["status"], row["cost_usd"]) == ("failed", 0.5)  # not crashed: resumable


def test_a_cost_fn_error_is_a_step_error_that_last_good_handles(db: str) -> None:
    """With LastGood, a NaN cost fails only that step; the run goes on from the last good state."""
    costs = iter([0.1, math.nan, 0.1, 0.1])

    @loop(checkpoint=db, budget=Budget(usd=1.0, iterations=4), backtrack=LastGood(), name="lastgood",
          cost_fn=lambda s: next(costs))
    def step(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    result = step.run({"n": 0})
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert result.history[1].error is not None
    assert result.history[1].error.startswith("CostError")
    assert [s.cost_usd for s in result.history] == [0.1, 0.0, 0.1, 0.1]
    assert result.cost_usd == pytest.approx(0.3)
    assert SQLiteStore(db).get_run(result.run_id).cost_usd == pytest.approx(0.3)  # type: ignore[union-attr]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_an_async_loop_refuses_a_nan_cost_too(db: str, backend: str) -> None:
    """The async driver runs the same check: NaN fails the step, the run ends failed, not crashed."""

    @loop(checkpoint=db, budget=Budget(usd=1.0, iterations=5), cost_fn=lambda s: math.nan, name="anan")
    async def step(state: dict[str, int]) -> dict[str, int]:
        await anyio.sleep(0)
        return {"n": state["n"] + 1}

    result = anyio.run(step.run, {"n": 0}, backend=backend)
    assert result.status is RunStatus.FAILED
    assert isinstance(result.error, CostError)
    assert run_row(db, result.run_id)["status"] == "failed"


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_a_graph_node_with_a_nan_cost_cannot_open_the_graph_cap(tmp_path: Path, kind: str) -> None:
    """A sibling's NaN no longer disables the graph cap: the other node stops at $1."""

    @loop(budget=Budget(iterations=3), cost_fn=lambda s: math.nan, name="nan_node")
    def broken(state: Any) -> Any:
        return state

    @loop(budget=Budget(iterations=50), name="spender_node")
    def spender(state: Any) -> Any:
        loomc.charge(0.2)
        return state

    graph = Graph("nan-sibling", budget=Budget(usd=1.0), checkpoint=store_for(kind, tmp_path))
    graph.add(broken)
    graph.add(spender)
    result = graph.run({"x": 1})
    assert result.nodes["broken"].status is RunStatus.FAILED
    assert isinstance(result.nodes["broken"].error, CostError)
    assert result.nodes["spender"].status is RunStatus.BUDGET_EXHAUSTED
    assert result.cost_usd <= 1.0 + 1e-9
    assert result.nodes["spender"].cost_usd == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, -1.0, Decimal("NaN"), Decimal("sNaN"), 10**400])
def test_charge_reserve_and_settle_refuse_what_is_not_a_finite_amount(db: str, bad: Any) -> None:
    """Inside a run, infinities (which the old check let through) are refused; nothing is recorded."""
    seen: list[str] = []

    @loop(checkpoint=db, budget=Budget(usd=1.0, iterations=1), name="bad_amounts")
    def step(state: dict[str, int]) -> dict[str, int]:
        for attempt in (lambda: loomc.charge(bad), lambda: loomc.reserve(bad), lambda: loomc.reserve(0.5).settle(bad)):
            with pytest.raises(CostError, match="finite, non-negative number of USD") as info:
                attempt()
            seen.append(str(info.value))
        return state

    result = step.run({"n": 0})
    assert result.status is RunStatus.BUDGET_EXHAUSTED  # iterations
    assert len(seen) == 3
    assert "loomc.charge" in seen[0]
    assert "loomc.reserve" in seen[1]
    assert "settle" in seen[2]
    assert result.cost_usd == 0.5  # the unsettled hold of the third attempt, counted in full
    assert math.isfinite(run_row(db, result.run_id)["cost_usd"])


def test_exact_numbers_are_accepted_as_amounts(db: str) -> None:
    """Decimal, Fraction and ints are numbers of USD like floats."""

    @loop(checkpoint=db, budget=Budget(usd=1.0, iterations=1), cost_fn=lambda s: Decimal("0.05"), name="exact")
    def step(state: dict[str, int]) -> dict[str, int]:
        loomc.charge(Decimal("0.10"))
        loomc.charge(Fraction(1, 10))
        loomc.charge(0)
        return state

    assert step.run({}).cost_usd == pytest.approx(0.25)


# -- prices and the adapters' computed costs ---------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -3.0])
def test_prices_must_be_finite_and_non_negative(bad: float) -> None:
    """A Price or a pricing= table with a NaN, infinite or negative rate is refused when it is built."""
    with pytest.raises(CostError, match="USD per 1M tokens"):
        Price(bad, 15.0, 0.3, 3.75)
    with pytest.raises(CostError, match="USD per 1M tokens"):
        Price(3.0, 15.0, 0.3, 3.75, cache_write_1h=bad)
    with pytest.raises(CostError, match=r"pricing\['output'\]"):
        AnthropicAdapter("claude-sonnet-4-6", pricing={"input": 3.0, "output": bad})
    with pytest.raises(CostError, match="fast"):
        Price(3.0, 15.0, 0.3, 3.75, fast=bad)


def test_a_usage_with_a_negative_or_infinite_token_count_is_refused() -> None:
    """Cost functions refuse token counts that would lower or poison a cost."""
    price = Price(3.0, 15.0, 0.3, 3.75)
    with pytest.raises(CostError, match="input_tokens=-5000"):
        anthropic_cost({"input_tokens": -5000, "output_tokens": 10}, price)
    with pytest.raises(CostError, match="completion_tokens=inf"):
        openai_cost({"prompt_tokens": 10, "completion_tokens": math.inf}, price)


@pytest.fixture(scope="module")
def fake_api() -> Iterator[FakeAPI]:
    """A loopback Anthropic/OpenAI server."""
    with serve() as api:
        yield api


def test_an_adapter_call_whose_usage_gives_no_valid_cost_counts_its_full_reservation(
    fake_api: FakeAPI, db: str
) -> None:
    """A response reporting negative tokens: the call is charged its reservation and the step fails clearly."""
    fake_api.usage = Usage(input=-100_000, output=10)
    adapter = AnthropicAdapter("claude-sonnet-4-6")
    with anthropic.Anthropic(api_key="test", base_url=fake_api.base_url, max_retries=0) as client:
        adapter.wrap(client)

        @loop(checkpoint=db, budget=Budget(usd=1.0, iterations=1), name="bad_usage")
        def step(state: dict[str, Any]) -> dict[str, Any]:
            client.messages.create(model="claude-sonnet-4-6", max_tokens=100,
                                   messages=[{"role": "user", "content": "hi"}])
            return state

        result = step.run({})
    fake_api.usage = Usage()
    assert result.status is RunStatus.FAILED
    assert isinstance(result.error, CostError)
    assert "AnthropicAdapter('claude-sonnet-4-6')" in str(result.error)
    assert result.cost_usd > 100 * 15 / 1e6  # at least the reserved output: never under-counted


def test_an_adapter_refuses_a_call_whose_most_cost_is_negative(fake_api: FakeAPI, db: str) -> None:
    """A negative max_tokens would reserve a negative amount (a refill): refused before the call is sent."""
    adapter = AnthropicAdapter("claude-sonnet-4-6")
    fake_api.requests.clear()
    with anthropic.Anthropic(api_key="test", base_url=fake_api.base_url, max_retries=0) as client:
        adapter.wrap(client)

        @loop(checkpoint=db, budget=Budget(usd=1.0, iterations=1), name="neg_max")
        def step(state: dict[str, Any]) -> dict[str, Any]:
            client.messages.create(model="claude-sonnet-4-6", max_tokens=-10_000_000,
                                   messages=[{"role": "user", "content": "hi"}])
            return state

        result = step.run({})
    assert isinstance(result.error, CostError)
    assert "the most this call can cost" in str(result.error)
    assert fake_api.requests == []
    assert result.cost_usd == 0.0


# -- the scorer runs inside the step's accounting ---------------------------------------------


def test_a_scorers_charges_count_in_its_steps_cost(db: str) -> None:
    """An LLM grader charging $0.10 per score: each step costs $0.10 and the run $0.30."""

    def grade(state: dict[str, int]) -> float:
        loomc.charge(0.10)
        return float(state["n"])

    @loop(checkpoint=db, budget=Budget(iterations=3), scorer=grade, name="graded")
    def step(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    result = step.run({"n": 0})
    assert result.cost_usd == pytest.approx(0.30)
    assert [s.cost_usd for s in result.history] == pytest.approx([0.10] * 3)
    assert run_row(db, result.run_id)["cost_usd"] == pytest.approx(0.30)
    assert [s.score for s in result.history] == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_an_async_loops_scorer_is_charged_to_its_run(db: str, backend: str) -> None:
    """The async driver: the scorer's charge is in the step's cost as well."""

    def grade(state: dict[str, int]) -> float:
        loomc.charge(0.05)
        return 1.0

    @loop(checkpoint=db, budget=Budget(iterations=2), scorer=grade, name="agraded")
    async def step(state: dict[str, int]) -> dict[str, int]:
        await anyio.sleep(0)
        return state

    result = anyio.run(step.run, {}, backend=backend)
    assert [s.cost_usd for s in result.history] == pytest.approx([0.05, 0.05])
    assert result.cost_usd == pytest.approx(0.10)


def test_a_nested_runs_scorer_is_held_to_the_childs_own_cap(db: str) -> None:
    """A child's grader charges the child (its cap stops it), and the parent step's cost includes it."""
    views: list[str | None] = []

    def grade(state: dict[str, int]) -> float:
        view = loomc.current_run()
        views.append(view.name if view else None)
        loomc.charge(0.10)
        return float(state["n"])

    @loop(checkpoint=db, budget=Budget(usd=0.25, iterations=10), scorer=grade, name="child")
    def child(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    @loop(checkpoint=db, budget=Budget(iterations=1), name="parent")
    def parent(state: dict[str, Any]) -> dict[str, Any]:
        return {"child": child.run({"n": 0}).status.value}

    result = parent.run({})
    assert result.state == {"child": "budget_exhausted"}
    kid = next(r for r in SQLiteStore(db).list_runs() if r.name == "child")
    assert kid.status is RunStatus.BUDGET_EXHAUSTED
    assert kid.cost_usd == pytest.approx(0.20)
    assert result.cost_usd == pytest.approx(0.20)
    assert set(views) == {"child"}


def test_a_scorer_charge_that_would_cross_the_cap_stops_the_run_like_a_step(db: str) -> None:
    """The grader's refused charge ends the run budget_exhausted; spend stays under the cap."""

    def grade(state: dict[str, int]) -> float:
        loomc.charge(0.05 if state["n"] == 1 else 0.30)
        return 1.0

    @loop(checkpoint=db, budget=Budget(usd=0.20, iterations=10), scorer=grade, name="cap_grader")
    def step(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    result = step.run({"n": 0})
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert isinstance(result.error, BudgetExhausted)
    assert result.cost_usd == pytest.approx(0.05)
    assert result.history[-1].error is not None
    assert result.history[-1].error.startswith("BudgetExhausted")
    assert run_row(db, result.run_id)["status"] == "budget_exhausted"


def test_a_loop_started_by_a_scorer_is_a_child_of_the_step(db: str) -> None:
    """A grader that is itself a @loop runs as a child of the step it scores, charged to it."""

    @loop(checkpoint=db, budget=Budget(iterations=1), name="grader_loop")
    def grader(state: dict[str, Any]) -> dict[str, Any]:
        loomc.charge(0.07)
        return {"score": 0.5}

    @loop(checkpoint=db, budget=Budget(iterations=2), scorer=lambda s: grader.run({}).state["score"], name="scored_by_loop")
    def step(state: dict[str, int]) -> dict[str, int]:
        return state

    result = step.run({})
    assert [s.cost_usd for s in result.history] == pytest.approx([0.07, 0.07])
    kids = [r for r in SQLiteStore(db).list_runs() if r.name == "grader_loop"]
    assert len(kids) == 2
    assert {k.parent_run_id for k in kids} == {result.run_id}


def test_a_scorer_interrupted_by_ctrl_c_leaves_the_run_interrupted(db: str) -> None:
    """KeyboardInterrupt inside the scorer is handled as in the step: the run is recorded interrupted."""

    def grade(state: dict[str, int]) -> float:
        raise KeyboardInterrupt

    @loop(checkpoint=db, budget=Budget(iterations=3), scorer=grade, name="ctrl_c_grader")
    def step(state: dict[str, int]) -> dict[str, int]:
        return state

    with pytest.raises(KeyboardInterrupt):
        step.run({})
    (run,) = SQLiteStore(db).list_runs()
    assert run.status is RunStatus.INTERRUPTED
    loomc.charge(1.0)  # no step left counted in flight: a no-op outside a run


# -- threads that do not carry the step's context -----------------------------------------------


def test_a_charge_from_a_thread_pool_without_the_context_is_refused_not_dropped(db: str) -> None:
    """$4 charged from plain pool threads: the step fails with RunContextLost naming the fix."""

    @loop(checkpoint=db, budget=Budget(usd=10.0, iterations=1), name="pooled")
    def step(state: dict[str, int]) -> dict[str, int]:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: loomc.charge(1.0), range(4)))
        return state

    result = step.run({})
    assert result.status is RunStatus.FAILED
    assert isinstance(result.error, RunContextLost)
    assert "loomc.with_run_context" in str(result.error)


def test_a_reservation_from_a_plain_thread_is_refused(db: str) -> None:
    """reserve() (what the adapters call) is refused the same way in a plain threading.Thread."""
    errors: list[BaseException] = []

    def call() -> None:
        try:
            loomc.reserve(0.5)
        except BaseException as exc:  # collected for the assertion
            errors.append(exc)

    @loop(checkpoint=db, budget=Budget(usd=1.0, iterations=1), name="plain_thread")
    def step(state: dict[str, int]) -> dict[str, int]:
        t = threading.Thread(target=call)
        t.start()
        t.join()
        return state

    step.run({})
    assert len(errors) == 1
    assert isinstance(errors[0], RunContextLost)


def test_with_run_context_charges_the_steps_run_from_threads_and_pools(db: str) -> None:
    """Wrapped, the same threads charge the right run: $4 paid, $4 recorded, caps still enforced."""

    @loop(checkpoint=db, budget=Budget(usd=5.0, iterations=2), name="carried")
    def step(state: dict[str, int]) -> dict[str, int]:
        charge = loomc.with_run_context(loomc.charge)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(charge, [0.5] * 4))  # one wrapper entered by several threads at once
        threads = [threading.Thread(target=loomc.with_run_context(loomc.charge), args=(0.5,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return state

    result = step.run({})
    assert [s.cost_usd for s in result.history] == pytest.approx([4.0])
    assert result.status is RunStatus.BUDGET_EXHAUSTED  # the second step cannot afford $4 more
    assert result.cost_usd == pytest.approx(4.0)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_async_step_using_run_in_executor_is_refused_or_wrapped(db: str, anyio_backend: str) -> None:
    """asyncio's run_in_executor does not copy the context: refused bare, counted when wrapped."""

    @loop(checkpoint=db, budget=Budget(iterations=1), name="executor")
    async def step(state: dict[str, bool]) -> dict[str, bool]:
        fn = loomc.with_run_context(loomc.charge) if state["wrap"] else loomc.charge
        await asyncio.get_running_loop().run_in_executor(None, fn, 0.25)
        return state

    bare = await step.run({"wrap": False})
    assert isinstance(bare.error, RunContextLost)
    wrapped = await step.run({"wrap": True})
    assert wrapped.cost_usd == pytest.approx(0.25)


def test_outside_any_step_a_charge_stays_a_no_op_after_every_kind_of_ending(db: str) -> None:
    """Steps that fail, interrupt or have a failing scorer leave no step counted in flight."""

    @loop(checkpoint=db, budget=Budget(iterations=1), name="raises")
    def raises(state: Any) -> Any:
        raise RuntimeError("boom")

    @loop(checkpoint=db, budget=Budget(iterations=1), name="interrupted")
    def interrupted(state: Any) -> Any:
        raise KeyboardInterrupt

    @loop(checkpoint=db, budget=Budget(iterations=1), scorer=lambda s: 1 / 0, name="bad_scorer")
    def scored(state: Any) -> Any:
        return state

    raises.run({})
    with pytest.raises(KeyboardInterrupt):
        interrupted.run({})
    scored.run({})
    loomc.charge(1.0)
    loomc.reserve(1.0).settle(1.0)

    errors: list[BaseException] = []

    def outside() -> None:
        try:
            loomc.charge(1.0)
        except BaseException as exc:  # collected for the assertion
            errors.append(exc)

    t = threading.Thread(target=outside)
    t.start()
    t.join()
    assert errors == []


def test_with_run_context_refuses_what_it_cannot_carry() -> None:
    """Not a callable, or an async function (a task carries its context already): TypeError."""
    with pytest.raises(TypeError, match="callable"):
        loomc.with_run_context(3)  # type: ignore[arg-type]

    async def coro() -> None:
        return None

    with pytest.raises(TypeError, match="async"):
        loomc.with_run_context(coro)
    assert "with_run_context" in loomc.__all__


# -- a finished child is paid once, whatever the retries --------------------------------------


def test_a_retried_parent_step_pays_its_finished_child_once(db: str) -> None:
    """The child ($0.30) completes; the parent step fails twice with a transient error: $0.30, not $0.90."""
    attempts = {"n": 0}

    @loop(checkpoint=db, budget=Budget(iterations=1), converge_on=DONE, name="child30")
    def child(state: dict[str, Any]) -> dict[str, Any]:
        loomc.charge(0.30)
        return state

    @loop(checkpoint=db, budget=Budget(usd=5.0, iterations=1), retry=FAST, name="retried_parent")
    def parent(state: dict[str, Any]) -> dict[str, Any]:
        child({})
        attempts["n"] += 1
        if attempts["n"] < 3:
            raise ConnectionError("reset by peer")
        return state

    result = parent.run({})
    assert result.status is RunStatus.BUDGET_EXHAUSTED  # iterations: the step succeeded
    assert attempts["n"] == 3
    assert result.cost_usd == pytest.approx(0.30)
    assert [s.cost_usd for s in result.history] == pytest.approx([0.30])
    assert run_row(db, result.run_id)["cost_usd"] == pytest.approx(0.30)


def test_a_child_partly_run_by_an_earlier_attempt_is_carried_only_for_the_rest(db: str) -> None:
    """A child that failed mid-run in attempt 1 resumes in attempt 2: the parent pays each child step once."""
    failed = {"done": False}

    @loop(checkpoint=db, budget=Budget(iterations=3), name="flaky_child")
    def child(state: dict[str, int]) -> dict[str, int]:
        loomc.charge(0.10)
        if state["n"] == 1 and not failed["done"]:
            failed["done"] = True
            raise ConnectionError("dropped")
        return {"n": state["n"] + 1}

    @loop(checkpoint=db, budget=Budget(iterations=1), retry=FAST, name="flaky_parent")
    def parent(state: dict[str, Any]) -> dict[str, Any]:
        with pytest.raises(BudgetExhausted):  # the child ends on its own iterations cap
            child({"n": 0})
        return state

    result = parent.run({})
    kid = next(r for r in SQLiteStore(db).list_runs() if r.name == "flaky_child")
    assert kid.cost_usd == pytest.approx(0.30)  # three child steps (one failed): $0.10 each
    assert result.cost_usd == pytest.approx(kid.cost_usd)
    assert result.history[0].event is not None
    assert "retry 1" in result.history[0].event


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_an_async_retried_parent_pays_its_child_once(db: str, backend: str) -> None:
    """The same in the async driver, on asyncio and trio."""
    attempts = {"n": 0}

    @loop(checkpoint=db, budget=Budget(iterations=1), converge_on=DONE, name="achild")
    async def child(state: dict[str, Any]) -> dict[str, Any]:
        loomc.charge(0.30)
        return state

    @loop(checkpoint=db, budget=Budget(iterations=1), retry=FAST, name="aparent")
    async def parent(state: dict[str, Any]) -> dict[str, Any]:
        await child({})
        attempts["n"] += 1
        if attempts["n"] < 3:
            raise TimeoutError("slow")
        return state

    result = anyio.run(parent.run, {}, backend=backend)
    assert attempts["n"] == 3
    assert result.cost_usd == pytest.approx(0.30)


def test_a_graph_node_retrying_a_step_pays_its_child_once(db: str) -> None:
    """A node whose retried step starts a child: the graph's total is the child's cost, once."""
    attempts = {"n": 0}

    @loop(budget=Budget(iterations=1), converge_on=DONE, name="gchild")
    def gchild(state: Any) -> Any:
        loomc.charge(0.30)
        return state

    @loop(budget=Budget(iterations=1), retry=FAST, converge_on=DONE, name="gnode")
    def gnode(state: Any) -> Any:
        gchild(state)
        attempts["n"] += 1
        if attempts["n"] < 2:
            raise ConnectionError("reset")
        return state

    graph = Graph("retry-child", budget=Budget(usd=1.0), checkpoint=db)
    graph.add(gnode)
    result = graph.run({"x": 1})
    assert result.status is RunStatus.COMPLETED
    assert result.cost_usd == pytest.approx(0.30)
    assert result.nodes["gnode"].cost_usd == pytest.approx(0.30)
    assert run_row(db, result.run_id)["cost_usd"] == pytest.approx(0.30)


def test_a_finished_child_is_still_carried_when_its_parent_is_resumed(db: str) -> None:
    """Interrupted after its child finished, the parent is resumed: the child's cost is counted once, not lost."""
    interrupt = {"once": True}

    @loop(checkpoint=db, budget=Budget(iterations=1), converge_on=DONE, name="rchild")
    def child(state: dict[str, Any]) -> dict[str, Any]:
        loomc.charge(0.30)
        return state

    @loop(checkpoint=db, budget=Budget(usd=1.0, iterations=1), retry=FAST, name="rparent")
    def parent(state: dict[str, Any]) -> dict[str, Any]:
        child({})
        if interrupt["once"]:
            interrupt["once"] = False
            raise KeyboardInterrupt
        return state

    with pytest.raises(KeyboardInterrupt):
        parent.run({})
    (run,) = [r for r in SQLiteStore(db).list_runs() if r.name == "rparent"]
    result = parent.resume_run(run.id)
    assert result.cost_usd == pytest.approx(0.30)
    assert [s.cost_usd for s in result.history] == pytest.approx([0.30])

