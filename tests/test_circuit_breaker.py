"""Circuit breakers: the pure transitions, the wrapper (sync, async, threads), and the status kept with a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loomc import Budget, LastGood, RunStatus, loop
from loomc.circuit_breaker import (
    BreakerPolicy,
    BreakerState,
    BreakerStatus,
    CircuitBreaker,
    CircuitOpenError,
    LoomcError,
    admit,
    circuit_breaker,
    settle,
)
from loomc.store.sqlite.sync import SQLiteStore

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class ToolDown(Exception):
    """What a tool under test raises when it is down."""


class Tool:
    """A tool that is down for its first ``failures`` calls, then answers ``"ok"``."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0
        self.__name__ = "tool"

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise ToolDown(f"down (call {self.calls})")
        return "ok"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def trip(cb: CircuitBreaker[..., Any], times: int) -> None:
    """Make ``times`` calls that fail."""
    for _ in range(times):
        with pytest.raises(ToolDown):
            cb()


# -- the pure transitions ---------------------------------------------------------------

POLICY = BreakerPolicy(fail_threshold=3, cooldown=10.0)


def test_closed_admits_and_success_changes_nothing() -> None:
    """A closed breaker admits every call; a success on a clean status returns the very same status."""
    status = BreakerStatus(cooldown=10.0)
    assert admit(status, now=0.0) == (status, None)
    assert settle(status, failed=False, policy=POLICY, now=0.0) is status


@pytest.mark.parametrize("threshold", [1, 2, 5])
def test_the_threshold_th_failure_in_a_row_opens(threshold: int) -> None:
    """Failures below the threshold only count; the threshold-th opens at that instant."""
    policy = BreakerPolicy(fail_threshold=threshold, cooldown=10.0)
    status = BreakerStatus(cooldown=10.0)
    for n in range(1, threshold):
        status = settle(status, failed=True, policy=policy, now=float(n))
        assert (status.state, status.consecutive_failures) == (CLOSED, n)
    status = settle(status, failed=True, policy=policy, now=42.0)
    assert status == BreakerStatus(OPEN, threshold, 0, 10.0, 42.0)


def test_a_success_between_failures_starts_the_count_again() -> None:
    """Only failures in a row count."""
    status = BreakerStatus(cooldown=10.0)
    for failed in (True, True, False, True, True):
        status = settle(status, failed=failed, policy=POLICY, now=0.0)
    assert (status.state, status.consecutive_failures) == (CLOSED, 2)


def test_open_refuses_until_the_cooldown_is_over_then_admits_one_trial() -> None:
    """Refusals say how long is left; at the end of the cooldown the call goes as a half-open trial."""
    status = BreakerStatus(OPEN, 3, 0, 10.0, 100.0)
    assert admit(status, now=100.0) == (status, 10.0)
    assert admit(status, now=107.5) == (status, 2.5)
    trial, wait = admit(status, now=110.0)
    assert wait is None
    assert trial == BreakerStatus(HALF_OPEN, 3, 0, 10.0, 100.0)
    assert admit(trial, now=111.0) == (trial, 0.0)  # a second call while the trial is in flight


def test_a_successful_trial_closes_and_clears_everything() -> None:
    """Counters, failed trials and a grown cooldown all go back to the start."""
    trial = BreakerStatus(HALF_OPEN, 7, 3, 80.0, 100.0)
    assert settle(trial, failed=False, policy=POLICY, now=200.0) == BreakerStatus(cooldown=10.0)


