"""Circuit breakers: loomc 0.3.0's behaviour, plus state kept with the run and shown in its events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from loomc import Budget, LastGood, RunStatus, loop
from loomc._store import SQLiteStore
from loomc.circuit_breaker import (
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    LoomcError,
    circuit_breaker,
)

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

class FlakyError(Exception):
    pass


def make_flaky(fail_count: int):
    """Return a function that fails `fail_count` times then succeeds."""
    calls = {"n": 0}

    def fn(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= fail_count:
            raise FlakyError(f"fail #{calls['n']}")
        return "ok"

    fn._calls = calls
    return fn


# ---------------------------------------------------------------------------
# M4a: Core state machine
# ---------------------------------------------------------------------------

class TestCircuitBreakerTrip:
    def test_starts_closed(self):
        cb = circuit_breaker(lambda: "ok", fail_threshold=3)
        assert cb.state == BreakerState.CLOSED
        assert cb.consecutive_failures == 0

    def test_success_keeps_closed(self):
        cb = circuit_breaker(lambda: "ok", fail_threshold=3)
        assert cb() == "ok"
        assert cb.state == BreakerState.CLOSED

    def test_failures_below_threshold_stay_closed(self):
        fn = make_flaky(2)
        cb = circuit_breaker(fn, fail_threshold=3, cooldown="1s")

        with pytest.raises(FlakyError):
            cb()
        assert cb.state == BreakerState.CLOSED
        assert cb.consecutive_failures == 1

        with pytest.raises(FlakyError):
            cb()
        assert cb.state == BreakerState.CLOSED
        assert cb.consecutive_failures == 2

    def test_trips_open_at_threshold(self):
        fn = make_flaky(5)
        cb = circuit_breaker(fn, fail_threshold=3, cooldown="10s")

        for _ in range(3):
            with pytest.raises(FlakyError):
                cb()

        assert cb.state == BreakerState.OPEN
        assert cb.consecutive_failures == 3

    def test_open_rejects_immediately(self):
        fn = make_flaky(5)
        cb = circuit_breaker(fn, fail_threshold=2, cooldown="10s")

        # Trip it open
        for _ in range(2):
            with pytest.raises(FlakyError):
                cb()
        assert cb.state == BreakerState.OPEN

        # Next call should be rejected without calling fn
        with pytest.raises(CircuitOpenError) as exc_info:
            cb()
        assert exc_info.value.retry_after > 0

    def test_circuit_open_error_is_loomc_error(self):
        assert issubclass(CircuitOpenError, LoomcError)

    def test_circuit_open_error_has_name_and_retry(self):
        err = CircuitOpenError("my_tool", 5.0)
        assert err.name == "my_tool"
        assert err.retry_after == 5.0
        assert "my_tool" in str(err)


class TestCooldownAndHalfOpen:
    def test_half_open_after_cooldown(self):
        fn = make_flaky(3)
        cb = CircuitBreaker(fn, fail_threshold=3, cooldown="0.1s")

        # Trip open
        for _ in range(3):
            with pytest.raises(FlakyError):
                cb()
        assert cb.state == BreakerState.OPEN

        # Wait for cooldown
        time.sleep(0.15)

        # Should transition to half-open and allow one call (which succeeds)
        # fn was flaky for 3 calls, call #4 succeeds
        result = cb()
        assert result == "ok"
        assert cb.state == BreakerState.CLOSED

    def test_half_open_failure_returns_to_open(self):
        fn = make_flaky(10)
        cb = CircuitBreaker(fn, fail_threshold=2, cooldown="0.1s")

        # Trip open
        for _ in range(2):
            with pytest.raises(FlakyError):
                cb()
        assert cb.state == BreakerState.OPEN

        # Wait for cooldown
        time.sleep(0.15)

        # Half-open trial - will fail, should go back to open
        with pytest.raises(FlakyError):
            cb()
        assert cb.state == BreakerState.OPEN

    def test_successful_half_open_resets_failures(self):
        calls = {"n": 0}

        def fn():
            calls["n"] += 1
            if calls["n"] <= 3:  # fail first 3
                raise FlakyError("fail")
            return "ok"

        cb = CircuitBreaker(fn, fail_threshold=3, cooldown="0.1s")

        # Trip open
        for _ in range(3):
            with pytest.raises(FlakyError):
                cb()
        assert cb.state == BreakerState.OPEN

        time.sleep(0.15)

        # Half-open trial succeeds
        assert cb() == "ok"
        assert cb.state == BreakerState.CLOSED
        assert cb.consecutive_failures == 0


# ---------------------------------------------------------------------------
# M4b: Exponential backoff
# ---------------------------------------------------------------------------

class TestExponentialBackoff:
    def test_fixed_backoff_keeps_same_cooldown(self):
        fn = make_flaky(100)
        cb = CircuitBreaker(fn, fail_threshold=1, cooldown="0.1s", backoff="fixed")

        # Trip open
        with pytest.raises(FlakyError):
            cb()
        assert cb.state == BreakerState.OPEN
        assert cb._current_cooldown == 0.1

        # Wait, half-open trial fails
        time.sleep(0.15)
        with pytest.raises(FlakyError):
            cb()
        assert cb.state == BreakerState.OPEN
        assert cb._current_cooldown == 0.1  # still the same

    def test_exponential_backoff_doubles_cooldown(self):
        fn = make_flaky(100)
        cb = CircuitBreaker(
            fn, fail_threshold=1, cooldown="0.1s", backoff="exponential"
        )

        # Trip open
        with pytest.raises(FlakyError):
            cb()
        assert cb._current_cooldown == 0.1

        # First half-open failure: cooldown doubles
        time.sleep(0.15)
        with pytest.raises(FlakyError):
            cb()
        assert cb._current_cooldown == pytest.approx(0.2)

        # Second half-open failure: cooldown doubles again
        time.sleep(0.25)
        with pytest.raises(FlakyError):
            cb()
        assert cb._current_cooldown == pytest.approx(0.4)

    def test_exponential_backoff_capped_by_max_cooldown(self):
        fn = make_flaky(100)
        cb = CircuitBreaker(
            fn,
            fail_threshold=1,
            cooldown="0.1s",
            backoff="exponential",
            max_cooldown="0.3s",
        )

        # Trip open
        with pytest.raises(FlakyError):
            cb()

        # First half-open failure
        time.sleep(0.15)
        with pytest.raises(FlakyError):
            cb()
        assert cb._current_cooldown == pytest.approx(0.2)

        # Second half-open failure - should cap at 0.3
        time.sleep(0.25)
        with pytest.raises(FlakyError):
            cb()
        assert cb._current_cooldown == pytest.approx(0.3)

        # Third - still capped
        time.sleep(0.35)
        with pytest.raises(FlakyError):
            cb()
        assert cb._current_cooldown == pytest.approx(0.3)


# ---------------------------------------------------------------------------
# M4b: is_failure predicate
# ---------------------------------------------------------------------------

class TestIsFailurePredicate:
    def test_exception_not_counted_when_predicate_says_no(self):
        """If is_failure returns False for an exception, it doesn't count."""
        calls = {"n": 0}

        def fn():
            calls["n"] += 1
            raise ValueError("harmless")

        # Only count FlakyError, not ValueError
        cb = CircuitBreaker(
            fn,
            fail_threshold=2,
            cooldown="10s",
            is_failure=lambda exc: isinstance(exc, FlakyError),
        )

        for _ in range(5):
            with pytest.raises(ValueError):
                cb()

        # Should still be closed - ValueError doesn't count
        assert cb.state == BreakerState.CLOSED
        assert cb.consecutive_failures == 0

    def test_return_value_counted_as_failure(self):
        """is_failure can inspect return values (not just exceptions)."""
        calls = {"n": 0}

        def fn():
            calls["n"] += 1
            return  # None = failure

        cb = CircuitBreaker(
            fn,
            fail_threshold=2,
            cooldown="10s",
            is_failure=lambda result: result is None,
        )

        cb()
        assert cb.consecutive_failures == 1
        cb()
        assert cb.state == BreakerState.OPEN

    def test_success_resets_after_return_value_failures(self):
        results = iter([None, None, "ok"])

        def fn():
            return next(results)

        cb = CircuitBreaker(
            fn,
            fail_threshold=3,
            cooldown="10s",
            is_failure=lambda r: r is None,
        )

        cb()  # None - failure
        assert cb.consecutive_failures == 1
        cb()  # None - failure
        assert cb.consecutive_failures == 2
        cb()  # "ok" - success, resets
        assert cb.consecutive_failures == 0
        assert cb.state == BreakerState.CLOSED


