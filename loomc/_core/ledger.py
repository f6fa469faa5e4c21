"""The budget ledger seam: what the engine asks of a run's ledger, and the in-process ledger tree.

Every run has a ledger: the money it (and the runs nested in it) spent and reserved, its
cap, its wall-clock deadline. The engine talks to it only through :class:`RunLedger`
and makes it only through :func:`ledger_factory`::

    engine ──ledger_factory(store)(run_id, ...)──► store.open_ledger(run_id, ...)  (a LedgerStore)
                                              └──► TreeLedger(run_id, ...)          (any other store)

:class:`TreeLedger` is the in-process implementation, the fast path loomc's stores use by
default: a tree of objects in this process (a child run's ledger points at its parent's),
all guarded by one lock, so a charge checks and updates every ancestor at once and
concurrent charges never together cross a cap. ``loomc.store.shared.StoreLedger`` extends
it for runs of one tree in several processes (``shared_budget=True``).

Where a store-backed ledger plugs in: a store whose runs share a budget across
processes (PostgreSQL: reserve with a conditional ``UPDATE ... WHERE spent + reserved +
amount <= cap``, settle in the step's transaction) implements :class:`LedgerStore`,
i.e. an ``open_ledger`` method with :class:`LedgerFactory`'s arguments returning its
own :class:`RunLedger`. The engine, the drivers and the graph layer then use that
ledger unchanged: nothing else needs to know.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from loomc._core.errors import BudgetExhausted
from loomc._core.money import check_usd
from loomc._core.policy import EPS, Headroom

__all__ = ["LedgerFactory", "LedgerStore", "Reservation", "RunLedger", "TreeLedger", "ledger_factory"]

# One lock for every TreeLedger of the process: a charge reads and writes a whole chain.
_lock = threading.RLock()
_NO_LIMITS = Headroom()


class RunLedger(Protocol):
    """What the engine needs from the ledger of one run (its descendants' spending included).

    Amounts are USD, already checked finite and >= 0 where they entered loomc. Deadlines
    are ``time.monotonic()`` values.
    """

    @property
    def run_id(self) -> str:
        """The run this ledger counts for."""
        ...

    @property
    def context(self) -> Any:
        """The engine's live run context (``RunContext``), or ``None`` for a bare ledger."""
        ...

    @property
    def spent(self) -> float:
        """Spent so far by the run and its descendants (a resumed run's stored total included)."""
        ...

    @property
    def prepaid(self) -> float:
        """Of ``spent``, what re-found children of an interrupted step will still :meth:`carry`."""
        ...

    @property
    def deadline(self) -> float | None:
        """When the run's own wall clock runs out (``None``: no wall-clock limit)."""
        ...

    def chain(self) -> Iterator[RunLedger]:
        """This ledger and those of the enclosing runs, innermost first."""
        ...

    def lineage(self) -> tuple[str, ...]:
        """The ids of this run and of every run above it, innermost first (in this process or not)."""
        ...

    def deadline_in_chain(self) -> float | None:
        """The earliest deadline of this run and the enclosing runs."""
        ...

    def headroom(self, now: float, *, include_self: bool = False) -> Headroom:
        """The tightest usd and wall time left among the enclosing runs (and this one if asked)."""
        ...

    def available(self) -> float | None:
        """The most this run could charge right now (``None``: no cap anywhere)."""
        ...

    def charge(self, usd: float, *, enforce: bool = True) -> None:
        """Record ``usd`` spent; with ``enforce``, refuse (:class:`BudgetExhausted`) what would cross a cap."""
        ...

    def carry(self, usd: float) -> None:
        """Count a re-found child's earlier spending, taking from ``prepaid`` first; never refused."""
        ...

    def reserve(self, usd: float) -> Reservation:
        """Hold ``usd`` against every cap until settled (:class:`BudgetExhausted` if it cannot fit)."""
        ...

    def settle(self, hold: Reservation, actual: float) -> None:
        """Replace ``hold`` by what the call really cost (only its first settle counts)."""
        ...

    def settle_open(self) -> float:
        """Settle the holds the step left open at their full amount; return their total."""
        ...

    def hold_step(self, usd: float) -> BudgetExhausted | None:
        """Hold the next step's estimate against the enclosing runs' caps; the refusal if it cannot."""
        ...

    def release_step(self) -> None:
        """Give back what is left of the step's hold."""
        ...

    def expire(self) -> None:
        """End the run's wall clock now: the run and those below it stop at their next step boundary."""
        ...

    def note_durable(self, hold_id: int) -> None:
        """Remember a hold written to the store (``loomc._core.holds``), here and on every ancestor."""
        ...

    def take_durable(self) -> tuple[int, ...] | None:
        """The ids of the stored holds the run's next commit deletes (and forget them here)."""
        ...

    def forget_durable(self, ids: tuple[int, ...]) -> None:
        """Holds this run's commit deleted: the ancestors' commits need not delete them again."""
        ...


class LedgerFactory(Protocol):
    """Makes the ledger of one run; the keyword arguments are :class:`TreeLedger`'s (see there)."""

    def __call__(
        self, run_id: str, *, parent: RunLedger | None, usd_cap: float | None, spent: float, prepaid: float,
        deadline: float | None, context: Any,
    ) -> RunLedger: ...


@runtime_checkable
class LedgerStore(Protocol):
    """A store that makes its runs' ledgers itself (e.g. a budget shared by processes in the database)."""

    @property
    def open_ledger(self) -> LedgerFactory:
        """The factory of this store's ledgers (a method with :class:`LedgerFactory`'s signature)."""
        ...


# Whether a store class is a LedgerStore: a Protocol isinstance check costs microseconds, and
# a nested loop opens a run (and a ledger) in every step of its parent.
_makes_ledgers: dict[type, bool] = {}


def ledger_factory(store: Any) -> LedgerFactory:
    """How a run of ``store`` gets its ledger: the store's own if it is a :class:`LedgerStore`, else :class:`TreeLedger`.

    The engine and the graph layer make every run's ledger through this, once per run.
    Whether a store makes its ledgers is decided once per store class.
    """
    kind = type(store)
    own = _makes_ledgers.get(kind)
    if own is None:
        own = _makes_ledgers[kind] = isinstance(store, LedgerStore)
    return store.open_ledger if own else TreeLedger  # type: ignore[no-any-return]


class TreeLedger:
    """The in-process ledger tree: money spent and reserved by one run, its descendants included.

    Args:
        run_id: the run.
        parent: the ledger of the enclosing run (``None`` for a top-level run).
        usd_cap: the run's own usd limit.
        spent: what the run had spent before this attempt (its stored total).
        prepaid: of ``spent``, what children of its interrupted step spent (they carry it again).
        deadline: when the run's wall clock runs out (``time.monotonic()``).
        context: the engine's live run context (``RunContext``).
    """

    def __init__(
        self,
        run_id: str,
        *,
        parent: RunLedger | None = None,
        usd_cap: float | None = None,
        spent: float = 0.0,
        prepaid: float = 0.0,
        deadline: float | None = None,
        context: Any = None,
    ) -> None:
        if parent is not None and not isinstance(parent, TreeLedger):
            raise TypeError(f"a TreeLedger nests only in a TreeLedger, not in {type(parent).__name__}")
        self.run_id = run_id
        self.parent: TreeLedger | None = parent
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
        self.prepaid = prepaid
        # Ids of holds written to the store (``loomc._core.holds``) by this run or a run below it
        # since this run's last commit; its next commit deletes them. None: none (the common case).
        self.durable: set[int] | None = None

    @property
    def total_cost_usd(self) -> float:
        """Spent so far, nested runs included (loomc 0.3.0 name)."""
        return self.spent

    def chain(self) -> Iterator[TreeLedger]:
        """This ledger and its ancestors, innermost first."""
        node: TreeLedger | None = self
        while node is not None:
            yield node
            node = node.parent

    def lineage(self) -> tuple[str, ...]:
        """The ids of this run and its ancestors, innermost first (a committed step raises their totals)."""
        return tuple(led.run_id for led in self.chain())

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

    def _draws(self, usd: float) -> tuple[list[TreeLedger], list[float], list[float]]:
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

    def _refuse(self, usd: float, chain: list[TreeLedger], covered: list[float]) -> BudgetExhausted | None:
        for led, cov in zip(chain, covered, strict=True):
            if led.usd_cap is not None and led.spent + led.reserved - cov + usd > led.usd_cap + EPS:
                return BudgetExhausted(
                    "usd", led.spent, led.usd_cap, run_id=self.run_id, owner=led.run_id,
                    requested=usd, state=None,
                )
        return None

    @staticmethod
    def _consume(chain: list[TreeLedger], covered: list[float], takes: list[float]) -> None:
        for led, cov, take in zip(chain, covered, takes, strict=True):
            if cov:
                led.reserved = round(led.reserved - cov, 12)
            if take:
                led.step_hold = round(led.step_hold - take, 12)

    def _admit(self, usd: float, *, enforce: bool) -> list[TreeLedger]:
        """The chain ``usd`` is about to go on (under ``_lock``), step holds it passes through drawn down.

        With ``enforce``, raises :class:`BudgetExhausted` first (changing nothing) if it would cross a cap.
        """
        chain, covered, takes = self._draws(usd)
        if enforce:
            err = self._refuse(usd, chain, covered)
            if err is not None:
                raise err
        self._consume(chain, covered, takes)
        return chain

    def charge(self, usd: float, *, enforce: bool = True) -> None:
        """Record ``usd`` spent on this run and every ancestor at once.

        With ``enforce`` (the default) a charge that would cross any cap is refused
        with :class:`BudgetExhausted` and nothing is recorded.
        """
        with _lock:
            for led in self._admit(usd, enforce=enforce and usd > 0):
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
            for led in self._admit(usd, enforce=True):
                led.reserved = round(led.reserved + usd, 12)
            hold = Reservation(self, usd)
            self.holds.add(hold)
        return hold

    def settle(self, hold: Reservation, actual: float) -> None:
        """Replace ``hold`` by ``actual`` on this run and every ancestor (only the first settle counts)."""
        with _lock:
            if hold.settled is not None:
                return
            hold.settled = actual
            self.holds.discard(hold)
            for led in self.chain():
                led.reserved = round(led.reserved - hold.usd, 12)
                led.spent = round(led.spent + actual, 12)

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

    def expire(self) -> None:
        """End this run's wall clock now (runs below it stop at their next step boundary)."""
        with _lock:
            self.deadline = float("-inf")

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
            self.settle(hold, hold.usd)
        return sum(h.usd for h in holds)


class Reservation:
    """Money held against the caps before a call; ``settle(actual)`` records what it cost.

    As a context manager: leaving the block without ``settle`` records the full amount
    (never under-count); leaving it with an exception releases it.
    """

    def __init__(self, ledger: RunLedger | None, usd: float) -> None:
        self.ledger = ledger
        self.usd = usd
        self.settled: float | None = None
        self.hold_id: int | None = None  # set once the hold is written to the run's store

    def settle(self, actual: float) -> None:
        """Replace the reservation by the real cost (recorded even if it exceeds the hold)."""
        actual = check_usd(actual, "the amount given to Reservation.settle")
        if self.ledger is not None:
            self.ledger.settle(self, actual)
        elif self.settled is None:  # outside a run: inert
            self.settled = actual

    def release(self) -> None:
        """Give the reservation back: nothing was spent."""
        self.settle(0.0)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.settled is None:
            self.settle(0.0 if exc_type is not None else self.usd)