@pytest.mark.parametrize(
    ("policy", "cooldowns"),
    [
        (BreakerPolicy(fail_threshold=1, cooldown=10.0), [10.0, 10.0, 10.0, 10.0]),
        (BreakerPolicy(fail_threshold=1, cooldown=10.0, backoff="exponential"), [20.0, 40.0, 80.0, 160.0]),
        (BreakerPolicy(fail_threshold=1, cooldown=10.0, backoff="exponential", max_cooldown=50.0), [20.0, 40.0, 50.0, 50.0]),
    ],
    ids=["fixed", "exponential", "exponential-bounded"],
)
def test_each_failed_trial_reopens_with_the_next_cooldown(policy: BreakerPolicy, cooldowns: list[float]) -> None:
    """Fixed keeps the cooldown; exponential doubles it per failed trial, up to max_cooldown."""
    status, now, seen = settle(BreakerStatus(cooldown=10.0), failed=True, policy=policy, now=0.0), 0.0, []
    for _ in cooldowns:
        now += status.cooldown
        status, wait = admit(status, now=now)
        assert wait is None
        status = settle(status, failed=True, policy=policy, now=now)
        assert (status.state, status.opened_at) == (OPEN, now)
        seen.append(status.cooldown)
    assert seen == cooldowns
    assert status.failed_trials == len(cooldowns)


def test_an_exponential_cooldown_never_overflows() -> None:
    """Thousands of failed trials with no bound give a huge but finite cooldown, not an OverflowError."""
    policy = BreakerPolicy(cooldown=30.0, backoff="exponential")
    assert 1e300 < policy.cooldown_after(5000) < float("inf")


def test_a_late_failure_of_an_open_breaker_restarts_its_cooldown() -> None:
    """A call admitted before the breaker opened and failing after: the cooldown counts from then."""
    status = BreakerStatus(OPEN, 3, 0, 10.0, 100.0)
    later = settle(status, failed=True, policy=POLICY, now=105.0)
    assert (later.state, later.consecutive_failures, later.opened_at) == (OPEN, 4, 105.0)


@given(st.lists(st.tuples(st.floats(min_value=0.0, max_value=30.0), st.booleans()), max_size=60))
def test_replayed_outcomes_keep_the_invariants(events: list[tuple[float, bool]]) -> None:
    """Any sequence of calls: nothing goes while open and cooling, counts are the failures since the last success."""
    policy = BreakerPolicy(fail_threshold=3, cooldown=10.0, backoff="exponential", max_cooldown=40.0)
    status, now, in_a_row = BreakerStatus(cooldown=10.0), 0.0, 0
    for dt, failed in events:
        now += dt
        before = status
        status, wait = admit(status, now=now)
        if wait is not None:
            assert before.state is HALF_OPEN or (before.opened_at is not None and now < before.opened_at + before.cooldown)
            continue
        assert before.state is not HALF_OPEN
        status = settle(status, failed=failed, policy=policy, now=now)
        in_a_row = in_a_row + 1 if failed else 0
        assert status.consecutive_failures == in_a_row
        assert (status.state is OPEN) == (in_a_row >= 3 or (failed and before.state is OPEN))
        assert 10.0 <= status.cooldown <= 40.0


# -- the wrapper, with a clock moved by hand ------------------------------------------------


def test_an_open_breaker_refuses_without_calling_the_tool() -> None:
    """Once open, calls raise CircuitOpenError (a LoomcError naming the tool, with the exact wait) and the tool is not called."""
    clock, tool = Clock(), Tool(failures=99)
    cb = circuit_breaker(tool, fail_threshold=2, cooldown=timedelta(seconds=30), clock=clock)
    trip(cb, 2)
    clock.advance(12.0)
    with pytest.raises(CircuitOpenError) as refused:
        cb()
    assert isinstance(refused.value, LoomcError)
    assert (refused.value.name, refused.value.retry_after) == ("tool", 18.0)
    assert "'tool'" in str(refused.value)
    assert tool.calls == 2
    assert (cb.state, cb.consecutive_failures) == (OPEN, 2)


