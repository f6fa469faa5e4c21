"""The run context: ledgers that roll costs up the run tree, and ``charge``/``reserve``.

A ``ContextVar`` holds the ledger of the run whose step is executing. The ledger is a
mutable object with a parent pointer, so a child run started in a worker thread or a
task (which sees a *copy* of the context) still charges the very same ledgers as its
parent. All ledgers share one lock: a charge checks and updates every ancestor at once,
so concurrent charges can never together cross a cap.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from loomc._core.errors import BudgetExhausted, LoomcError, RunContextLost
from loomc._core.money import check_usd
from loomc._core.policy import EPS, Headroom

__all__ = [
    "Ledger", "Reservation", "RunView", "areserve", "charge", "current_ledger", "current_run", "reserve", "step_ended",
    "step_started", "with_run_context",
]

P = ParamSpec("P")
R = TypeVar("R")

_lock = threading.RLock()
_NO_LIMITS = Headroom()


class Ledger:
    """Money spent and reserved by one run, its descendants included."""

    def __init__(
        self,
        run_id: str,
        *,
        parent: Ledger | None = None,
        usd_cap: float | None = None,
        spent: float = 0.0,
        deadline: float | None = None,
        context: Any = None,
    ) -> None:
        self.run_id = run_id
        self.parent = parent
        self.usd_cap = usd_cap
        self.spent = spent
        self.reserved = 0.0
        self.deadline = deadline  # time.monotonic() value at which the run's wall clock runs out
        self.context = context
        self.holds: set[Reservation] = set()  # open reservations made on this ledger
        # What this run holds against its ancestors' caps for the step in flight (its
        # next-step estimate): spending that passes through it draws the hold down first.
        self.step_hold = 0.0
        # A resumed run's ``spent`` starts at its stored total, which already includes what
        # the children of its uncommitted step spent: re-found children carry from this.
        self.prepaid = 0.0
        # Ids of holds written to the store (``loomc._core.holds``) by this run or a run below it
        # since this run's last commit; its next commit deletes them. None: none (the common case).
        self.durable: set[int] | None = None

    @property
    def total_cost_usd(self) -> float:
        """Spent so far, nested runs included (loomc 0.3.0 name)."""
        return self.spent

    def chain(self) -> Iterator[Ledger]:
        """This ledger and its ancestors, innermost first."""
        node: Ledger | None = self
        while node is not None:
            yield node
            node = node.parent

    def deadline_in_chain(self) -> float | None:
        """The earliest wall-clock deadline (``time.monotonic()``) of this run and its ancestors."""
        deadlines = [led.deadline for led in self.chain() if led.deadline is not None]
        return min(deadlines) if deadlines else None

    def headroom(self, now: float, *, include_self: bool = False) -> Headroom:
        """The tightest remaining usd and wall time among the ancestors (and self if asked)."""
        if self.parent is None and not include_self:
            return _NO_LIMITS
        usd = usd_owner = usd_cap = wall = wall_owner = None
        with _lock:
            for led in self.chain():
                if led is self and not include_self:
                    continue
                if led.usd_cap is not None:
                    left = led.usd_cap - led.spent - led.reserved
                    if usd is None or left < usd:
                        usd, usd_owner, usd_cap = left, led.run_id, led.usd_cap
                if led.deadline is not None:
                    w = led.deadline - now
                    if wall is None or w < wall:
                        wall, wall_owner = w, led.run_id
        return Headroom(usd, usd_owner, usd_cap, wall, wall_owner)

    def _draws(self, usd: float) -> tuple[list[Ledger], list[float], list[float]]:
        """The chain, and for each ledger the part of ``usd`` covered by step holds below it.

        Returns ``(chain, covered, takes)``: ``covered[i]`` is what holders strictly below
        ``chain[i]`` already hold of ``usd`` there; ``takes[i]`` is what ``chain[i]``'s own
        hold contributes (to the ledgers above it).
        """
        chain = list(self.chain())
        covered, takes = [], []
        drawn = 0.0
        for led in chain:
            covered.append(drawn)
            take = min(max(usd - drawn, 0.0), led.step_hold) if led.step_hold > 0 else 0.0
            takes.append(take)
            drawn += take
        return chain, covered, takes

    def _refuse(self, usd: float, chain: list[Ledger], covered: list[float]) -> BudgetExhausted | None:
        for led, cov in zip(chain, covered, strict=True):
            if led.usd_cap is not None and led.spent + led.reserved - cov + usd > led.usd_cap + EPS:
                return BudgetExhausted(
                    "usd", led.spent, led.usd_cap, run_id=self.run_id, owner=led.run_id,
                    requested=usd, state=None,
                )
        return None

    @staticmethod
    def _consume(chain: list[Ledger], covered: list[float], takes: list[float]) -> None:
        for led, cov, take in zip(chain, covered, takes, strict=True):
            if cov:
                led.reserved = round(led.reserved - cov, 12)
            if take:
                led.step_hold = round(led.step_hold - take, 12)

    def charge(self, usd: float, *, enforce: bool = True) -> None:
        """Record ``usd`` spent on this run and every ancestor at once.

        With ``enforce`` (the default) a charge that would cross any cap is refused
        with :class:`BudgetExhausted` and nothing is recorded.
        """
        with _lock:
            chain, covered, takes = self._draws(usd)
            if enforce and usd > 0:
                err = self._refuse(usd, chain, covered)
                if err is not None:
                    raise err
            self._consume(chain, covered, takes)
            for led in chain:
                led.spent = round(led.spent + usd, 12)

    def carry(self, usd: float) -> None:
        """Count a re-found child's earlier spending on this run and its ancestors, once.

        Each ledger in the chain takes ``usd`` from its ``prepaid`` first (spending its
        stored total already holds) and records only the rest. Never refused: the money
        was spent before.
        """
        with _lock:
            for led in self.chain():
                take = min(led.prepaid, usd)
                if take > 0:
                    led.prepaid = round(led.prepaid - take, 12)
                if usd - take > 0:
                    led.spent = round(led.spent + usd - take, 12)

    def reserve(self, usd: float) -> Reservation:
        """Hold ``usd`` against every cap in the chain until settled."""
        with _lock:
            chain, covered, takes = self._draws(usd)
            err = self._refuse(usd, chain, covered)
            if err is not None:
                raise err
            self._consume(chain, covered, takes)
            for led in chain:
                led.reserved = round(led.reserved + usd, 12)
            hold = Reservation(self, usd)
            self.holds.add(hold)
        return hold

    def available(self) -> float | None:
        """The most this run could charge right now: the tightest cap left, its own holds counted."""
        with _lock:
            chain, covered, _ = self._draws(float("inf"))
            left = [
                led.usd_cap - led.spent - led.reserved + cov
                for led, cov in zip(chain, covered, strict=True)
                if led.usd_cap is not None
            ]
        return min(left) if left else None

    def hold_step(self, usd: float) -> BudgetExhausted | None:
        """Hold the next step's estimate against every ancestor's cap (concurrent siblings).

        Returns the refusal instead of raising when an ancestor cannot afford it.
        """
        if usd <= 0 or self.parent is None:
            return None
        with _lock:
            ancestors = list(self.parent.chain())
            err = self._refuse(usd, ancestors, [0.0] * len(ancestors))
            if err is not None:
                return err
            for led in ancestors:
                led.reserved = round(led.reserved + usd, 12)
            self.step_hold = round(self.step_hold + usd, 12)
        return None

    def release_step(self) -> None:
        """Give back what is left of the step's hold."""
        if not self.step_hold:  # the common case (a root run holds nothing): no lock
            return
        with _lock:
            left, self.step_hold = self.step_hold, 0.0
            if left and self.parent is not None:
                for led in self.parent.chain():
                    led.reserved = round(led.reserved - left, 12)

    def note_durable(self, hold_id: int) -> None:
        """Remember a hold written to the store, on this ledger and every ancestor."""
        with _lock:
            for led in self.chain():
                if led.durable is None:
                    led.durable = set()
                led.durable.add(hold_id)

    def take_durable(self) -> tuple[int, ...] | None:
        """The ids of the holds this run's next commit deletes (and forgets them here)."""
        if self.durable is None:  # the common case: nothing was reserved
            return None
        with _lock:
            ids, self.durable = tuple(self.durable), None
        return ids or None

    def forget_durable(self, ids: tuple[int, ...]) -> None:
        """Holds deleted by this run's commit: the ancestors' commits need not delete them again."""
        with _lock:
            node = self.parent
            while node is not None:
                if node.durable:
                    node.durable.difference_update(ids)
                node = node.parent

    def settle_open(self) -> float:
        """Settle the holds a step left open at their full amount (never under-count); their total."""
        if not self.holds:  # the common case: every hold was settled in the step
            return 0.0
        with _lock:
            holds = list(self.holds)
        for hold in holds:
            hold.settle(hold.usd)
        return sum(h.usd for h in holds)


