"""Code written against loomc 0.3.0's public API runs unchanged: its names, module paths, store methods and behaviours."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import anyio
import pytest

import loomc
from loomc import Budget, BudgetExhausted, StallError, StepRecord
from loomc.checkpoint import RunStatus, SQLiteCheckpointStore

# -- names and where they live ------------------------------------------------------------

ZERO_THREE_NAMES = [
    ("loomc", "loop"),
    ("loomc", "Budget"),
    ("loomc", "BudgetExhausted"),
    ("loomc", "BestScore"),
    ("loomc", "LastGood"),
    ("loomc", "Escalate"),
    ("loomc", "StallError"),
    ("loomc", "LoomcError"),
    ("loomc", "score_plateau"),
    ("loomc", "predicate"),
    ("loomc", "semantic_delta"),
    ("loomc", "judge"),
    ("loomc", "JudgeDetector"),
    ("loomc", "RunStatus"),
    ("loomc", "StepRecord"),
    ("loomc", "RunInfo"),
    ("loomc", "CheckpointStore"),
    ("loomc", "circuit_breaker"),
    ("loomc", "CircuitBreaker"),
    ("loomc", "CircuitOpenError"),
    ("loomc", "AnthropicAdapter"),
    ("loomc", "OpenAIAdapter"),
    ("loomc._core.types", "StepRecord"),
    ("loomc.checkpoint", "SQLiteCheckpointStore"),
    ("loomc.checkpoint", "RunStatus"),
    ("loomc.checkpoint", "StepRecord"),
    ("loomc.budget", "Budget"),
    ("loomc.budget", "BudgetExhausted"),
    ("loomc.budget", "BudgetLedger"),
    ("loomc.budget", "_parse_duration"),
    ("loomc.convergence", "score_plateau"),
    ("loomc.convergence", "predicate"),
    ("loomc.convergence", "semantic_delta"),
    ("loomc.convergence", "judge"),
    ("loomc.backtrack", "BestScore"),
    ("loomc.backtrack", "LastGood"),
    ("loomc.loop", "_parent_ledger"),
    ("loomc.loop", "Escalate"),
    ("loomc.loop", "StallError"),
    ("loomc.adapters", "AnthropicAdapter"),
    ("loomc.adapters", "OpenAIAdapter"),
    ("loomc.circuit_breaker", "circuit_breaker"),
    ("loomc.circuit_breaker", "CircuitBreaker"),
    ("loomc.circuit_breaker", "BreakerState"),
    ("loomc.circuit_breaker", "CircuitOpenError"),
    ("loomc.circuit_breaker", "LoomcError"),
]


@pytest.mark.parametrize(("module", "name"), ZERO_THREE_NAMES, ids=[f"{m}.{n}" for m, n in ZERO_THREE_NAMES])
def test_a_030_name_imports_from_its_030_path(module: str, name: str) -> None:
    """``from <module> import <name>`` works, and a name exported twice is one object."""
    value = getattr(importlib.import_module(module), name)
    if not name.startswith("_") and module not in ("loomc", "loomc.loop") and name in loomc.__all__:
        assert value is getattr(loomc, name)


def test_the_030_aliases_are_the_current_objects() -> None:
    """``SQLiteCheckpointStore`` is ``SQLiteStore``; ``RunStatus`` is a str enum with 0.3.0's values."""
    assert SQLiteCheckpointStore is loomc.SQLiteStore
    assert RunStatus is loomc.RunStatus
    assert issubclass(RunStatus, str)
    assert {"running", "completed", "budget_exhausted", "stalled", "failed"} <= {s.value for s in RunStatus}
    assert RunStatus.COMPLETED == "completed"


# -- budgets ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30.0), ("10m", 600.0), ("1h", 3600.0), ("90", 90.0)])
def test_durations_parse_as_in_030(text: str, seconds: float) -> None:
    """``_parse_duration`` and ``Budget.wall_clock_seconds`` read 0.3.0's duration strings."""
    from loomc.budget import _parse_duration

    assert _parse_duration(text) == seconds
    assert Budget(wall_clock=text).wall_clock_seconds == seconds


def test_a_budget_without_a_wall_clock_has_none() -> None:
    """No wall clock: ``wall_clock_seconds`` is None; a bad string is a ValueError when parsed."""
    from loomc.budget import _parse_duration

    assert Budget(usd=1.0).wall_clock_seconds is None
    with pytest.raises(ValueError, match="10x"):
        _parse_duration("10x")