def test_the_whole_cycle_is_in_transitions() -> None:
    """closed -> open -> half_open -> open -> half_open -> closed, each with its counts and cooldown."""
    clock, tool = Clock(), Tool(failures=3)
    cb = CircuitBreaker(tool, fail_threshold=2, cooldown=5, backoff="exponential", clock=clock)
    trip(cb, 2)
    clock.advance(5.0)
    trip(cb, 1)  # the trial fails: open for 10 s now
    assert cb.status.cooldown == 10.0
    clock.advance(9.9)
    with pytest.raises(CircuitOpenError):
        cb()
    clock.advance(0.1)
    assert cb() == "ok"
    steps = [(t["from"], t["to"], t["consecutive_failures"], t["cooldown"]) for t in cb.transitions]
    assert steps == [
        ("closed", "open", 2, 5.0),
        ("open", "half_open", 2, 5.0),
        ("half_open", "open", 3, 10.0),
        ("open", "half_open", 3, 10.0),
        ("half_open", "closed", 0, 5.0),
    ]
    assert all(isinstance(t["timestamp"], float) for t in cb.transitions)


def test_is_failure_judges_exceptions_and_return_values() -> None:
    """A return value can be a failure; an exception the predicate excuses counts as a success."""
    answers = iter([None, None, ValueError("bad input"), None, None])

    def tool() -> str | None:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    cb = circuit_breaker(tool, fail_threshold=3, is_failure=lambda outcome: outcome is None or isinstance(outcome, ToolDown))
    assert cb() is None
    assert cb() is None
    with pytest.raises(ValueError, match="bad input"):
        cb()
    assert (cb.state, cb.consecutive_failures) == (CLOSED, 0)  # the tool answered
    cb()
    cb()
    assert cb.consecutive_failures == 2


def test_reset_closes_an_open_breaker() -> None:
    """reset() closes it, clears the counters and brings the cooldown back to its start."""
    clock = Clock()
    cb = circuit_breaker(Tool(failures=99), fail_threshold=1, cooldown=1, backoff="exponential", clock=clock)
    trip(cb, 1)
    clock.advance(1.0)
    trip(cb, 1)
    assert cb.status.cooldown == 2.0
    cb.reset()
    assert cb.status == BreakerStatus(cooldown=1.0)
    assert cb.transitions[-1]["to"] == "closed"


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, SystemExit])
def test_an_interrupted_trial_leaves_the_next_call_to_be_the_trial(interruption: type[BaseException]) -> None:
    """A trial that never finished is neither a success nor a failure: the breaker is open with its cooldown over."""
    clock = Clock()
    outcomes: list[type[BaseException] | None] = [ToolDown, interruption, None]

    def tool() -> str:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome()
        return "ok"

    cb = circuit_breaker(tool, fail_threshold=1, cooldown=5, clock=clock)
    with pytest.raises(ToolDown):
        cb()
    clock.advance(5.0)
    with pytest.raises(interruption):
        cb()
    assert (cb.state, cb.status.failed_trials) == (OPEN, 0)
    assert cb() == "ok"
    assert cb.state is CLOSED


def test_a_predicate_that_raises_does_not_wedge_the_breaker() -> None:
    """If is_failure itself raises, that error surfaces and a half-open breaker can still be tried again."""
    clock, tool = Clock(), Tool(failures=1)
    judged: list[object] = []

    def is_failure(outcome: object) -> bool:
        judged.append(outcome)
        if outcome == "ok" and len(judged) == 2:
            raise RuntimeError("predicate bug")
        return isinstance(outcome, ToolDown)

    cb = circuit_breaker(tool, fail_threshold=1, cooldown=1, is_failure=is_failure, clock=clock)
    trip(cb, 1)
    clock.advance(1.0)
    with pytest.raises(RuntimeError, match="predicate bug"):
        cb()
    assert cb.state is OPEN
    assert cb() == "ok"
    assert cb.state is CLOSED


def test_only_one_trial_is_in_flight() -> None:
    """While a half-open trial runs in one thread, a call from another thread is refused at once."""
    clock, started, release = Clock(), threading.Event(), threading.Event()
    calls: list[str] = []

    def tool(who: str) -> str:
        calls.append(who)
        if who == "first":
            raise ToolDown
        started.set()
        assert release.wait(10)
        return who

    cb = circuit_breaker(tool, fail_threshold=1, cooldown=1, clock=clock)
    with pytest.raises(ToolDown):
        cb("first")
    clock.advance(1.0)
    results: list[str] = []
    worker = threading.Thread(target=lambda: results.append(cb("trial")))
    worker.start()
    assert started.wait(10)
    assert cb.state is HALF_OPEN
    with pytest.raises(CircuitOpenError) as refused:
        cb("second")
    assert refused.value.retry_after == 0.0
    release.set()
    worker.join(10)
    assert results == ["trial"]
    assert calls == ["first", "trial"]
    assert cb.state is CLOSED


