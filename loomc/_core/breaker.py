"""Circuit breakers: stop calling a tool that keeps failing, and remember it across a resume.

Two layers, as elsewhere in loomc:

- The decisions are pure. :func:`admit` (may a call go now?) and :func:`settle` (what did
  its outcome do to the breaker?) map a frozen :class:`BreakerStatus` and the time, passed
  in, to the next status. They read no clock and touch no run.
- :class:`CircuitBreaker` is the shell around them: it reads its clock, calls the wrapped
  tool (sync or async), keeps the status under a lock, and inside a ``@loop`` step keeps
  the status with the run (metadata key ``breakers.<name>``) and writes every change of
  state into the step's event.

The states::

    closed --(fail_threshold failures in a row)--> open --(cooldown over)--> half_open
    half_open --(the trial call succeeds)--> closed
    half_open --(the trial call fails)--> open  (cooldown doubled under backoff="exponential")
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from types import TracebackType
from typing import Any, Generic, Literal, ParamSpec, TypeVar, overload

from loomc._core import events as _events
from loomc._core.budget import parse_duration
from loomc._core.context import current_ledger
from loomc._core.errors import CircuitOpenError
from loomc._core.events import Event

__all__ = [
    "Backoff",
    "BreakerPolicy",
    "BreakerState",
    "BreakerStatus",
    "CircuitBreaker",
    "admit",
    "circuit_breaker",
    "settle",
]

P = ParamSpec("P")
R = TypeVar("R")

Duration = str | float | timedelta
Backoff = Literal["fixed", "exponential"]

_KEPT_TRANSITIONS = 1000  # a breaker flapping for days must not grow without bound
_MAX_DOUBLINGS = 1000  # 2**1000 times any cooldown is forever, and still a float


class BreakerState(str, Enum):
    """Where a breaker stands: ``closed`` (calls go), ``open`` (refused), ``half_open`` (one trial)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """How a breaker trips and how long it stays open (durations in seconds).

    Attributes:
        fail_threshold: failures in a row that open a closed breaker.
        cooldown: how long it stays open before a trial call.
        backoff: ``"fixed"``, or ``"exponential"``: each failed trial doubles the cooldown.
        max_cooldown: the most an exponential cooldown grows to (``None``: no bound).
    """

    fail_threshold: int = 3
    cooldown: float = 30.0
    backoff: Backoff = "fixed"
    max_cooldown: float | None = None

    def cooldown_after(self, failed_trials: int) -> float:
        """The cooldown after ``failed_trials`` failed half-open trials in a row."""
        if self.backoff == "fixed" or failed_trials <= 0:
            return self.cooldown
        grown = self.cooldown * 2.0 ** min(failed_trials, _MAX_DOUBLINGS)
        return grown if self.max_cooldown is None else min(grown, self.max_cooldown)


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    """A breaker's state as data: what :func:`admit` and :func:`settle` map, and a run stores.

    Attributes:
        state: closed, open or half-open.
        consecutive_failures: failures in a row since the last success.
        failed_trials: failed half-open trials since the breaker last closed (the exponent
            of an exponential backoff).
        cooldown: the current cooldown, in seconds.
        opened_at: the clock reading when it last opened (``None`` while it never has
            since it closed).
    """

    state: BreakerState = BreakerState.CLOSED
    consecutive_failures: int = 0
    failed_trials: int = 0
    cooldown: float = 30.0
    opened_at: float | None = None

    def retry_after(self, now: float) -> float:
        """Seconds until an open breaker lets a trial through (0 when it would now)."""
        if self.state is not BreakerState.OPEN or self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown - now)