def test_budget_ledger_counts_and_refuses() -> None:
    """``BudgetLedger``: ``record`` counts, ``check_pre`` names the limit it hits, ``remaining`` subtracts."""
    from loomc.budget import BudgetLedger

    by_count, by_money = BudgetLedger(), BudgetLedger()
    three, one_dollar = Budget(iterations=3), Budget(usd=1.0, iterations=10)
    for _ in range(3):
        by_count.check_pre(three)
        by_count.record(0.0)
    with pytest.raises(BudgetExhausted, match="iterations") as stopped:
        by_count.check_pre(three)
    assert stopped.value.max_val == 3
    by_money.record(0.25)
    by_money.record(0.5)
    by_money.check_pre(one_dollar)
    left = by_money.remaining(one_dollar)
    assert (left.usd, left.iterations) == (pytest.approx(0.25), 8)
    by_money.record(0.25)
    with pytest.raises(BudgetExhausted, match="usd"):
        by_money.check_pre(one_dollar)


# -- the store API ------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """0.3.0's store API, on a SQLite file (built with 0.3.0's ``db_path=`` keyword) and in memory."""
    if request.param == "sqlite":
        return SQLiteCheckpointStore(db_path=tmp_path / "compat.db")
    return loomc.MemoryStore()


def test_create_get_and_update_a_run(store: Any) -> None:
    """``create_run(spec_hash)`` returns an id ``get_run`` finds (running); ``update_run_status`` changes it."""
    run_id = store.create_run("spec-1")
    assert re.fullmatch(r"[0-9a-f]{12}", run_id)
    info = store.get_run(run_id)
    assert (info.id, info.spec_hash, info.status) == (run_id, "spec-1", RunStatus.RUNNING)
    store.update_run_status(run_id, RunStatus.STALLED)
    assert store.get_run(run_id).status == "stalled"
    assert store.get_run("0123456789ab") is None
    assert store.get_run("no-such-run") is None


def test_steps_saved_one_by_one_load_back_in_order(store: Any) -> None:
    """``save_step(run_id, StepRecord)`` then ``load_steps`` gives every field back, ordered by step."""
    run_id = store.create_run("spec-2")
    states = [{"code": "print('hi')", "n": n, "nested": {"ok": n % 2 == 0}} for n in range(4)]
    for n in (2, 0, 3, 1):
        store.save_step(run_id, StepRecord(step_n=n, state=states[n], cost_usd=0.01 * n, score=n / 10,
                                           error="ValueError: x" if n == 3 else None))
    loaded = store.load_steps(run_id)
    assert [s.step_n for s in loaded] == [0, 1, 2, 3]
    assert [s.state for s in loaded] == states
    assert [s.cost_usd for s in loaded] == [pytest.approx(0.01 * n) for n in range(4)]
    assert [s.score for s in loaded] == [0.0, 0.1, 0.2, 0.3]
    assert loaded[3].error == "ValueError: x"
    assert store.load_steps(store.create_run("spec-3")) == []


def test_list_runs_returns_every_run(store: Any) -> None:
    """``list_runs()`` with no argument lists all runs, each with its spec hash."""
    ids = {store.create_run(f"spec-{n}"): f"spec-{n}" for n in range(3)}
    assert {r.id: r.spec_hash for r in store.list_runs()} == ids


def test_a_sqlite_store_keeps_its_path_and_its_data(tmp_path: Path) -> None:
    """``store.db_path`` is the file; a second store opened on it reads what the first wrote."""
    path = tmp_path / "sub" / "compat.db"
    first = SQLiteCheckpointStore(db_path=path)
    run_id = first.create_run("spec")
    first.save_step(run_id, StepRecord(step_n=0, state={"a": 1}, cost_usd=0.5))
    first.update_run_status(run_id, RunStatus.COMPLETED)
    assert Path(first.db_path) == path
    second = SQLiteCheckpointStore(db_path=str(path))
    assert second.get_run(run_id).status == RunStatus.COMPLETED
    assert [s.state for s in second.load_steps(run_id)] == [{"a": 1}]


# -- detectors and strategies ---------------------------------------------------------------


def history(*scores: float | None) -> list[StepRecord]:
    """Steps with these scores."""
    return [StepRecord(step_n=n, state={"n": n}, score=s) for n, s in enumerate(scores)]


