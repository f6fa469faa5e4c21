"""Per-tool circuit breaking for agent loops.

A wrapper that isolates one flaky tool inside a loop, so a failing dependency stops
draining the budget and the steps of the healthy work around it.

State machine: closed -> open (after ``fail_threshold`` consecutive failures) ->
half_open (after the cooldown: one trial call) -> closed on success, or open again
(with a doubled cooldown under ``backoff="exponential"``).

Inside a ``@loop`` step the breaker's state is stored with the run (in the run's
metadata, under ``breakers.<name>``), so a resumed run remembers an open breaker, and
every transition is written into the step's ``event`` (what ``loomc show`` prints),
e.g. ``breaker run_tests: closed -> open (3 failures, cooldown 30s)``.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from enum import Enum
from typing import Any

from loomc._budget import parse_duration as _parse_duration
from loomc._context import current_ledger
from loomc._errors import CircuitOpenError, LoomcError

__all__ = ["BreakerState", "CircuitBreaker", "CircuitOpenError", "LoomcError", "circuit_breaker"]

Duration = str | float | timedelta


class BreakerState(str, Enum):
    """The states of a circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Per-tool circuit breaker state machine; call it like the function it wraps.

    Tracks consecutive failures of one wrapped function (sync or async) and refuses calls
    with :class:`CircuitOpenError` once ``fail_threshold`` is reached, until the cooldown
    has passed. Works standalone or inside a ``@loop`` (where its state is kept with the run).

    Args:
        fn: The function to wrap.
        fail_threshold: Number of consecutive failures before tripping open.
        cooldown: Time before allowing a trial call ("30s", "2m", seconds, a ``timedelta``).
        backoff: "fixed" or "exponential". On exponential, each failed half-open
            trial doubles the cooldown up to max_cooldown.
        max_cooldown: Upper bound on exponential backoff.
        is_failure: Optional predicate called with the exception (or the return value
            if no exception). Returns True if the result should count as a failure.
            By default, any exception is a failure.
        name: the key under which a run stores this breaker's state and the name in its
            events (default: the function's name).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        fail_threshold: int = 3,
        cooldown: Duration = "30s",
        backoff: str = "fixed",
        max_cooldown: Duration | None = None,
        is_failure: Callable[[Any], bool] | None = None,
        *,
        name: str | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"circuit_breaker({fn!r}): expected the function to protect")
        if isinstance(fail_threshold, bool) or not isinstance(fail_threshold, int) or fail_threshold < 1:
            raise ValueError(f"circuit_breaker(fail_threshold={fail_threshold!r}): must be a whole number >= 1")
        if backoff not in ("fixed", "exponential"):
            raise ValueError(f"circuit_breaker(backoff={backoff!r}): use 'fixed' or 'exponential'")
        self._fn = fn
        self._fail_threshold = fail_threshold
        self._base_cooldown = _parse_duration(cooldown)
        self._backoff = backoff
        self._max_cooldown = _parse_duration(max_cooldown) if max_cooldown else None
        self._is_failure = is_failure
        self.name = name or getattr(fn, "__name__", None) or repr(fn)

        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._opened_at: float = 0.0
        self._current_cooldown = self._base_cooldown
        self._half_open_failures = 0
        self._lock = threading.RLock()
        self._synced_run: str | None = None  # the run whose stored state this object has loaded

        # State transitions, for inspection and the CLI.
        self._transitions: list[dict[str, Any]] = []

        functools.update_wrapper(self, fn)
        self._is_async = inspect.iscoroutinefunction(fn)

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name} {self._state.value}>"

    @property
    def state(self) -> BreakerState:
        """The current state (``closed``, ``open`` or ``half_open``)."""
        return self._state

    @property
    def consecutive_failures(self) -> int:
        """Failures in a row since the last success."""
        return self._consecutive_failures

    @property
    def transitions(self) -> list[dict[str, Any]]:
        """Every state change: ``timestamp``, ``from``, ``to``, ``consecutive_failures``, ``cooldown``."""
        return list(self._transitions)

    # -- the state machine -------------------------------------------------------------
    def _record_transition(self, from_state: BreakerState, to_state: BreakerState) -> None:
        self._transitions.append({
            "timestamp": time.time(),
            "from": from_state.value,
            "to": to_state.value,
            "consecutive_failures": self._consecutive_failures,
            "cooldown": self._current_cooldown,
        })
        detail = ""
        if to_state is BreakerState.OPEN:
            detail = f" ({self._consecutive_failures} failures, cooldown {self._current_cooldown:g}s)"
        _note(f"breaker {self.name}: {from_state.value} -> {to_state.value}{detail}")

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

    def _before(self) -> tuple[Any, ...]:
        """Admit a call or raise :class:`CircuitOpenError`; returns the state to compare after it."""
        with self._lock:
            self._sync_from_run()
            before = self._snapshot()
            if self._state == BreakerState.OPEN:
                remaining = self._time_until_retry()
                if remaining > 0:
                    raise CircuitOpenError(self.name, remaining)
                # Cooldown expired: half-open, allow one trial.
                self._state = BreakerState.HALF_OPEN
                self._record_transition(BreakerState.OPEN, BreakerState.HALF_OPEN)
            return before

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped function unless the breaker is open (awaitable for an async function)."""
        if self._is_async:
            return self._acall(*args, **kwargs)
        before = self._before()
        try:
            result = self._fn(*args, **kwargs)
        except Exception as exc:
            self._after_error(exc, before)
            raise
        return self._after_result(result, before)

    async def _acall(self, *args: Any, **kwargs: Any) -> Any:
        before = self._before()
        try:
            result = await self._fn(*args, **kwargs)
        except Exception as exc:
            self._after_error(exc, before)
            raise
        return self._after_result(result, before)

    def _after_error(self, exc: BaseException, before: tuple[Any, ...]) -> None:
        with self._lock:
            if self._is_failure is None or self._is_failure(exc):
                self._on_failure()
            else:
                self._on_success()  # an exception that does not count as a failure
            self._sync_to_run(before)

    def _after_result(self, result: Any, before: tuple[Any, ...]) -> Any:
        with self._lock:
            if self._is_failure is not None and self._is_failure(result):
                self._on_failure()
            else:
                self._on_success()
            self._sync_to_run(before)
        return result

    def _on_failure(self) -> None:
        self._consecutive_failures += 1
        if self._state == BreakerState.HALF_OPEN:
            # The trial failed: open again, with a longer cooldown under exponential backoff.
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
        """Manually reset the breaker to the closed state (stored with the run inside a step)."""
        with self._lock:
            before = self._snapshot()
            self._close()
            self._sync_to_run(before)

    # -- persistence with the run -----------------------------------------------------------
    def _snapshot(self) -> tuple[Any, ...]:
        return (self._state, self._consecutive_failures, self._half_open_failures, self._current_cooldown, self._opened_at)

    def to_dict(self) -> dict[str, Any]:
        """The breaker's state as stored with a run (``opened_at`` on the wall clock)."""
        opened_wall = time.time() - (time.monotonic() - self._opened_at) if self._state != BreakerState.CLOSED else None
        return {
            "state": self._state.value,
            "consecutive_failures": self._consecutive_failures,
            "half_open_failures": self._half_open_failures,
            "cooldown": self._current_cooldown,
            "opened_at": opened_wall,
        }

    def load(self, data: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`to_dict` (an open breaker's cooldown keeps running)."""
        with self._lock:
            self._state = BreakerState(data.get("state", "closed"))
            self._consecutive_failures = int(data.get("consecutive_failures", 0))
            self._half_open_failures = int(data.get("half_open_failures", 0))
            self._current_cooldown = float(data.get("cooldown", self._base_cooldown))
            opened = data.get("opened_at")
            elapsed = max(0.0, time.time() - float(opened)) if opened is not None else self._current_cooldown
            self._opened_at = time.monotonic() - elapsed

    def _sync_from_run(self) -> None:
        ctx = _run_context()
        if ctx is None or ctx.run_id == self._synced_run:
            return
        self._synced_run = ctx.run_id
        saved = (ctx.meta.get("breakers") or {}).get(self.name)
        if isinstance(saved, dict):
            self.load(saved)

    def _sync_to_run(self, before: tuple[Any, ...]) -> None:
        if self._snapshot() == before:
            return
        ctx = _run_context()
        if ctx is None:
            return
        breakers = dict(ctx.meta.get("breakers") or {})
        breakers[self.name] = self.to_dict()
        ctx.meta["breakers"] = breakers
        ctx.meta_dirty = True


def _run_context() -> Any:
    """The engine's context of the run whose step is executing here, if any."""
    ledger = current_ledger()
    ctx = ledger.context if ledger is not None else None
    return ctx if ctx is not None and isinstance(getattr(ctx, "meta", None), dict) else None


def _note(text: str) -> None:
    ctx = _run_context()
    notes = getattr(ctx, "notes", None) if ctx is not None else None
    if isinstance(notes, list):
        notes.append(text)


def circuit_breaker(
    fn: Callable[..., Any],
    fail_threshold: int = 3,
    cooldown: Duration = "30s",
    backoff: str = "fixed",
    max_cooldown: Duration | None = None,
    is_failure: Callable[[Any], bool] | None = None,
    *,
    name: str | None = None,
) -> CircuitBreaker:
    """Wrap a tool function with a circuit breaker.

    Args:
        fn: The function to protect (sync or async).
        fail_threshold: Consecutive failures before tripping open.
        cooldown: Duration before allowing a trial call (e.g. "30s", "2m").
        backoff: "fixed" or "exponential".
        max_cooldown: Upper bound for exponential backoff (e.g. "5m").
        is_failure: Optional predicate - called with exception or return value.
            Returns True if the result counts as a failure.
        name: the name a run stores the breaker's state under (default: the function's).

    Returns:
        A CircuitBreaker wrapping the original function.

    Example::

        from loomc import circuit_breaker

        run_tests = circuit_breaker(run_tests_raw, fail_threshold=3, cooldown="30s", backoff="exponential")
        result = run_tests(code)  # works standalone; inside @loop its state is kept with the run
    """
    return CircuitBreaker(
        fn=fn,
        fail_threshold=fail_threshold,
        cooldown=cooldown,
        backoff=backoff,
        max_cooldown=max_cooldown,
        is_failure=is_failure,
        name=name,
    )