def test_transitions_keep_the_latest_thousand() -> None:
    """A breaker flapping for days keeps a bounded history."""
    clock = Clock()
    cb = circuit_breaker(Tool(failures=10**9), fail_threshold=1, cooldown=1, clock=clock)
    trip(cb, 1)
    for _ in range(600):
        clock.advance(1.0)
        trip(cb, 1)
    assert len(cb.transitions) == 1000
    assert cb.transitions[-1]["to"] == "open"


# -- how it is written ------------------------------------------------------------------


def test_the_ways_to_build_one() -> None:
    """A call, a bare decorator, a decorator with settings, and 0.3.0's positional form all make the same breaker."""

    def lookup(key: str, *, default: str = "?") -> str:
        """Find a key."""
        return f"{key}={default}"

    @circuit_breaker
    def bare(key: str) -> str:
        return key

    @circuit_breaker(fail_threshold=2, cooldown="1m", backoff="exponential", max_cooldown="10m", name="kv")
    def configured(key: str) -> str:
        return key

    positional = CircuitBreaker(lookup, 4, "2s", "exponential", "8s", lambda outcome: False)
    called = circuit_breaker(lookup, fail_threshold=3)
    assert called("a", default="b") == "a=b"
    assert (called.__name__, called.__doc__, called.__wrapped__) == ("lookup", "Find a key.", lookup)
    assert bare("x") == "x"
    assert bare.policy == BreakerPolicy()
    assert configured.policy == BreakerPolicy(2, 60.0, "exponential", 600.0)
    assert configured.name == "kv"
    assert positional.policy == BreakerPolicy(4, 2.0, "exponential", 8.0)
    assert "'lookup' closed" in repr(called)


def test_a_breaker_around_a_breaker_keeps_its_own_state() -> None:
    """Wrapping a breaker (a per-call one inside a per-service one) gives two independent machines."""
    clock = Clock()
    inner = circuit_breaker(Tool(failures=99), fail_threshold=1, cooldown=10, name="inner", clock=clock)
    outer = circuit_breaker(inner, fail_threshold=3, cooldown=60, name="outer", clock=clock)
    with pytest.raises(ToolDown):
        outer()
    with pytest.raises(CircuitOpenError) as refused:
        outer()
    assert refused.value.name == "inner"
    assert (inner.state, outer.state) == (OPEN, CLOSED)
    assert outer.name == "outer"
    assert outer.policy == BreakerPolicy(3, 60.0)
    assert outer.consecutive_failures == 2
    assert inner.consecutive_failures == 1


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"fail_threshold": 0}, ValueError, "fail_threshold"),
        ({"fail_threshold": True}, ValueError, "fail_threshold"),
        ({"fail_threshold": 2.5}, ValueError, "fail_threshold"),
        ({"backoff": "linear"}, ValueError, "backoff"),
        ({"cooldown": "soon"}, ValueError, "cooldown='soon'.*duration"),
        ({"cooldown": -1}, ValueError, "cooldown"),
        ({"cooldown": float("nan")}, ValueError, "cooldown"),
        ({"cooldown": "1m", "max_cooldown": "30s"}, ValueError, "max_cooldown"),
        ({"is_failure": 3}, TypeError, "is_failure"),
        ({"clock": "now"}, TypeError, "clock"),
        ({"name": ""}, ValueError, "name"),
    ],
)
def test_bad_settings_fail_when_it_is_built(settings: dict[str, Any], error: type[Exception], match: str) -> None:
    """Nonsense settings raise at once, in the call form and in the decorator form."""
    with pytest.raises(error, match=match):
        circuit_breaker(Tool(), **settings)
    with pytest.raises(error, match=match):
        circuit_breaker(**settings)


