"""The run context: which run's ledger is current here, and ``charge``/``reserve`` into it.

A ``ContextVar`` holds the ledger (:class:`~loomc._core.ledger.RunLedger`) of the run
whose step is executing. The ledger is a mutable object that knows its enclosing runs,
so a child run started in a worker thread or a task (which sees a *copy* of the
context) still charges the very same ledgers as its parent.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from loomc._core.errors import LoomcError, RunContextLost
from loomc._core.ledger import Reservation, RunLedger
from loomc._core.money import check_usd

__all__ = [
    "Reservation", "RunView", "areserve", "charge", "current_ledger", "current_run", "reserve", "running_under",
    "steps_in_flight", "with_run_context",
]

P = ParamSpec("P")
R = TypeVar("R")

# The ledger of the run whose step is executing in this context (None outside runs): the
# current run's, which is the parent of any loop the step starts. loomc 0.3.0 exposed it as
# ``loomc.loop._parent_ledger`` (still importable there). The engine sets it around a step
# directly (the hot path); everything else goes through ``running_under``.
_current_ledger: ContextVar[RunLedger | None] = ContextVar("loomc_current_ledger", default=None)


def current_ledger() -> RunLedger | None:
    """The ledger of the run whose step is executing here, if any."""
    return _current_ledger.get()


@contextlib.contextmanager
def running_under(ledger: RunLedger | None) -> Iterator[None]:
    """Make ``ledger`` the current run's for the block: loops started in it are its children.

    What ``charge``/``reserve`` record inside the block goes to ``ledger`` (and its
    enclosing runs). The previous current ledger is back when the block ends.
    """
    token = _current_ledger.set(ledger)
    try:
        yield
    finally:
        _current_ledger.reset(token)


# The steps of this process executing right now (any run, any thread), one entry each:
# the engine appends one when a step starts and pops one when it is over (its call,
# cost_fn and scorer). A charge made with no run in its context while this is not empty
# comes from a thread that lost the step's context: refused, never silently dropped. Only
# that (rare) path reads it. ``list.append``/``list.pop`` are atomic, so the per-step count
# needs no lock (and no function call around it: this is on every step).
steps_in_flight: list[None] = []


def _no_run(what: str) -> None:
    """A charge with no run in its context: a no-op, unless some step is running (lost context)."""
    if steps_in_flight:
        raise RunContextLost(
            f"loomc.{what}() was called with no run in its context while a step is running: it comes from "
            "a thread that does not carry the step's context (a plain threading.Thread or a "
            "concurrent.futures executor), so the money cannot be counted against the run. Wrap the "
            "thread's function: pool.submit(loomc.with_run_context(fn), ...) or "
            "threading.Thread(target=loomc.with_run_context(fn))"
        )


def charge(usd: float) -> None:
    """Record ``usd`` spent by the current step, on its run and every enclosing run.

    A hard cap: a charge that would cross any cap raises :class:`BudgetExhausted`
    (and is not recorded). Outside a run it does nothing.

    Raises:
        BudgetExhausted: the charge would cross a cap of the run or an enclosing run.
        CostError: ``usd`` is not a finite number >= 0.
        RunContextLost: no run in this context while a step of this process is running
            (a thread that does not carry the step's context; see :func:`with_run_context`).
    """
    usd = check_usd(usd, "the amount given to loomc.charge")
    ledger = _current_ledger.get()
    if ledger is not None:
        ledger.charge(usd)
    else:
        _no_run("charge")


def reserve_in_memory(usd: float) -> Reservation:
    """``reserve`` without writing the hold to the store (the caller makes it durable)."""
    usd = check_usd(usd, "the amount given to loomc.reserve")
    ledger = _current_ledger.get()
    if ledger is None:
        _no_run("reserve")
        return Reservation(None, usd)
    return ledger.reserve(usd)


def reserve(usd: float) -> Reservation:
    """Hold ``usd`` (the most a call can cost) against every cap before the call.

    Settle the real cost after the call with ``reservation.settle(actual)``; use it as a
    context manager to settle the full amount (or release it on an exception)
    automatically. Outside a run the reservation is inert.

    In a run whose store keeps holds (loomc's SQLite and memory stores), the hold is
    committed to the store before this returns: if the process dies while the call is
    in flight, resuming the run charges the hold in full. On an event loop thread the
    write would block the loop, so there the hold stays in memory: use
    ``await loomc.areserve(usd)`` in async code.

    Raises:
        BudgetExhausted: ``usd`` cannot fit under a cap of the run or an enclosing run.
        CostError: ``usd`` is not a finite number >= 0.
        RunContextLost: as for :func:`charge`.
        StoreError: the hold could not be written (then nothing is held: do not send the call).
    """
    from loomc._core import holds as _holds

    reservation = reserve_in_memory(usd)
    if reservation.ledger is not None and not _holds.on_event_loop():
        _holds.persist(reservation)
    return reservation


async def areserve(usd: float) -> Reservation:
    """``reserve`` for async code: the hold is committed to the store (awaited) before it returns.

    Raises :class:`BudgetExhausted` if it cannot fit, or :class:`~loomc.StoreError` if the
    hold cannot be written (then nothing is held, and the call must not be sent).
    """
    from loomc._core import holds as _holds

    reservation = reserve_in_memory(usd)
    if reservation.ledger is not None:
        await _holds.apersist(reservation)
    return reservation


def with_run_context(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` made to run in the caller's run context, from any thread.

    A plain ``threading.Thread`` or a ``concurrent.futures`` executor does not carry the
    context of the step that starts it, so ``loomc.charge`` (and a wrapped LLM client, and
    a nested loop) inside it would not know its run. Wrap the function where the step
    hands it over::

        pool.submit(loomc.with_run_context(call_model), prompt)
        threading.Thread(target=loomc.with_run_context(call_model), args=(prompt,))

    The context is captured when ``with_run_context`` is called; each call of the
    returned function runs in its own copy of it (so several threads may call it at
    once). Join such threads before the step returns: money charged after a step ended
    is not part of its cost.

    Args:
        fn: a sync callable (async tasks carry the context already).

    Returns:
        A callable with ``fn``'s signature.

    Raises:
        TypeError: ``fn`` is not callable or is an ``async def`` function.
    """
    if not callable(fn):
        raise TypeError(f"with_run_context({fn!r}): expected a callable")
    if inspect.iscoroutinefunction(fn):
        raise TypeError(
            f"with_run_context({fn!r}): an async function already runs in its task's context; "
            "pass a sync function (for a thread), or await it directly"
        )
    captured = contextvars.copy_context()

    @functools.wraps(fn)
    def in_run_context(*args: P.args, **kwargs: P.kwargs) -> R:
        # A Context can be entered by one thread at a time: each call gets its own copy.
        return captured.copy().run(fn, *args, **kwargs)

    return in_run_context


@dataclass(frozen=True)
class RunView:
    """What user code can learn about the run it executes in (``loomc.current_run()``)."""

    run_id: str
    name: str
    step: int
    parent_run_id: str | None
    usd_spent: float
    usd_remaining: float | None
    iterations_remaining: int | None
    wall_clock_remaining: float | None


def current_run() -> RunView | None:
    """The run whose step is executing here (id, step, remaining budget), or ``None``."""
    ledger = _current_ledger.get()
    if ledger is None or ledger.context is None:
        return None
    view = ledger.context.view()
    if not isinstance(view, RunView):  # pragma: no cover - defensive
        raise LoomcError("run context is not available")
    return view