class Reservation:
    """Money held against the caps before a call; ``settle(actual)`` records what it cost.

    As a context manager: leaving the block without ``settle`` records the full amount
    (never under-count); leaving it with an exception releases it.
    """

    def __init__(self, ledger: Ledger | None, usd: float) -> None:
        self.ledger = ledger
        self.usd = usd
        self.settled: float | None = None
        self.hold_id: int | None = None  # set once the hold is written to the run's store

    def settle(self, actual: float) -> None:
        """Replace the reservation by the real cost (recorded even if it exceeds the hold)."""
        actual = check_usd(actual, "the amount given to Reservation.settle")
        with _lock:
            if self.settled is not None:
                return
            self.settled = actual
            if self.ledger is None:
                return
            self.ledger.holds.discard(self)
            for led in self.ledger.chain():
                led.reserved = round(led.reserved - self.usd, 12)
                led.spent = round(led.spent + actual, 12)

    def release(self) -> None:
        """Give the reservation back: nothing was spent."""
        self.settle(0.0)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.settled is None:
            self.settle(0.0 if exc_type is not None else self.usd)


# The ledger of the run whose step is executing in this context (None outside runs).
# loomc 0.3.0 exposed it as ``loomc.loop._parent_ledger``.
_parent_ledger: ContextVar[Ledger | None] = ContextVar("loomc_parent_ledger", default=None)


