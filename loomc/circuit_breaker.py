"""Per-tool circuit breaking for agent loops.

A decorator that isolates one flaky tool call inside a loop, so a single
failing dependency stops draining the same budget and step count as the
healthy tools running alongside it.

State machine: closed -> open -> half_open -> closed (on success) or open (on failure).
"""

from __future__ import annotations

import functools
import time
from enum import Enum
from typing import Any, Callable

from loomc._budget import parse_duration as _parse_duration
from loomc._errors import CircuitOpenError, LoomcError

__all__ = ["BreakerState", "CircuitBreaker", "CircuitOpenError", "LoomcError", "circuit_breaker"]




class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Per-tool circuit breaker state machine.

    Tracks consecutive failures for a single wrapped function and short-circuits
    calls once a threshold is crossed. Works standalone or inside a @loop.

    Args:
        fn: The function to wrap.
        fail_threshold: Number of consecutive failures before tripping open.
        cooldown: Duration string (e.g. "30s", "2m") before allowing a trial call.
        backoff: "fixed" or "exponential". On exponential, each failed half-open
            trial doubles the cooldown up to max_cooldown.
        max_cooldown: Upper bound on exponential backoff (duration string).
        is_failure: Optional predicate called with the exception (or return value
            if no exception). Returns True if the result should count as a failure.
            By default, any exception is a failure.
    """

    def __init__(
        self,
        fn: Callable,
        fail_threshold: int = 3,
        cooldown: str = "30s",
        backoff: str = "fixed",
        max_cooldown: str | None = None,
        is_failure: Callable[[Any], bool] | None = None,
    ):
        self._fn = fn
        self._fail_threshold = fail_threshold
        self._base_cooldown = _parse_duration(cooldown)
        self._backoff = backoff
        self._max_cooldown = _parse_duration(max_cooldown) if max_cooldown else None
        self._is_failure = is_failure

        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._opened_at: float = 0.0
        self._current_cooldown = self._base_cooldown
        self._half_open_failures = 0

        # Track state transitions for CLI visibility (M4c)
        self._transitions: list[dict[str, Any]] = []

        functools.update_wrapper(self, fn)

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive_failures

    @property
    def transitions(self) -> list[dict[str, Any]]:
        return list(self._transitions)

    def _record_transition(self, from_state: BreakerState, to_state: BreakerState) -> None:
        self._transitions.append({
            "timestamp": time.time(),
            "from": from_state.value,
            "to": to_state.value,
            "consecutive_failures": self._consecutive_failures,
            "cooldown": self._current_cooldown,
        })

    def _trip_open(self) -> None:
        old = self._state
        self._state = BreakerState.OPEN
        self._opened_at = time.monotonic()
        if old != BreakerState.OPEN:
            self._record_transition(old, BreakerState.OPEN)

    def _close(self) -> None:
        old = self._state
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._half_open_failures = 0
        self._current_cooldown = self._base_cooldown
        if old != BreakerState.CLOSED:
            self._record_transition(old, BreakerState.CLOSED)

    def _time_until_retry(self) -> float:
        elapsed = time.monotonic() - self._opened_at
        return max(0.0, self._current_cooldown - elapsed)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._state == BreakerState.OPEN:
            remaining = self._time_until_retry()
            if remaining > 0:
                raise CircuitOpenError(
                    getattr(self._fn, "__name__", str(self._fn)),
                    remaining,
                )
            # Cooldown expired - transition to half-open, allow one trial
            old = self._state
            self._state = BreakerState.HALF_OPEN
            self._record_transition(old, BreakerState.HALF_OPEN)

        return self._attempt(args, kwargs)

    def _attempt(self, args: tuple, kwargs: dict) -> Any:
        try:
            result = self._fn(*args, **kwargs)
        except Exception as exc:
            if self._is_failure is None or self._is_failure(exc):
                self._on_failure()
            else:
                # Exception doesn't count as failure per is_failure predicate
                self._on_success()
            raise

        # Check return-value based failure via is_failure predicate
        if self._is_failure is not None and self._is_failure(result):
            self._on_failure()
            return result

        self._on_success()
        return result

    def _on_failure(self) -> None:
        self._consecutive_failures += 1

        if self._state == BreakerState.HALF_OPEN:
            # Half-open trial failed - back to open with increased cooldown
            self._half_open_failures += 1
            if self._backoff == "exponential":
                self._current_cooldown = self._base_cooldown * (2 ** self._half_open_failures)
                if self._max_cooldown is not None:
                    self._current_cooldown = min(self._current_cooldown, self._max_cooldown)
            self._trip_open()
        elif self._consecutive_failures >= self._fail_threshold:
            self._trip_open()

    def _on_success(self) -> None:
        self._close()

    def reset(self) -> None:
        """Manually reset the breaker to closed state."""
        self._close()


def circuit_breaker(
    fn: Callable,
    fail_threshold: int = 3,
    cooldown: str = "30s",
    backoff: str = "fixed",
    max_cooldown: str | None = None,
    is_failure: Callable[[Any], bool] | None = None,
) -> CircuitBreaker:
    """Wrap a tool function with a circuit breaker.

    Args:
        fn: The function to protect.
        fail_threshold: Consecutive failures before tripping open.
        cooldown: Duration before allowing a trial call (e.g. "30s", "2m").
        backoff: "fixed" or "exponential".
        max_cooldown: Upper bound for exponential backoff (e.g. "5m").
        is_failure: Optional predicate - called with exception or return value.
            Returns True if the result counts as a failure.

    Returns:
        A CircuitBreaker wrapping the original function.

    Example::

        from loomc import circuit_breaker

        run_tests = circuit_breaker(
            run_tests_raw,
            fail_threshold=3,
            cooldown="30s",
            backoff="exponential",
        )

        # Works standalone, no @loop required
        result = run_tests(code)
    """
    return CircuitBreaker(
        fn=fn,
        fail_threshold=fail_threshold,
        cooldown=cooldown,
        backoff=backoff,
        max_cooldown=max_cooldown,
        is_failure=is_failure,
    )