@pytest.mark.parametrize(
    ("patience", "scores", "stops"),
    [
        (3, [0.5, 0.7, 0.8, 0.8, 0.8, 0.8], True),
        (3, [0.1, 0.3, 0.5, 0.7], False),
        (3, [0.5, 0.5], False),
        (2, [0.5, 0.8, 0.8, 0.8], True),
        (2, [0.5, 0.8, 0.805, 0.809], True),  # gains under min_delta do not count
    ],
)
def test_score_plateau_should_stop(patience: int, scores: list[float], stops: bool) -> None:
    """0.3.0's ``detector.should_stop(history)`` on ``score_plateau``."""
    from loomc.convergence import score_plateau

    assert score_plateau(patience=patience, min_delta=0.01).should_stop(history(*scores)) is stops


def test_predicate_should_stop() -> None:
    """``predicate(fn).should_stop(history)`` is ``fn(history)`` as a bool."""
    from loomc.convergence import predicate

    three = predicate(lambda h: len(h) >= 3)
    assert [three.should_stop(history(*[0.0] * n)) for n in range(5)] == [False, False, False, True, True]


def test_strategies_answer_should_backtrack() -> None:
    """``BestScore``/``LastGood``.should_backtrack give 0.3.0's ``(go back?, step)`` pairs."""
    from loomc.backtrack import BestScore, LastGood

    assert BestScore().should_backtrack(history(0.3, 0.9, 0.4)) == (True, 1)
    assert BestScore().should_backtrack(history(0.3, 0.9, 0.95)) == (False, None)
    failed = history(0.3, 0.5, None)
    failed[-1].error = "RuntimeError: boom"
    assert LastGood().should_backtrack(failed) == (True, 1)


def test_a_030_style_detector_and_strategy_object_plug_into_loop(tmp_path: Path) -> None:
    """Objects with only ``should_stop`` / ``should_backtrack`` (0.3.0's duck types) drive a loop."""

    class StopAtFour:
        def should_stop(self, h: list[StepRecord]) -> bool:
            return len(h) >= 4

    class BackToZero:
        def should_backtrack(self, h: list[StepRecord]) -> tuple[bool, int | None]:
            return (len(h) == 2, 0)

    starts: list[int] = []

    @loomc.loop(budget=Budget(iterations=10), checkpoint=str(tmp_path / "duck.db"), converge_on=StopAtFour(), backtrack=BackToZero())
    def count(state: dict[str, int]) -> dict[str, int]:
        starts.append(state["n"])
        return {"n": state["n"] + 1}

    assert count({"n": 0}) == {"n": 3}
    assert starts == [0, 1, 1, 2]  # step 2 started again from step 0's state


# -- loops ----------------------------------------------------------------------------------


