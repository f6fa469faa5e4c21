"""A budget shared by processes: run ledgers whose caps are enforced in the database.

In one process the ledgers of a run tree are objects (``loomc._core.ledger.TreeLedger``)
and a lock keeps every charge under every cap. When runs of one tree are driven by
several processes (workers continuing one tree, graph nodes on other machines), only the
database sees all of them. :class:`StoreLedger` is that ledger, written once against the
store core (``core.reserve_shared``) so every SQL store has it:

- **reserve**: money is held before it is spent, by one conditional ``UPDATE`` of the
  run and every run above it, ``reserved = reserved + amount`` where
  ``cost_usd + reserved + amount <= usd_cap`` on each. Either every run takes it or the
  transaction is rolled back and :class:`~loomc.BudgetExhausted` raised. A ``charge`` is
  held the same way (it is money spent). The hold is a row of the ``holds`` table,
  written with the writer's lease epoch (a fenced holder cannot add one).
- **settle**: in the transaction of the step's checkpoint. The step's cost is added to
  the run's and its ancestors' ``cost_usd``, its holds deleted and what they held given
  back; a process taken over meanwhile has that commit refused (:class:`~loomc.LeaseLost`),
  so a late settle never lands.
- **a holder that died**: its holds are still in the table when its run is taken over,
  and are charged in full to it (what they held becomes spent).

The in-process tree stays underneath (a run's children in this process see its spending
at once); the database is the authority for the caps. Runs get a :class:`StoreLedger`
when their store has ``shared_budget=True``, or when their parent's ledger is one, such as
the one :func:`open_shared_parent` opens for a run that lives in another process.
"""

from __future__ import annotations

from typing import Any

from loomc._core.budget import Budget
from loomc._core.errors import RunNotFound
from loomc._core.holds import new_hold_id
from loomc._core.ledger import Reservation, RunLedger, TreeLedger

__all__ = ["StoreLedger", "open_shared_parent"]


class StoreLedger(TreeLedger):
    """A run's ledger whose usd caps (its own and every ancestor's) are enforced in the store's database.

    Args:
        store: a store with ``reserve_shared(chain, hold_id, usd)`` (loomc's SQL stores).
        run_id, parent, usd_cap, spent, prepaid, deadline, context: as for :class:`TreeLedger`.
        above: ids of runs above the top of this in-process tree (a run opened with
            :func:`open_shared_parent` whose own parents are in the database only).
    """

    def __init__(self, store: Any, run_id: str, *, above: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(run_id, **kwargs)
        self.store = store
        parent = self.parent
        tail = parent.ids if isinstance(parent, StoreLedger) else tuple(led.run_id for led in parent.chain()) if parent else above
        #: this run and every run above it, innermost first: the rows a hold is checked against
        self.ids: tuple[str, ...] = (run_id, *tail)

    def lineage(self) -> tuple[str, ...]:
        """This run and every run above it, those driven in other processes included."""
        return self.ids

    def _hold(self, usd: float) -> int:
        """Hold ``usd`` in the database against every cap above; the hold's id (to be settled at the commit)."""
        hold_id = new_hold_id()
        self.store.reserve_shared(self.ids, hold_id, usd)
        self.note_durable(hold_id)
        return hold_id

    def charge(self, usd: float, *, enforce: bool = True) -> None:
        """Record ``usd`` spent: held in the database first (refused there if it crosses a cap), then here.

        ``enforce=False`` (money reported after the fact, such as a ``cost_fn``'s) is only
        recorded here; the step's commit adds it to the database's totals.
        """
        if enforce and usd > 0:
            self._hold(usd)
        super().charge(usd, enforce=False)

    def reserve(self, usd: float) -> Reservation:
        """Hold ``usd`` against every cap, here and in the database (the hold is already stored)."""
        hold = super().reserve(usd)
        try:
            hold.hold_id = self._hold(usd) if usd > 0 else None
        except BaseException:
            super().settle(hold, 0.0)
            raise
        return hold

    def refresh(self) -> tuple[float, float, float | None] | None:
        """``(spent, reserved, cap)`` of this run as the database holds them now (every process's share)."""
        view: tuple[float, float, float | None] | None = self.store.shared_view(self.run_id)
        return view


def open_shared_parent(store: Any, run_id: str, *, step: int = 0) -> RunLedger:
    """The ledger of ``run_id``, a run driven elsewhere, for starting children of its step ``step`` here.

    Run a ``@loop`` under it with :func:`loomc._core.seams.run_child` (or ``arun_child``):
    the child is created (or found again) at its ``call_index`` under that step, every
    charge of it is held in the database against its own cap and every cap above it,
    and its commits add its spending to the parent's totals. Processes doing this at
    once share the parent's budget exactly.

    Raises:
        RunNotFound: no such run in ``store``.
    """
    from loomc._core.engine import RunContext

    info = store.get_run(run_id)
    if info is None:
        raise RunNotFound(run_id, where=str(getattr(store, "db_path", store)))
    above: list[str] = []
    up = info.parent_run_id
    while up:
        above.append(up)
        parent = store.get_run(up)
        up = parent.parent_run_id if parent is not None else None
    budget = Budget.from_dict(info.budget)
    ctx = RunContext(run_id, info.name, store, info.parent_run_id, budget, root_run_id=above[-1] if above else run_id)
    ledger = StoreLedger(store, run_id, above=tuple(above), usd_cap=budget.usd, spent=info.cost_usd, context=ctx)
    ctx.ledger = ledger
    ctx.begin_step(step)
    return ledger


def open_ledger(
    store: Any, run_id: str, *, parent: RunLedger | None, usd_cap: float | None, spent: float, prepaid: float,
    deadline: float | None, context: Any,
) -> RunLedger:
    """A store's run ledger (``LedgerStore.open_ledger``): a :class:`StoreLedger` when the store
    has ``shared_budget`` or the parent's ledger is one, else the in-process :class:`TreeLedger`."""
    if store.shared_budget or isinstance(parent, StoreLedger):
        return StoreLedger(store, run_id, parent=parent, usd_cap=usd_cap, spent=spent, prepaid=prepaid,
                           deadline=deadline, context=context)
    return TreeLedger(run_id, parent=parent, usd_cap=usd_cap, spent=spent, prepaid=prepaid, deadline=deadline,
                      context=context)