# ---------------------------------------------------------------------------
# Standalone usage (no @loop)
# ---------------------------------------------------------------------------

class TestStandaloneUsage:
    def test_works_without_loop(self):
        cb = circuit_breaker(lambda x: x * 2, fail_threshold=3)
        assert cb(5) == 10

    def test_preserves_function_name(self):
        def my_tool():
            return "result"

        cb = circuit_breaker(my_tool, fail_threshold=3)
        assert cb.__name__ == "my_tool"

    def test_passes_args_and_kwargs(self):
        def tool(a, b, c=10):
            return a + b + c

        cb = circuit_breaker(tool, fail_threshold=3)
        assert cb(1, 2, c=3) == 6


# ---------------------------------------------------------------------------
# Reset
# ---------------------------------------------------------------------------

class TestReset:
    def test_manual_reset_closes_breaker(self):
        fn = make_flaky(10)
        cb = CircuitBreaker(fn, fail_threshold=2, cooldown="10s")

        for _ in range(2):
            with pytest.raises(FlakyError):
                cb()
        assert cb.state == BreakerState.OPEN

        cb.reset()
        assert cb.state == BreakerState.CLOSED
        assert cb.consecutive_failures == 0


# ---------------------------------------------------------------------------
# M4c: Transition tracking
# ---------------------------------------------------------------------------

