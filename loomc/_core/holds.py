"""Durable holds: a reservation written to the store before the call it pays for is sent.

A process can die while an LLM call is in flight: the provider bills the call, but the
step that made it never commits, so its charge would be lost with the process. To keep
the cap honest across crashes, ``reserve`` writes the hold (run, amount) in its own
committed transaction *before* returning, i.e. before the request goes out:

- the step that made it commits: the hold's row is deleted in the same transaction as
  the step row (whose cost already counts what the call really cost);
- the process dies first: the row is still there when the run is resumed, and the
  resume charges it **in full** to the run being resumed (its whole tree is swept), in
  one transaction that also notes the charge in the run's ``meta["held_charges"]``.

A run that records a step's spending without committing a step (a graph storing what its
nodes spent when they were interrupted) drops the holds that spending covers.

A store takes part by having ``put_hold``, ``charge_holds`` and ``drop_holds`` (:class:`HoldStore`);
any other store keeps the in-memory reservations only (nothing is written for them).
"""

from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from loomc._core.ledger import Reservation

__all__ = ["HeldCharge", "HoldStore", "apersist", "charge_record", "new_hold_id", "on_event_loop", "persist", "supports_holds"]

#: The key of ``RunInfo.meta`` under which charged holds are listed.
META_KEY = "held_charges"


@runtime_checkable
class HoldStore(Protocol):
    """What a store needs to make reservations survive a crash (sync; async stores await the same)."""

    def put_hold(self, run_id: str, hold_id: int, usd: float) -> None: ...
    def charge_holds(self, run_id: str) -> HeldCharge | None: ...
    def drop_holds(self, hold_ids: tuple[int, ...]) -> None: ...


@dataclass(frozen=True)
class HeldCharge:
    """Holds found when a run was resumed, now charged in full to it."""

    usd: float
    holds: int
    at: str

    def record(self) -> dict[str, Any]:
        """The note kept in the run's ``meta["held_charges"]`` (``loomc show`` prints it)."""
        return {"usd": self.usd, "holds": self.holds, "at": self.at}


def charge_record(meta: dict[str, Any] | None, charge: HeldCharge) -> dict[str, Any]:
    """``meta`` with ``charge`` appended to its held charges (a new dict)."""
    out = dict(meta or {})
    out[META_KEY] = [*out.get(META_KEY, []), charge.record()]
    return out


def supports_holds(store: Any) -> bool:
    """Whether ``store`` keeps durable holds (a store of the user's own may not: then none are written)."""
    return isinstance(store, HoldStore)


def new_hold_id() -> int:
    """A hold id chosen by the writer (so an async writer knows it before the row lands)."""
    return secrets.randbits(62) + 1


def on_event_loop() -> bool:
    """True on a thread running an asyncio or trio event loop (a blocking write would stall it)."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            return True
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            return False
        return True
    return False


def _target(hold: Reservation) -> tuple[Any, str] | None:
    """The store and run a reservation's hold is written for (``None``: nothing to write)."""
    ledger = hold.ledger
    if ledger is None or hold.hold_id is not None or hold.settled is not None:
        return None
    store = getattr(ledger.context, "store", None)
    if store is None or not supports_holds(store):
        return None
    return store, ledger.run_id


def persist(hold: Reservation) -> None:
    """Write ``hold`` to its run's store and wait for the commit (sync stores only).

    On failure the reservation is released and the error raised: the call must not be sent.
    """
    target = _target(hold)
    if target is None:
        return
    store, run_id = target
    if getattr(store, "is_async", False):
        return  # a store of the user's own that only has an async face: see ``apersist``
    hold_id = new_hold_id()
    try:
        store.put_hold(run_id, hold_id, hold.usd)
    except BaseException:
        hold.release()
        raise
    _written(hold, hold_id)


async def apersist(hold: Reservation) -> None:
    """Write ``hold`` to its run's store, awaiting the commit without blocking the event loop."""
    target = _target(hold)
    if target is None:
        return
    from loomc.store.sqlite.aio import async_twin

    store, run_id = target
    hold_id = new_hold_id()
    try:
        await async_twin(store).put_hold(run_id, hold_id, hold.usd)
    except BaseException:
        hold.release()
        raise
    _written(hold, hold_id)


def _written(hold: Reservation, hold_id: int) -> None:
    hold.hold_id = hold_id
    if hold.ledger is not None:
        hold.ledger.note_durable(hold_id)
