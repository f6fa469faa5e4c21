"""Retries of transient errors inside a step: which errors, how long to wait, whether to retry.

:class:`Retry` is pure: the engine asks :meth:`Retry.decide` after a failed attempt and gets
back a wait (or ``None``) with a note for the step's ``event``; the drivers do the sleeping.
The backoff is tenacity's exponential-with-jitter wait. A retry the run's budget cannot
afford (the money left is below the step-cost estimate, or the wait would outlast the wall
clock) is not made.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from loomc._core import events as _events
from loomc._core.errors import LoomcError
from loomc._core.events import Event

__all__ = ["Retry", "RetryDecision", "as_retry", "is_transient"]

_TRANSIENT_STATUS = frozenset({408, 409, 429})


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: rate limits, overload, 5xx, timeouts, dropped connections.

    Covers the anthropic and openai SDKs' ``RateLimitError`` (429), ``InternalServerError`` and
    overload (5xx, 529), ``APIConnectionError`` and ``APITimeoutError``, plus the built-in
    ``ConnectionError`` and ``TimeoutError``. loomc's own errors are never transient.
    """
    if isinstance(exc, LoomcError):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    for name in ("anthropic", "openai"):
        sdk = sys.modules.get(name)
        if sdk is None:
            continue
        if isinstance(exc, sdk.APIConnectionError):  # APITimeoutError is one
            return True
        if isinstance(exc, sdk.APIStatusError):
            status = int(getattr(exc, "status_code", 0) or 0)
            return status in _TRANSIENT_STATUS or status >= 500
    return False


def _seconds(value: float | timedelta, what: str) -> float:
    s = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not s >= 0 or math.isinf(s):
        raise ValueError(f"Retry({what}={value!r}): must be a finite number of seconds >= 0")
    return s


def _retry_after(exc: BaseException) -> float | None:
    """The server's ``Retry-After`` (seconds) on an SDK error, if it sent one."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is None:
        return None
    for key in ("retry-after-ms", "retry-after"):
        raw = headers.get(key)
        if raw is None:
            continue
        try:
            v = float(raw)
        except (TypeError, ValueError):
            continue
        return v / 1000 if key.endswith("-ms") else v
    return None


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """What to do after a failed attempt: wait ``delay`` seconds and retry, or not (``None``).

    ``event`` is the step event recording the retry (or why none was made), if any.
    """

    delay: float | None
    event: Event | None

    @property
    def note(self) -> str | None:
        """The event as text (``"retry 1 in 0.50s after RateLimitError: ..."``)."""
        return None if self.event is None else _events.text(self.event)


class Retry:
    """Retry transient errors inside a step with exponential backoff and jitter.

    Args:
        attempts: attempts per step in all (the first included); ``1`` never retries.
        initial: the first wait, in seconds (or a ``timedelta``).
        max_delay: the longest wait.
        exp_base: the growth factor of the wait per attempt.
        jitter: up to this many seconds added at random to each wait.
        on: which errors are transient: exception types, or a predicate
            ``exc -> bool``; default :func:`is_transient` (SDK rate limits and overload).

    Example::

        @loop(retry=Retry(attempts=5, initial=1.0, max_delay=20))
        def step(state): ...
    """

    def __init__(
        self,
        *,
        attempts: int = 4,
        initial: float | timedelta = 0.5,
        max_delay: float | timedelta = 30.0,
        exp_base: float = 2.0,
        jitter: float | timedelta = 0.5,
        on: type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool] | None = None,
    ) -> None:
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"Retry(attempts={attempts!r}): must be a whole number >= 1")
        if not exp_base >= 1:
            raise ValueError(f"Retry(exp_base={exp_base!r}): must be >= 1")
        self.attempts = attempts
        self.initial = _seconds(initial, "initial")
        self.max_delay = _seconds(max_delay, "max_delay")
        self.exp_base = float(exp_base)
        self.jitter = _seconds(jitter, "jitter")
        if on is None:
            self._transient: Callable[[BaseException], bool] = is_transient
        elif isinstance(on, type) or (isinstance(on, tuple) and all(isinstance(t, type) for t in on)):
            kinds = on
            self._transient = lambda exc: isinstance(exc, kinds)
        elif callable(on):
            self._transient = on
        else:
            raise TypeError(f"Retry(on={on!r}): expected exception types or a predicate exc -> bool")
        self.on = on

    def __repr__(self) -> str:
        return (f"Retry(attempts={self.attempts}, initial={self.initial}, max_delay={self.max_delay}, "
                f"exp_base={self.exp_base}, jitter={self.jitter})")

    def transient(self, exc: BaseException) -> bool:
        """Whether ``exc`` is worth another attempt."""
        if isinstance(exc, LoomcError) and self.on is None:
            return False
        return bool(self._transient(exc))

    def wait(self, retry_number: int, exc: BaseException | None = None) -> float:
        """Seconds to wait before retry number ``retry_number`` (1 for the first retry).

        tenacity's ``wait_exponential_jitter``; a longer ``Retry-After`` from the server wins
        (still capped at ``max_delay``).
        """
        from tenacity import RetryCallState, wait_exponential_jitter

        state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]  # waits read attempt_number only
        state.attempt_number = retry_number
        wait = wait_exponential_jitter(multiplier=self.initial, max=self.max_delay, exp_base=self.exp_base, jitter=self.jitter)
        delay = float(wait(state))
        hint = _retry_after(exc) if exc is not None else None
        if hint is not None and hint > delay:
            delay = min(hint, self.max_delay)
        return delay

    def decide(
        self,
        exc: BaseException,
        failed: int,
        *,
        usd_left: float | None = None,
        step_estimate: float = 0.0,
        wall_left: float | None = None,
    ) -> RetryDecision:
        """After ``failed`` failed attempts of a step: wait and retry, or give up.

        Args:
            exc: the error of the last attempt.
            failed: attempts made so far in this step (>= 1).
            usd_left: money the run (and its ancestors) can still spend; ``None``: no cap.
            step_estimate: what one attempt is expected to cost.
            wall_left: wall-clock seconds the run has left; ``None``: no limit.
        """
        if failed >= self.attempts or not self.transient(exc):
            return RetryDecision(None, None)
        what = _describe(exc)
        if usd_left is not None and step_estimate > usd_left + 1e-12:
            return RetryDecision(None, {"kind": "retry_skipped", "reason": "budget", "error": what,
                                        "usd_left": max(usd_left, 0.0), "estimate_usd": step_estimate})
        delay = self.wait(failed, exc)
        if wall_left is not None and delay >= wall_left:
            return RetryDecision(None, {"kind": "retry_skipped", "reason": "wall_clock", "error": what, "delay_s": delay})
        return RetryDecision(delay, {"kind": "retry", "attempt": failed, "delay_s": delay, "error": what})


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 160 else text[:157] + "..."


def as_retry(value: Any) -> Retry | None:
    """``retry=`` of ``@loop``: ``None``/``False`` (off), ``True`` (defaults), an int (attempts) or a :class:`Retry`."""
    if value is None or value is False:
        return None
    if value is True:
        return Retry()
    if isinstance(value, int) and not isinstance(value, bool):
        return Retry(attempts=value)
    if isinstance(value, Retry):
        return value
    raise TypeError(f"retry={value!r}: expected True, a number of attempts, or loomc.Retry(...)")