class TestTransitionTracking:
    def test_transitions_recorded(self):
        fn = make_flaky(3)
        cb = CircuitBreaker(fn, fail_threshold=3, cooldown="0.1s")

        for _ in range(3):
            with pytest.raises(FlakyError):
                cb()

        transitions = cb.transitions
        assert len(transitions) == 1
        assert transitions[0]["from"] == "closed"
        assert transitions[0]["to"] == "open"

    def test_full_lifecycle_transitions(self):
        calls = {"n": 0}

        def fn():
            calls["n"] += 1
            if calls["n"] <= 3:
                raise FlakyError("fail")
            return "ok"

        cb = CircuitBreaker(fn, fail_threshold=3, cooldown="0.1s")

        # Trip open
        for _ in range(3):
            with pytest.raises(FlakyError):
                cb()
        assert cb.state == BreakerState.OPEN

        time.sleep(0.15)

        # Half-open -> closed on success
        cb()
        assert cb.state == BreakerState.CLOSED

        transitions = cb.transitions
        assert len(transitions) == 3
        assert transitions[0]["to"] == "open"
        assert transitions[1]["to"] == "half_open"
        assert transitions[2]["to"] == "closed"


# ---------------------------------------------------------------------------
# Zero cost on rejection (M4b integration)
# ---------------------------------------------------------------------------

class TestZeroCostOnRejection:
    def test_circuit_open_error_allows_zero_cost_accounting(self):
        """When CircuitOpenError is caught, the caller can record zero cost."""
        fn = make_flaky(10)
        cb = CircuitBreaker(fn, fail_threshold=2, cooldown="10s")

        for _ in range(2):
            with pytest.raises(FlakyError):
                cb()

        # Simulate what a @loop iteration would do
        cost = 0.0
        try:
            cb()
        except CircuitOpenError:
            cost = 0.0  # zero cost - no actual call was made

        assert cost == 0.0


# ---------------------------------------------------------------------------
# Inside a loop: state kept with the run, transitions in the step's event
# ---------------------------------------------------------------------------


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
        except FlakyError:
            outcome = "failed"
        return {"log": [*state["log"], outcome]}

    return agent