def test_something_not_callable_is_refused() -> None:
    """Wrapping a value that is not a function is a TypeError."""
    with pytest.raises(TypeError, match="function to protect"):
        circuit_breaker(42)  # type: ignore[call-overload]


# -- async tools, on asyncio and trio -----------------------------------------------------


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Async breaker tests run on asyncio and on trio."""
    return str(request.param)


@pytest.mark.anyio
async def test_an_async_tool_gets_the_same_machine() -> None:
    """Awaiting the breaker runs the coroutine; it trips, refuses and tries again as the sync one does."""
    clock = Clock()
    calls: list[int] = []

    @circuit_breaker(fail_threshold=2, cooldown=3, clock=clock)
    async def fetch(n: int) -> int:
        calls.append(n)
        await anyio.sleep(0)
        if n < 2:
            raise ToolDown
        return n * 10

    for n in (0, 1):
        with pytest.raises(ToolDown):
            await fetch(n)
    with pytest.raises(CircuitOpenError):
        await fetch(9)
    clock.advance(3.0)
    assert await fetch(2) == 20
    assert calls == [0, 1, 2]
    assert fetch.state is CLOSED


@pytest.mark.anyio
async def test_async_callables_that_are_not_functions_are_awaited() -> None:
    """An object with ``async def __call__``, and a breaker around an async breaker, count what the await raises."""

    class Client:
        calls = 0

        async def __call__(self) -> str:
            self.calls += 1
            await anyio.sleep(0)
            raise ToolDown

    client = Client()
    inner = circuit_breaker(client, fail_threshold=5, cooldown=10, name="inner")
    outer = circuit_breaker(inner, fail_threshold=2, cooldown=10, name="outer")
    for _ in range(2):
        with pytest.raises(ToolDown):
            await outer()
    with pytest.raises(CircuitOpenError) as refused:
        await outer()
    assert refused.value.name == "outer"
    assert (client.calls, inner.consecutive_failures, outer.state) == (2, 2, OPEN)


@pytest.mark.anyio
async def test_a_cancelled_async_trial_leaves_the_next_call_to_be_the_trial() -> None:
    """Cancelling the trial (a timeout around the call) is not a verdict on the tool."""
    clock = Clock()
    hang = True

    @circuit_breaker(fail_threshold=1, cooldown=2, clock=clock)
    async def fetch() -> str:
        if hang:
            await anyio.sleep_forever()
        return "ok"

    fetch.load({"state": "open", "consecutive_failures": 1, "cooldown": 2.0, "opened_at": time.time() - 5})
    with anyio.move_on_after(0.05):
        await fetch()
    assert fetch.state is OPEN
    hang = False
    assert await fetch() == "ok"
    assert fetch.state is CLOSED


# -- inside a loop: the status kept with the run, transitions in the step's event ------------------


def run_meta(db: str, run_id: str) -> dict[str, Any]:
    """The run's stored metadata."""
    store = SQLiteStore(db)
    try:
        info = store.get_run(run_id)
        assert info is not None
        return dict(info.meta)
    finally:
        store.close()


def tool_loop(db: str, breaker: CircuitBreaker, iterations: int) -> Any:
    """A loop whose step calls ``breaker`` and records what happened (tool errors do not fail the step)."""

    @loop(budget=Budget(iterations=iterations), checkpoint=db, name="agent")
    def agent(state: dict[str, Any]) -> dict[str, Any]:
        try:
            outcome = breaker()
        except CircuitOpenError:
            outcome = "refused"
        except ToolDown:
            outcome = "failed"
        return {"log": [*state["log"], outcome]}

    return agent


