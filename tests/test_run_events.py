"""Run events: @loop(on_step=), fn.stream / fn.astream and Graph.stream / Graph.astream."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import anyio
import pytest

from loomc import (
    BestScore,
    Budget,
    EventCallbackWarning,
    RunEvent,
    RunFinished,
    RunStarted,
    RunStatus,
    SQLiteStore,
    StepCommitted,
    loop,
)
from orchestration import Graph


def _shape(events: list[RunEvent]) -> list[tuple[str, str, Any]]:
    """(event type, run name, step / status) of each event."""
    out: list[tuple[str, str, Any]] = []
    for e in events:
        if isinstance(e, RunStarted):
            out.append(("started", e.name, e.step))
        elif isinstance(e, StepCommitted):
            out.append(("step", e.name, e.record.step_n))
        else:
            out.append(("finished", e.name, e.status.value))
    return out


def _counter(db: str, steps: int = 3, **kw: Any) -> Any:
    @loop(budget=Budget(iterations=steps), checkpoint=db, name="count", scorer=lambda s: float(s["n"]), **kw)
    def count(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    return count


def test_stream_yields_started_each_step_and_finished(db: str) -> None:
    """A plain run: started, one StepCommitted per step (its StepRecord), finished with status and reason."""
    count = _counter(db)
    events = list(count.stream({"n": 0}))
    assert _shape(events) == [("started", "count", 0), ("step", "count", 0), ("step", "count", 1), ("step", "count", 2),
                              ("finished", "count", "budget_exhausted")]
    started, *steps, finished = events
    assert isinstance(started, RunStarted)
    assert not started.resumed
    assert started.parent_run_id is None
    assert [s.record.state for s in steps] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert [s.record.score for s in steps] == [1.0, 2.0, 3.0]
    assert all(s.run_id == started.run_id for s in steps)
    assert isinstance(finished, RunFinished)
    assert finished.reason == "budget: iterations"
    assert finished.steps == 3


def test_stream_returns_the_run_result(db: str) -> None:
    """`yield from fn.stream(...)` gives the RunResult, the same run the events name."""
    count = _counter(db, steps=2)

    seen: list[RunEvent] = []

    def consume() -> Any:
        result = yield from count.stream({"n": 0})
        seen.append(result)
        return result

    events = list(consume())
    (result,) = seen
    assert result.run_id == events[0].run_id
    assert result.state == {"n": 2}
    assert len(events) == 4


def test_step_events_carry_cost_and_backtrack(db: str) -> None:
    """A StepCommitted's record has the step's cost and its events (a backtrack), and the run's total."""
    scores = iter([5.0, 1.0, 6.0])

    @loop(budget=Budget(iterations=3), checkpoint=db, scorer=lambda s: next(scores), backtrack=BestScore(),
          cost_fn=lambda s: 0.25)
    def walk(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    steps = [e for e in walk.stream({"n": 0}) if isinstance(e, StepCommitted)]
    assert [s.record.cost_usd for s in steps] == [0.25, 0.25, 0.25]
    assert [s.cost_usd for s in steps] == [0.25, 0.5, 0.75]
    assert steps[1].record.events == [{"kind": "backtrack", "to": 0}]


def test_a_resumed_run_tells_the_same_events(db: str) -> None:
    """Resuming: started (resumed, at the next step), the remaining steps, finished."""
    count = _counter(db, steps=2)
    first = count.run({"n": 0})
    events = list(count.stream_resume(first.run_id, budget=Budget(iterations=4)))
    assert _shape(events) == [("started", "count", 2), ("step", "count", 2), ("step", "count", 3),
                              ("finished", "count", "budget_exhausted")]
    assert events[0].resumed
    assert events[0].run_id == first.run_id


def test_resuming_a_completed_run_tells_start_and_finish(db: str) -> None:
    """A completed run resumed runs no step: started and finished, status completed."""

    @loop(budget=Budget(iterations=5), checkpoint=db, converge_on=lambda h: len(h) >= 1, name="once")
    def once(state: dict[str, int]) -> dict[str, int]:
        return {"n": 1}

    run_id = once.run({"n": 0}).run_id
    assert _shape(list(once.stream_resume(run_id))) == [("started", "once", 1), ("finished", "once", "completed")]


def test_nested_runs_carry_their_parent(db: str) -> None:
    """Events of a loop nested in a step come before that step's own, naming the parent run."""

    @loop(budget=Budget(iterations=2), checkpoint=db, name="inner")
    def inner(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    @loop(budget=Budget(iterations=1), checkpoint=db, name="outer")
    def outer(state: dict[str, int]) -> dict[str, int]:
        return inner.run(state).state  # type: ignore[no-any-return]

    events = list(outer.stream({"n": 0}))
    assert _shape(events) == [
        ("started", "outer", 0),
        ("started", "inner", 0), ("step", "inner", 0), ("step", "inner", 1), ("finished", "inner", "budget_exhausted"),
        ("step", "outer", 0), ("finished", "outer", "budget_exhausted"),
    ]
    outer_id = events[0].run_id
    assert {e.parent_run_id for e in events if e.name == "inner"} == {outer_id}
    assert {e.parent_run_id for e in events if e.name == "outer"} == {None}


def test_on_step_sees_the_run_and_its_nested_runs(db: str) -> None:
    """@loop(on_step=) is called for each event of its runs, nested runs' included."""
    seen: list[RunEvent] = []

    @loop(budget=Budget(iterations=1), checkpoint=db, name="inner")
    def inner(state: dict[str, int]) -> dict[str, int]:
        return state

    @loop(budget=Budget(iterations=1), checkpoint=db, name="outer", on_step=seen.append)
    def outer(state: dict[str, int]) -> dict[str, int]:
        inner.run(state)
        return state

    outer.run({"n": 0})
    assert [n for _, n, _ in _shape(seen)] == ["outer", "inner", "inner", "inner", "outer", "outer"]


def test_a_failing_callback_is_reported_once_and_the_run_goes_on(db: str) -> None:
    """A callback that raises on every event: one EventCallbackWarning naming it; the run completes its steps."""
    calls: list[RunEvent] = []

    def broken_callback(event: RunEvent) -> None:
        calls.append(event)
        raise RuntimeError("display is gone")

    count = _counter(db, steps=3, on_step=broken_callback)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = count.run({"n": 0})
    assert result.steps == 3
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert len(calls) == 5  # still called for every event
    reported = [w for w in caught if issubclass(w.category, EventCallbackWarning)]
    assert len(reported) == 1
    assert "broken_callback" in str(reported[0].message)
    assert "display is gone" in str(reported[0].message)


def test_on_step_must_be_callable() -> None:
    """A non-callable on_step is refused when the loop is declared."""
    with pytest.raises(TypeError, match="on_step"):
        loop(budget=Budget(iterations=1), on_step=42)  # type: ignore[arg-type]


def test_a_stream_closed_early_leaves_the_run_interrupted_and_resumable(db: str) -> None:
    """Closing the stream after the first step: the run is interrupted, and resumes from step 1."""
    count = _counter(db, steps=4)
    with contextlib.closing(count.stream({"n": 0})) as events:
        for event in events:
            if isinstance(event, StepCommitted):
                run_id = event.run_id
                break
    info = SQLiteStore(db).get_run(run_id)
    assert info is not None
    assert info.status is RunStatus.INTERRUPTED
    assert info.steps == 1
    assert "StreamClosed" in (info.stop_reason or "")
    rest = list(count.stream_resume(run_id))
    assert _shape(rest)[0] == ("started", "count", 1)
    assert rest[-1].status is RunStatus.BUDGET_EXHAUSTED
    assert rest[-1].steps == 4


# -- async ---------------------------------------------------------------------------------


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _acounter(db: str, steps: int = 3) -> Any:
    @loop(budget=Budget(iterations=steps), checkpoint=db, name="acount")
    async def acount(state: dict[str, int]) -> dict[str, int]:
        await anyio.sleep(0)
        return {"n": state["n"] + 1}

    return acount


@pytest.mark.anyio
async def test_astream_yields_the_same_events(db: str) -> None:
    """async for over fn.astream: started, each step, finished."""
    events = [e async for e in _acounter(db).astream({"n": 0})]
    assert _shape(events) == [("started", "acount", 0), ("step", "acount", 0), ("step", "acount", 1),
                              ("step", "acount", 2), ("finished", "acount", "budget_exhausted")]


@pytest.mark.anyio
async def test_astream_left_early_leaves_the_run_interrupted_and_resumable(db: str) -> None:
    """Breaking out of astream (closed by aclosing): interrupted; astream_resume continues it."""
    acount = _acounter(db, steps=4)
    async with contextlib.aclosing(acount.astream({"n": 0})) as events:
        async for event in events:
            if isinstance(event, StepCommitted) and event.record.step_n == 1:
                run_id = event.run_id
                break
    info = SQLiteStore(db).get_run(run_id)
    assert info is not None
    assert info.status is RunStatus.INTERRUPTED
    assert info.steps == 2
    rest = [e async for e in acount.astream_resume(run_id)]
    assert _shape(rest) == [("started", "acount", 2), ("step", "acount", 2), ("step", "acount", 3),
                            ("finished", "acount", "budget_exhausted")]


@pytest.mark.anyio
async def test_astream_cancelled_leaves_the_run_interrupted(db: str) -> None:
    """The task iterating astream is cancelled mid-step: the run is interrupted, resumable."""
    started = anyio.Event()

    @loop(budget=Budget(iterations=3), checkpoint=db, name="slow")
    async def slow(state: dict[str, int]) -> dict[str, int]:
        if state["n"] == 1:
            started.set()
            await anyio.sleep_forever()
        return {"n": state["n"] + 1}

    seen: list[RunEvent] = []

    async def consume() -> None:
        async for event in slow.astream({"n": 0}):
            seen.append(event)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await started.wait()
        tg.cancel_scope.cancel()
    run_id = seen[0].run_id
    info = SQLiteStore(db).get_run(run_id)
    assert info is not None
    assert info.status is RunStatus.INTERRUPTED
    assert info.steps == 1
    assert _shape(seen) == [("started", "slow", 0), ("step", "slow", 0)]


# -- graphs --------------------------------------------------------------------------------


def _graph(db: str) -> Graph:
    @loop(budget=Budget(iterations=1), checkpoint=db, name="child")
    def child(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    @loop(budget=Budget(iterations=1), name="first")
    def first(state: dict[str, int]) -> dict[str, int]:
        return child.run(state).state  # type: ignore[no-any-return]

    @loop(budget=Budget(iterations=1), name="second")
    async def second(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] * 10}

    g = Graph("pipe", checkpoint=db)
    g.add(first)
    g.add(second, after=first)
    return g


_GRAPH_SHAPE = [
    ("started", "pipe", 0),
    ("started", "first", 0), ("started", "child", 0), ("step", "child", 0), ("finished", "child", "budget_exhausted"),
    ("step", "first", 0), ("finished", "first", "budget_exhausted"),
    ("started", "second", 0), ("step", "second", 0), ("finished", "second", "budget_exhausted"),
    ("finished", "pipe", "completed"),
]


def _check_graph(events: list[RunEvent]) -> None:
    assert _shape(events) == _GRAPH_SHAPE
    graph_id = events[0].run_id
    assert events[0].kind == "graph"
    by_name = {e.name: e for e in events if isinstance(e, RunStarted)}
    assert by_name["first"].parent_run_id == graph_id
    assert by_name["first"].kind == "node"
    assert by_name["child"].parent_run_id == by_name["first"].run_id
    assert by_name["child"].kind == "loop"


def test_graph_stream_tells_graph_node_and_nested_events(db: str) -> None:
    """Graph.stream: the graph starts, each node run (with its nested loop) tells its events, the graph finishes."""
    gen = _graph(db).stream({"n": 1})
    events: list[RunEvent] = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    _check_graph(events)
    assert result.outputs["second"] == {"n": 20}


def test_graph_on_step(db: str) -> None:
    """Graph(on_step=) sees the same events as Graph.stream."""
    seen: list[RunEvent] = []
    g = _graph(db)
    g.on_step = seen.append
    g.run({"n": 1})
    _check_graph(seen)


@pytest.mark.anyio
async def test_graph_astream(db: str) -> None:
    """Graph.astream tells the same events on asyncio and trio."""
    async with contextlib.aclosing(_graph(db).astream({"n": 1})) as stream:
        events = [e async for e in stream]
    _check_graph(events)


def test_graph_stream_closed_early_interrupts_the_graph(db: str) -> None:
    """Closing Graph.stream once the first node started: the graph run is interrupted (resumable)."""

    @loop(budget=Budget(iterations=100), checkpoint=db, name="long")
    def long(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    g = Graph("long-graph", checkpoint=db)
    g.add(long)
    with contextlib.closing(g.stream({"n": 0})) as events:
        for event in events:
            if isinstance(event, StepCommitted):
                graph_id = event.parent_run_id
                break
    assert graph_id is not None
    info = SQLiteStore(db).get_run(graph_id)
    assert info is not None
    assert info.status is RunStatus.INTERRUPTED
    assert g.resume(graph_id).nodes["long"].steps == 100