def current_ledger() -> Ledger | None:
    """The ledger of the run whose step is executing here, if any."""
    return _parent_ledger.get()


# The steps of this process executing right now (any run, any thread), one entry each. A
# charge made with no run in its context while this is not empty comes from a thread that
# lost the step's context: refused, never silently dropped. Only that (rare) path reads it.
# ``list.append``/``list.pop`` are atomic, so the per-step count needs no lock.
_steps_in_flight: list[None] = []


def step_started() -> None:
    """A step (its call, cost_fn and scorer) starts executing in this process."""
    _steps_in_flight.append(None)


def step_ended() -> None:
    """A step counted by :func:`step_started` is over."""
    _steps_in_flight.pop()


def _no_run(what: str) -> None:
    """A charge with no run in its context: a no-op, unless some step is running (lost context)."""
    if _steps_in_flight:
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
    ledger = _parent_ledger.get()
    if ledger is not None:
        ledger.charge(usd)
    else:
        _no_run("charge")


def reserve_in_memory(usd: float) -> Reservation:
    """``reserve`` without writing the hold to the store (the caller makes it durable)."""
    usd = check_usd(usd, "the amount given to loomc.reserve")
    ledger = _parent_ledger.get()
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
    ledger = _parent_ledger.get()
    if ledger is None or ledger.context is None:
        return None
    view = ledger.context.view()
    if not isinstance(view, RunView):  # pragma: no cover - defensive
        raise LoomcError("run context is not available")
    return view