def admit(status: BreakerStatus, *, now: float) -> tuple[BreakerStatus, float | None]:
    """Decide whether a call may go at time ``now``.

    Args:
        status: the breaker's status before the call.
        now: the current clock reading, in seconds.

    Returns:
        ``(status the call goes under, None)`` when it may go — an open breaker whose
        cooldown is over turns half-open for this one trial — or ``(status, seconds)`` when
        it is refused: the cooldown has that long to run, or (``0.0``) a trial is in flight.
    """
    if status.state is BreakerState.CLOSED:
        return status, None
    if status.state is BreakerState.HALF_OPEN:
        return status, 0.0
    wait = status.retry_after(now)
    if wait > 0.0:
        return status, wait
    return dataclasses.replace(status, state=BreakerState.HALF_OPEN), None


def settle(status: BreakerStatus, *, failed: bool, policy: BreakerPolicy, now: float) -> BreakerStatus:
    """The status after a call ended, a failure or a success.

    Args:
        status: the status the call went under (as :func:`admit` returned it, or as it
            stands now if other calls settled meanwhile).
        failed: whether the outcome counts as a failure.
        policy: the breaker's thresholds and cooldowns.
        now: the current clock reading, in seconds.

    Returns:
        A success closes the breaker and clears its counters. A failed half-open trial
        opens it again with the next cooldown; the ``fail_threshold``-th failure in a row
        opens a closed one (and a late failure of an open one restarts its cooldown).
    """
    if not failed:
        if status.state is BreakerState.CLOSED and status.consecutive_failures == 0:
            return status
        return BreakerStatus(cooldown=policy.cooldown)
    failures = status.consecutive_failures + 1
    if status.state is BreakerState.HALF_OPEN:
        trials = status.failed_trials + 1
        return BreakerStatus(BreakerState.OPEN, failures, trials, policy.cooldown_after(trials), now)
    if failures >= policy.fail_threshold:
        return BreakerStatus(BreakerState.OPEN, failures, status.failed_trials, status.cooldown, now)
    return dataclasses.replace(status, consecutive_failures=failures)


def _note(name: str, old: BreakerStatus, new: BreakerStatus) -> Event:
    """The step event for one change of state."""
    if new.state is BreakerState.OPEN:
        return _events.breaker(name, old.state.value, new.state.value, new.consecutive_failures, new.cooldown)
    return _events.breaker(name, old.state.value, new.state.value)