class TestInsideALoop:
    def test_transitions_are_in_the_step_events(self, tmp_path: Path) -> None:
        """Tripping open is written into the event of the step where it happened."""
        db = str(tmp_path / "cb.db")
        fn = make_flaky(100)
        result = tool_loop(db, circuit_breaker(fn, fail_threshold=2, cooldown="60s", name="flaky"), 3).run({"log": []})
        assert result.state["log"] == ["failed", "failed", "refused"]
        assert fn._calls["n"] == 2
        assert [h.event for h in result.history] == [None, "breaker flaky: closed -> open (2 failures, cooldown 60s)", None]

    def test_open_breaker_is_stored_and_remembered_on_resume(self, tmp_path: Path) -> None:
        """A resumed run (with a fresh breaker object, as in a new process) refuses at once: still open."""
        db = str(tmp_path / "cb.db")
        fn = make_flaky(100)
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
        assert fn._calls["n"] == 2  # the tool was never called again
        assert fresh.state is BreakerState.OPEN

    def test_cooldown_keeps_running_across_a_resume(self, tmp_path: Path) -> None:
        """After the cooldown a resumed run gets a half-open trial; success closes it, all in the events."""
        db = str(tmp_path / "cb.db")
        fn = make_flaky(2)
        stopped = tool_loop(db, circuit_breaker(fn, fail_threshold=2, cooldown="0.2s", name="flaky"), 2).run({"log": []})
        time.sleep(0.25)
        fresh = circuit_breaker(fn, fail_threshold=2, cooldown="0.2s", name="flaky")
        resumed = tool_loop(db, fresh, 3).resume_run(stopped.run_id, budget=Budget(iterations=3))
        assert resumed.state["log"] == ["failed", "failed", "ok"]
        assert resumed.history[-1].event == "breaker flaky: open -> half_open; breaker flaky: half_open -> closed"
        assert run_meta(db, stopped.run_id)["breakers"]["flaky"]["state"] == "closed"

    def test_a_new_run_without_stored_state_keeps_the_shared_state(self, tmp_path: Path) -> None:
        """A breaker shared by runs stays open for a new run (the dependency is still down)."""
        fn = make_flaky(100)
        cb = circuit_breaker(fn, fail_threshold=1, cooldown="60s", name="shared")
        first = tool_loop(str(tmp_path / "a.db"), cb, 1).run({"log": []})
        second = tool_loop(str(tmp_path / "b.db"), cb, 1).run({"log": []})
        assert first.state["log"] == ["failed"]
        assert second.state["log"] == ["refused"]

    def test_breaker_failing_the_step_with_last_good(self, tmp_path: Path) -> None:
        """Without catching, CircuitOpenError fails the step; LastGood carries on and the row names it."""
        fn = make_flaky(100)
        cb = circuit_breaker(fn, fail_threshold=1, cooldown="60s", name="tool")

        @loop(budget=Budget(iterations=2), checkpoint=str(tmp_path / "lg.db"), backtrack=LastGood(max_consecutive_errors=5))
        def agent(state: dict[str, Any]) -> dict[str, Any]:
            cb()
            return state

        result = agent.run({})
        assert result.history[0].error is not None
        assert result.history[0].error.startswith("FlakyError")
        assert result.history[0].event is not None
        assert "breaker tool: closed -> open" in result.history[0].event
        assert result.history[1].error is not None
        assert result.history[1].error.startswith("CircuitOpenError")

    def test_async_tool(self, tmp_path: Path) -> None:
        """An async function gets an awaitable breaker with the same state machine."""
        calls = {"n": 0}

        async def fetch() -> str:
            calls["n"] += 1
            raise FlakyError("down")

        cb = circuit_breaker(fetch, fail_threshold=2, cooldown="60s")

        @loop(budget=Budget(iterations=3), checkpoint=str(tmp_path / "as.db"))
        async def agent(state: dict[str, Any]) -> dict[str, Any]:
            try:
                await cb()
            except (FlakyError, CircuitOpenError) as exc:
                return {"log": [*state["log"], type(exc).__name__]}
            return state

        result = anyio.run(agent.run, {"log": []})
        assert result.state["log"] == ["FlakyError", "FlakyError", "CircuitOpenError"]
        assert calls["n"] == 2
        assert result.history[1].event == "breaker fetch: closed -> open (2 failures, cooldown 60s)"

    def test_bad_arguments(self) -> None:
        """Nonsense settings fail when the breaker is built."""
        with pytest.raises(ValueError, match="fail_threshold"):
            circuit_breaker(lambda: 1, fail_threshold=0)
        with pytest.raises(ValueError, match="backoff"):
            circuit_breaker(lambda: 1, backoff="linear")
        with pytest.raises(ValueError, match="duration"):
            circuit_breaker(lambda: 1, cooldown="soon")


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