class TestInsideALoop:
    def test_transitions_are_in_the_step_events(self, tmp_path: Path) -> None:
        """Tripping open is written into the event of the step where it happened."""
        db = str(tmp_path / "cb.db")
        fn = Tool(failures=100)
        result = tool_loop(db, circuit_breaker(fn, fail_threshold=2, cooldown="60s", name="flaky"), 3).run({"log": []})
        assert result.state["log"] == ["failed", "failed", "refused"]
        assert fn.calls == 2
        assert [h.event for h in result.history] == [None, "breaker flaky: closed -> open (2 failures, cooldown 60s)", None]

    def test_open_breaker_is_stored_and_remembered_on_resume(self, tmp_path: Path) -> None:
        """A resumed run (with a fresh breaker object, as in a new process) refuses at once: still open."""
        db = str(tmp_path / "cb.db")
        fn = Tool(failures=100)
        stopped = tool_loop(db, circuit_breaker(fn, fail_threshold=2, cooldown="60s", name="flaky"), 2).run({"log": []})
        assert stopped.status is RunStatus.BUDGET_EXHAUSTED
        saved = run_meta(db, stopped.run_id)["breakers"]["flaky"]
        assert saved["state"] == "open"
        assert saved["consecutive_failures"] == 2
        assert 0 < time.time() - saved["opened_at"] < 30
        assert "file" in run_meta(db, stopped.run_id)  # the run's own metadata is kept

        fresh = circuit_breaker(fn, fail_threshold=2, cooldown="60s", name="flaky")
        assert fresh.state is BreakerState.CLOSED
        resumed = tool_loop(db, fresh, 4).resume_run(stopped.run_id, budget=Budget(iterations=4))
        assert resumed.state["log"] == ["failed", "failed", "refused", "refused"]
        assert fn.calls == 2  # the tool was never called again
        assert fresh.state is BreakerState.OPEN

    def test_cooldown_keeps_running_across_a_resume(self, tmp_path: Path) -> None:
        """After the cooldown a resumed run gets a half-open trial; success closes it, all in the events."""
        db = str(tmp_path / "cb.db")
        fn = Tool(failures=2)
        stopped = tool_loop(db, circuit_breaker(fn, fail_threshold=2, cooldown="0.2s", name="flaky"), 2).run({"log": []})
        time.sleep(0.25)
        fresh = circuit_breaker(fn, fail_threshold=2, cooldown="0.2s", name="flaky")
        resumed = tool_loop(db, fresh, 3).resume_run(stopped.run_id, budget=Budget(iterations=3))
        assert resumed.state["log"] == ["failed", "failed", "ok"]
        assert resumed.history[-1].event == "breaker flaky: open -> half_open; breaker flaky: half_open -> closed"
        assert run_meta(db, stopped.run_id)["breakers"]["flaky"]["state"] == "closed"

    def test_a_new_run_without_stored_state_keeps_the_shared_state(self, tmp_path: Path) -> None:
        """A breaker shared by runs stays open for a new run (the dependency is still down)."""
        fn = Tool(failures=100)
        cb = circuit_breaker(fn, fail_threshold=1, cooldown="60s", name="shared")
        first = tool_loop(str(tmp_path / "a.db"), cb, 1).run({"log": []})
        second = tool_loop(str(tmp_path / "b.db"), cb, 1).run({"log": []})
        assert first.state["log"] == ["failed"]
        assert second.state["log"] == ["refused"]

    def test_a_stored_status_older_than_the_breakers_own_is_not_restored(self, tmp_path: Path) -> None:
        """A shared breaker reset after a run stored it open (then used by another run) stays closed when that run resumes."""
        tool = Tool(failures=1)
        cb = circuit_breaker(tool, fail_threshold=1, cooldown="60s", name="shared")
        first = tool_loop(str(tmp_path / "a.db"), cb, 1).run({"log": []})
        other = tool_loop(str(tmp_path / "b.db"), cb, 1).run({"log": []})
        assert (first.state["log"], other.state["log"]) == (["failed"], ["refused"])
        cb.reset()  # the tool is known to be back
        resumed = tool_loop(str(tmp_path / "a.db"), cb, 2).resume_run(first.run_id, budget=Budget(iterations=2))
        assert resumed.state["log"] == ["failed", "ok"]
        assert tool.calls == 2

    def test_breaker_failing_the_step_with_last_good(self, tmp_path: Path) -> None:
        """Without catching, CircuitOpenError fails the step; LastGood carries on and the row names it."""
        fn = Tool(failures=100)
        cb = circuit_breaker(fn, fail_threshold=1, cooldown="60s", name="tool")

        @loop(budget=Budget(iterations=2), checkpoint=str(tmp_path / "lg.db"), backtrack=LastGood(max_consecutive_errors=5))
        def agent(state: dict[str, Any]) -> dict[str, Any]:
            cb()
            return state

        result = agent.run({})
        assert result.history[0].error is not None
        assert result.history[0].error.startswith("ToolDown")
        assert result.history[0].event is not None
        assert "breaker tool: closed -> open" in result.history[0].event
        assert result.history[1].error is not None
        assert result.history[1].error.startswith("CircuitOpenError")

    def test_async_tool(self, tmp_path: Path) -> None:
        """An async function gets an awaitable breaker with the same state machine."""
        calls = {"n": 0}

        async def fetch() -> str:
            calls["n"] += 1
            raise ToolDown("down")

        cb = circuit_breaker(fetch, fail_threshold=2, cooldown="60s")

        @loop(budget=Budget(iterations=3), checkpoint=str(tmp_path / "as.db"))
        async def agent(state: dict[str, Any]) -> dict[str, Any]:
            try:
                await cb()
            except (ToolDown, CircuitOpenError) as exc:
                return {"log": [*state["log"], type(exc).__name__]}
            return state

        result = anyio.run(agent.run, {"log": []})
        assert result.state["log"] == ["ToolDown", "ToolDown", "CircuitOpenError"]
        assert calls["n"] == 2
        assert result.history[1].event == "breaker fetch: closed -> open (2 failures, cooldown 60s)"