def _is_async(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` gives a coroutine: an ``async def``, an object with one as ``__call__``, an async breaker."""
    if isinstance(fn, CircuitBreaker):
        return fn._is_async
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def _seconds(argument: str, value: Duration) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ValueError(f"circuit_breaker({argument}={value!r}): {exc}") from None


# The run's metadata only ever gets a new ``breakers`` mapping (never one changed in
# place, which a store may be serialising); this lock keeps two breakers of one run from
# each replacing the mapping with a copy that lacks the other's entry.
_meta_lock = threading.Lock()


def _run_context() -> Any:
    """The context of the run whose step is executing here, if any."""
    ledger = current_ledger()
    ctx = None if ledger is None else ledger.context
    return ctx if ctx is not None and isinstance(getattr(ctx, "meta", None), dict) else None


class _Attempt:
    """One admitted call: settles the breaker however the call ends."""

    __slots__ = ("_before", "_breaker", "_failed", "_judged")

    def __init__(self, breaker: CircuitBreaker[..., Any], before: BreakerStatus) -> None:
        self._breaker = breaker
        self._before = before
        self._failed = False
        self._judged = False

    def __enter__(self) -> _Attempt:
        return self

    def done(self, result: R) -> R:
        """Judge the call's return value (``is_failure``) and hand it back."""
        self._judged = True  # if the predicate raises, the outcome stays unknown
        self._failed = self._breaker._counts(result)
        return result

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        failed: bool | None = None  # None: the call never finished (cancelled, interrupted)
        try:
            if exc is None:
                failed = self._failed
            elif isinstance(exc, Exception) and not self._judged:
                failed = self._breaker._counts(exc)
        finally:
            self._breaker._settle(self._before, failed)


class CircuitBreaker(Generic[P, R]):
    """A tool wrapped in a circuit breaker: call it like the tool (await it if the tool is async).

    After ``fail_threshold`` failures in a row the breaker opens: calls raise
    :class:`~loomc.CircuitOpenError` (with ``.retry_after``) without calling the tool.
    After ``cooldown`` one trial call goes through (half-open; other calls meanwhile are
    refused): success closes the breaker, failure opens it again, for twice as long under
    ``backoff="exponential"`` (at most ``max_cooldown``).

    Inside a ``@loop`` step the breaker's status is stored with the run under
    ``breakers.<name>`` and a resumed run restores it (the cooldown counts the time in
    between); each change of state is written into the step's event. Outside a run it
    works alone. The newest knowledge wins: a breaker object that has itself seen calls
    since a run stored its status keeps its own.

    Args:
        fn: the tool to protect, sync or async.
        fail_threshold: failures in a row that open the breaker (a whole number >= 1).
        cooldown: how long it stays open before a trial: seconds, a ``timedelta`` or a
            string such as ``"30s"``, ``"2m"``.
        backoff: ``"fixed"`` or ``"exponential"``.
        max_cooldown: the bound of an exponential cooldown (``None``: unbounded).
        is_failure: ``is_failure(exception_or_result) -> bool`` decides what counts as a
            failure; by default every exception does and every return value does not. An
            exception that is not a failure counts as a success (it proves the tool answers).
        name: the key of the breaker's status in a run and its name in events (default:
            the tool's ``__name__``).
        clock: the seconds counter cooldowns are measured with (default ``time.monotonic``).

    Raises:
        TypeError: ``fn``, ``is_failure`` or ``clock`` is not callable.
        ValueError: a threshold, backoff or duration that makes no sense.
    """

    def __init__(
        self,
        fn: Callable[P, R],
        fail_threshold: int = 3,
        cooldown: Duration = "30s",
        backoff: Backoff = "fixed",
        max_cooldown: Duration | None = None,
        is_failure: Callable[[Any], bool] | None = None,
        *,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"circuit_breaker({fn!r}): expected the function to protect")
        if isinstance(fail_threshold, bool) or not isinstance(fail_threshold, int) or fail_threshold < 1:
            raise ValueError(f"circuit_breaker(fail_threshold={fail_threshold!r}): must be a whole number >= 1")
        if backoff not in ("fixed", "exponential"):
            raise ValueError(f"circuit_breaker(backoff={backoff!r}): use 'fixed' or 'exponential'")
        base = _seconds("cooldown", cooldown)
        bound = None if max_cooldown is None else _seconds("max_cooldown", max_cooldown)
        if bound is not None and bound < base:
            raise ValueError(f"circuit_breaker(max_cooldown={max_cooldown!r}): must be at least the cooldown ({cooldown!r})")
        if is_failure is not None and not callable(is_failure):
            raise TypeError(f"circuit_breaker(is_failure={is_failure!r}): expected a function of the exception or result")
        if not callable(clock):
            raise TypeError(f"circuit_breaker(clock={clock!r}): expected a function returning seconds")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"circuit_breaker(name={name!r}): must be a non-empty string")

        self.policy = BreakerPolicy(fail_threshold, base, backoff, bound)
        self.name: str = name or getattr(fn, "__name__", None) or repr(fn)
        self._fn = fn
        self._is_failure = is_failure
        self._clock = clock
        self._is_async = _is_async(fn)
        self._status = BreakerStatus(cooldown=base)
        self._lock = threading.RLock()
        self._transitions: deque[dict[str, Any]] = deque(maxlen=_KEPT_TRANSITIONS)
        self._changed_at: float | None = None  # wall time of this object's last change of status
        self._seen: object = None  # the stored entry last compared with, so it is read once
        # Name, doc and __wrapped__ only: merging fn's __dict__ would let a wrapped object
        # (another breaker, say) overwrite this breaker's own attributes.
        functools.update_wrapper(self, fn, updated=())

    def __repr__(self) -> str:
        status = self._status
        return f"<CircuitBreaker {self.name!r} {status.state.value}, {status.consecutive_failures} failures in a row>"

    @property
    def status(self) -> BreakerStatus:
        """The whole status, as a frozen :class:`BreakerStatus`."""
        return self._status

    @property
    def state(self) -> BreakerState:
        """``closed``, ``open`` or ``half_open``."""
        return self._status.state

    @property
    def consecutive_failures(self) -> int:
        """Failures in a row since the last success."""
        return self._status.consecutive_failures

    @property
    def transitions(self) -> list[dict[str, Any]]:
        """The latest changes of state (up to 1,000), oldest first.

        Each is a dict with ``timestamp`` (``time.time()``), ``from``, ``to``,
        ``consecutive_failures`` and ``cooldown`` (seconds).
        """
        return list(self._transitions)

    # -- calling the tool ---------------------------------------------------------------
    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the tool unless the breaker refuses (then :class:`~loomc.CircuitOpenError`)."""
        if self._is_async:
            return self._acall(*args, **kwargs)  # type: ignore[return-value]  # R is the coroutine
        with self._attempt() as attempt:
            return attempt.done(self._fn(*args, **kwargs))

    async def _acall(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        with self._attempt() as attempt:
            return attempt.done(await self._fn(*args, **kwargs))  # type: ignore[misc]

    def _attempt(self) -> _Attempt:
        with self._lock:
            self._pull()
            before = self._status
            status, wait = admit(before, now=self._clock())
            if wait is not None:
                raise CircuitOpenError(self.name, wait)
            self._change(status)
            return _Attempt(self, before)

    def _counts(self, outcome: object) -> bool:
        if self._is_failure is None:
            return isinstance(outcome, BaseException)
        return bool(self._is_failure(outcome))

    def _settle(self, before: BreakerStatus, failed: bool | None) -> None:
        with self._lock:
            if failed is not None:
                self._change(settle(self._status, failed=failed, policy=self.policy, now=self._clock()))
            elif self._status.state is BreakerState.HALF_OPEN:
                # The trial never ended: open as before it, so the next call is the trial.
                self._change(before)

    def reset(self) -> None:
        """Close the breaker and clear its counters (stored with the run inside a step)."""
        with self._lock:
            self._change(BreakerStatus(cooldown=self.policy.cooldown))

    # -- the status, kept with the run ----------------------------------------------------
    def _change(self, new: BreakerStatus) -> None:
        old = self._status
        if new == old:
            return
        self._status = new
        self._changed_at = time.time()
        ctx = _run_context()
        if new.state is not old.state:
            self._transitions.append({
                "timestamp": self._changed_at, "from": old.state.value, "to": new.state.value,
                "consecutive_failures": new.consecutive_failures, "cooldown": new.cooldown,
            })
            if ctx is not None and isinstance(getattr(ctx, "events", None), list):
                ctx.events.append(_note(self.name, old, new))
        if ctx is not None:
            entry = self.to_dict()
            with _meta_lock:
                ctx.meta["breakers"] = {**(ctx.meta.get("breakers") or {}), self.name: entry}
                ctx.meta_dirty = True
            self._seen = entry

    def _pull(self) -> None:
        """Adopt the status the current run stored, unless this object knows something newer."""
        ctx = _run_context()
        if ctx is None:
            return
        saved = (ctx.meta.get("breakers") or {}).get(self.name)
        if saved is None or saved is self._seen:
            return
        self._seen = saved
        if not isinstance(saved, dict):
            return
        stamp = saved.get("changed_at", saved.get("opened_at"))
        if self._changed_at is not None and (not isinstance(stamp, (int, float)) or stamp < self._changed_at):
            return
        self.load(saved)

    def to_dict(self) -> dict[str, Any]:
        """The status as a run stores it: JSON-ready, times on the wall clock."""
        s = self._status
        now_wall, now = time.time(), self._clock()
        return {
            "state": s.state.value,
            "consecutive_failures": s.consecutive_failures,
            "half_open_failures": s.failed_trials,
            "cooldown": s.cooldown,
            "opened_at": None if s.opened_at is None else now_wall - (now - s.opened_at),
            "changed_at": self._changed_at if self._changed_at is not None else now_wall,
        }

    def load(self, data: dict[str, Any]) -> None:
        """Restore a status saved by :meth:`to_dict`; an open breaker's cooldown counts the time since.

        An entry that cannot be read (edited by hand, written by something else) is ignored:
        it must not make every call of the tool fail.
        """
        try:
            state = BreakerState(data.get("state", "closed"))
            failures = int(data.get("consecutive_failures", 0))
            trials = int(data.get("half_open_failures", 0))
            cooldown = float(data.get("cooldown", self.policy.cooldown))
            opened = data.get("opened_at")
            since = None if opened is None else max(0.0, time.time() - float(opened))
            stamp = data.get("changed_at")
            changed = None if stamp is None else float(stamp)
        except (TypeError, ValueError):
            return
        now = self._clock()
        if state is not BreakerState.CLOSED and since is None:
            since = cooldown  # open with no time: its cooldown is over
        if state is BreakerState.HALF_OPEN:
            state = BreakerState.OPEN  # the trial's process is gone: the next call is the trial
        with self._lock:
            self._status = BreakerStatus(state, failures, trials, cooldown, None if since is None else now - since)
            self._changed_at = changed


@overload
def circuit_breaker(
    fn: Callable[P, R],
    fail_threshold: int = ...,
    cooldown: Duration = ...,
    backoff: Backoff = ...,
    max_cooldown: Duration | None = ...,
    is_failure: Callable[[Any], bool] | None = ...,
    *,
    name: str | None = ...,
    clock: Callable[[], float] = ...,
) -> CircuitBreaker[P, R]: ...


@overload
def circuit_breaker(
    fn: None = None,
    *,
    fail_threshold: int = ...,
    cooldown: Duration = ...,
    backoff: Backoff = ...,
    max_cooldown: Duration | None = ...,
    is_failure: Callable[[Any], bool] | None = ...,
    name: str | None = ...,
    clock: Callable[[], float] = ...,
) -> Callable[[Callable[P, R]], CircuitBreaker[P, R]]: ...


def circuit_breaker(
    fn: Callable[P, R] | None = None, *args: Any, **settings: Any
) -> CircuitBreaker[P, R] | Callable[[Callable[P, R]], CircuitBreaker[P, R]]:
    """Wrap a tool in a :class:`CircuitBreaker`; also a decorator, bare or with arguments.

    ::

        run_tests = circuit_breaker(run_tests_raw, fail_threshold=3, cooldown="30s")

        @circuit_breaker(fail_threshold=2, cooldown="1m", backoff="exponential", max_cooldown="10m")
        async def fetch(url): ...

    Args:
        fn: the tool, sync or async; leave it out to get a decorator.
        fail_threshold: failures in a row that open the breaker.
        cooldown: how long it stays open before a trial (``"30s"``, seconds, a ``timedelta``).
        backoff: ``"fixed"`` or ``"exponential"`` (each failed trial doubles the cooldown).
        max_cooldown: the bound of an exponential cooldown.
        is_failure: ``is_failure(exception_or_result) -> bool``; default: any exception.
        name: the key of its status in a run and its name in step events.
        clock: the seconds counter cooldowns are measured with.

    Returns:
        The breaker (or, without ``fn``, a decorator that makes one). Bad settings raise
        ``ValueError``/``TypeError`` here, not at the first call.
    """
    # The settings are CircuitBreaker's own (the overloads above spell them out for type checkers).
    if fn is None:
        CircuitBreaker(_probe, *args, **settings)  # bad settings fail at decoration, not at first use

        def decorate(tool: Callable[P, R]) -> CircuitBreaker[P, R]:
            return CircuitBreaker(tool, *args, **settings)

        return decorate
    return CircuitBreaker(fn, *args, **settings)


def _probe() -> None:
    """Stand-in tool used to check a decorator's settings before it gets the real one."""