def test_an_iteration_cap_raises_budget_exhausted(tmp_path: Path) -> None:
    """Calling a capped loop raises ``BudgetExhausted`` naming ``iterations``, after exactly that many steps."""
    store = SQLiteCheckpointStore(db_path=tmp_path / "cap.db")

    @loomc.loop(budget=Budget(iterations=5), checkpoint=store)
    def increment(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    with pytest.raises(BudgetExhausted, match="iterations") as stopped:
        increment({"n": 0})
    assert stopped.value.state == {"n": 5}
    (run,) = store.list_runs()
    assert run.status == RunStatus.BUDGET_EXHAUSTED
    assert len(store.load_steps(run.id)) == 5


def test_a_plateau_stops_the_loop_and_best_score_goes_back(tmp_path: Path) -> None:
    """``scorer`` + ``score_plateau`` stop early; ``BestScore`` starts from the best state after a regression."""
    scores = iter([0.3, 0.6, 0.9, 0.4, 0.9, 0.9, 0.9])
    starts: list[float] = []

    @loomc.loop(budget=Budget(iterations=20), checkpoint=str(tmp_path / "best.db"), scorer=lambda s: s["score"],
                converge_on=loomc.score_plateau(patience=3, min_delta=0.01), backtrack=loomc.BestScore())
    def improve(state: dict[str, float]) -> dict[str, float]:
        starts.append(state["score"])
        return {"score": next(scores)}

    assert improve({"score": 0.0}) == {"score": 0.9}
    assert starts[:5] == [0.0, 0.3, 0.6, 0.9, 0.9]  # after the 0.4 the next step started from the 0.9


def test_a_crashed_run_resumes_where_it_stopped(tmp_path: Path) -> None:
    """``fn.resume(run_id)`` after the step raised goes on from the last checkpoint, numbering carried over."""
    store = SQLiteCheckpointStore(db_path=tmp_path / "resume.db")
    broken = {"on": True}

    @loomc.loop(budget=Budget(iterations=10), checkpoint=store, scorer=lambda s: s["val"],
                converge_on=loomc.predicate(lambda h: bool(h) and (h[-1].score or 0) >= 5))
    def climb(state: dict[str, int]) -> dict[str, int]:
        if broken["on"] and state["val"] == 2:
            raise RuntimeError("simulated crash")
        return {"val": state["val"] + 1}

    with pytest.raises(RuntimeError, match="simulated crash"):
        climb({"val": 0})
    (run,) = store.list_runs()
    assert run.status == RunStatus.FAILED
    broken["on"] = False
    assert climb.resume(run.id) == {"val": 5}
    steps = store.load_steps(run.id)
    assert [s.step_n for s in steps] == list(range(len(steps)))
    assert [s.state["val"] for s in steps if s.error is None] == [1, 2, 3, 4, 5]


def test_a_stall_raises_stall_error(tmp_path: Path) -> None:
    """``on_stall=Escalate(after=3)``: three steps without a better score raise ``StallError``."""
    calls: list[int] = []

    @loomc.loop(budget=Budget(iterations=20), checkpoint=str(tmp_path / "stall.db"), scorer=lambda s: s["score"],
                on_stall=loomc.Escalate(after=3))
    def stuck(state: dict[str, float]) -> dict[str, float]:
        calls.append(1)
        return {"score": 0.5}

    with pytest.raises(StallError):
        stuck({"score": 0.0})
    assert len(calls) < 20


def test_a_step_record_answers_to_its_030_event_name() -> None:
    """``StepRecord(breaker_event=...)`` and ``.breaker_event`` are 0.3.0's names of ``event``."""
    rec = StepRecord(step_n=0, state={}, breaker_event="breaker x: closed -> open")
    assert rec.event == rec.breaker_event == "breaker x: closed -> open"


def test_nested_costs_reach_the_parent_ledger(tmp_path: Path) -> None:
    """Inside a step, ``loomc.loop._parent_ledger`` holds the run's ledger, children's costs included; outside, None."""
    from loomc.loop import _parent_ledger

    db = str(tmp_path / "nested.db")
    seen: list[float] = []

    @loomc.loop(budget=Budget(iterations=2), checkpoint=SQLiteCheckpointStore(db_path=db), cost_fn=lambda s: 0.10)
    def inner(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    @loomc.loop(budget=Budget(iterations=1), checkpoint=SQLiteCheckpointStore(db_path=db), cost_fn=lambda s: 0.01)
    def outer(state: dict[str, int]) -> dict[str, int]:
        with pytest.raises(BudgetExhausted):
            inner({"n": 0})
        ledger = _parent_ledger.get()
        assert ledger is not None
        seen.append(ledger.total_cost_usd)
        return state

    with pytest.raises(BudgetExhausted):
        outer({"n": 0})
    assert seen == [pytest.approx(0.20)]
    assert _parent_ledger.get() is None


# -- async loops, on asyncio and trio ---------------------------------------------------------


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """0.3.0's async loops run on asyncio, and on trio too."""
    return str(request.param)


@pytest.mark.anyio
async def test_an_async_loop_is_awaited_and_checkpointed(tmp_path: Path) -> None:
    """``await fn(state)`` runs an ``async def`` step to convergence; ``load_steps`` sees each step."""
    store = SQLiteCheckpointStore(db_path=tmp_path / "async.db")

    @loomc.loop(budget=Budget(iterations=10), checkpoint=store, converge_on=loomc.predicate(lambda h: len(h) >= 3))
    async def counted(state: dict[str, int]) -> dict[str, int]:
        await anyio.sleep(0)
        return {"n": state["n"] + 1}

    assert await counted({"n": 0}) == {"n": 3}
    (run,) = store.list_runs()
    assert [s.state for s in store.load_steps(run.id)] == [{"n": 1}, {"n": 2}, {"n": 3}]


@pytest.mark.anyio
async def test_an_async_loop_hits_its_cap_and_resumes(tmp_path: Path) -> None:
    """An async loop raises ``BudgetExhausted``; ``await fn.resume(run_id, budget=...)`` goes on from there."""
    store = SQLiteCheckpointStore(db_path=tmp_path / "async-resume.db")

    @loomc.loop(budget=Budget(iterations=2), checkpoint=store)
    async def increment(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    with pytest.raises(BudgetExhausted, match="iterations"):
        await increment({"n": 0})
    (run,) = store.list_runs()
    with pytest.raises(BudgetExhausted):
        await increment.resume(run.id, budget=Budget(iterations=5))
    assert [s.state["n"] for s in store.load_steps(run.id)] == [1, 2, 3, 4, 5]