CRASHING_AGENT = textwrap.dedent("""
    import os, signal, sys
    from loomc import Budget, loop, circuit_breaker, CircuitOpenError

    def tool():
        raise RuntimeError("tool down")

    cb = circuit_breaker(tool, fail_threshold=2, cooldown="60s", name="tool")

    @loop(budget=Budget(iterations=10), checkpoint=sys.argv[1], name="agent")
    def agent(state):
        if len(state["log"]) == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # crash in the step after the breaker opened
        try:
            cb()
        except (RuntimeError, CircuitOpenError) as exc:
            return {"log": state["log"] + [type(exc).__name__]}
        return state

    agent.run({"log": []})
""")


def test_open_breaker_survives_a_sigkill_and_shows_in_loomc_show(tmp_path: Path) -> None:
    """A process killed after its breaker opened: the resumed run refuses at once; `loomc show` lists the transition."""
    db = str(tmp_path / "crash.db")
    script = tmp_path / "agent.py"
    script.write_text(CRASHING_AGENT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, str(script), db], env=env, capture_output=True, timeout=60)
    assert proc.returncode == -9

    store = SQLiteStore(db)
    try:
        (run,) = store.list_runs()
    finally:
        store.close()
    assert run_meta(db, run.id)["breakers"]["tool"]["state"] == "open"

    calls = {"n": 0}

    def tool() -> None:
        calls["n"] += 1

    fresh = circuit_breaker(tool, fail_threshold=2, cooldown="60s", name="tool")

    @loop(budget=Budget(iterations=10), checkpoint=db, name="agent")
    def agent(state: dict[str, Any]) -> dict[str, Any]:
        try:
            fresh()
        except CircuitOpenError:
            return {"log": [*state["log"], "CircuitOpenError"]}
        return {"log": [*state["log"], "ok"]}

    resumed = agent.resume_run(run.id, budget=Budget(iterations=3))
    assert resumed.state["log"] == ["RuntimeError", "RuntimeError", "CircuitOpenError"]
    assert calls["n"] == 0

    shown = subprocess.run([sys.executable, "-m", "loomc", "show", run.id, "--db", db, "--json"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "breaker tool: closed -> open (2 failures, cooldown 60s)" in json.dumps(json.loads(shown.stdout))
