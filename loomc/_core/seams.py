"""What an orchestrator (``orchestration``'s graph, an executor) uses of loomc: named seams.

A graph run is a run that hosts other loops' runs: its ledger is the parent of every
node's run, its "step 0" is where the nodes start, its row keeps their total. Instead of
reaching into the engine's globals, the graph layer goes through this module only:

- the run's row and lease: :func:`new_top_run`, :func:`claim`, :func:`owner_token`,
  :func:`open_store`, :func:`async_twin` (the store's async face);
- its ledger: :func:`open_host_ledger` (through the same :func:`~loomc._core.ledger.ledger_factory`
  as every run, so a store-backed shared ledger applies to graphs too; ``shared=True`` when
  its children run in other processes), :func:`has_room` (:func:`stored_room` as the
  database sees it), and the :class:`~loomc._core.ledger.RunLedger` methods
  (``spent``, ``expire``, ``take_durable``...);
- its children: :func:`run_child` / :func:`arun_child` run a ``@loop`` as the child at a
  fixed place under the host, with the host's ledger current (a map node's step runs its
  items the same way, under :func:`current_ledger`, the map node run's own);
- what the store keeps of the money: :func:`charge_left_holds` at a resume,
  :func:`store_spent` when the attempt ends;
- a run that lives in another process: :func:`open_shared_parent` opens its ledger here
  (caps enforced in the database, ``loomc.store.shared``), so :func:`run_child` can run
  a child of it in this process (an executor running a graph's node on another machine);
- who watches it: :func:`watch_host` (event callbacks and spans; its children inherit them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from loomc._core.budget import Budget
from loomc._core.context import current_ledger, running_under
from loomc._core.engine import RunContext
from loomc._core.holds import charge_record, supports_holds
from loomc._core.ledger import RunLedger, ledger_factory
from loomc._core.observe import RunEvent, RunWatch, watch_run
from loomc._core.policy import EPS
from loomc._core.types import RunInfo, RunResult
from loomc.store import codec
from loomc.store.lease import Claim, claim, owner_token
from loomc.store.shared import StoreLedger, open_shared_parent
from loomc.store.sqlite.aio import async_twin
from loomc.store.sqlite.sync import MemoryStore, NewRun, new_run_id, open_store

__all__ = [
    "Claim", "MemoryStore", "NewRun", "RunLedger", "arun_child", "async_twin", "charge_left_holds", "claim",
    "current_ledger", "has_room",
    "new_top_run", "open_host_ledger", "open_shared_parent", "open_store", "owner_token", "run_child", "running_under",
    "store_spent", "stored_room", "watch_host",
]


def new_top_run(
    *, name: str, kind: str, spec_hash: str, state: Any, budget: Budget, meta: dict[str, Any], owner: str
) -> NewRun:
    """The row of a new top-level run starting from ``state`` (its id chosen here)."""
    return NewRun(
        spec_hash=spec_hash, name=name, kind=kind, run_id=new_run_id(), state_type=codec.type_ref(state),
        input_blob=codec.encode(state), budget=budget.to_dict(), meta=meta, owner=owner,
    )


def open_host_ledger(
    run_id: str, name: str, store: Any, budget: Budget, *, spent: float, prepaid: float, deadline: float | None,
    shared: bool = False,
) -> RunLedger:
    """The ledger of a run whose children start in its step 0 (a graph run), that step open.

    Args:
        run_id: the host run.
        name: its name (what ``loomc.current_run()`` reports).
        store: its store (children write there too).
        budget: its limits; ``usd`` caps the sum of all its children.
        spent: what its tree had spent before this attempt.
        prepaid: of ``spent``, what its re-found children will carry again.
        deadline: when its wall clock runs out (``time.monotonic()``).
        shared: its caps enforced in the database whatever the store's ``shared_budget``
            (its children run in other processes: an executor's workers).
    """
    ctx = RunContext(run_id, name, store, None, budget)
    factory: Any = StoreLedger if shared else ledger_factory(store)
    args = (store, run_id) if shared else (run_id,)
    ledger: RunLedger = factory(
        *args, parent=None, usd_cap=budget.usd, spent=spent, prepaid=prepaid, deadline=deadline, context=ctx
    )
    ctx.ledger = ledger
    ctx.begin_step(0)
    return ledger


def has_room(ledger: RunLedger, now: float) -> bool:
    """Whether a new child may start: money and wall time left on ``ledger`` and every enclosing run."""
    room = ledger.headroom(now, include_self=True)
    if room.wall_s is not None and room.wall_s <= 0:
        return False
    return not (room.usd is not None and room.usd <= EPS)


def stored_room(store: Any, ledger: RunLedger, now: float) -> bool:
    """:func:`has_room` as the database sees it: money left on ``ledger``'s run and every run above it.

    For a run whose children spend in other processes (their holds and commits are in the
    database, not in this process's ledgers). A store without a shared budget answers as
    :func:`has_room`.
    """
    if not has_room(ledger, now):
        return False
    view_of = getattr(store, "shared_view", None)
    if not callable(view_of):
        return True
    for run_id in ledger.lineage():
        view = view_of(run_id)
        if view is not None:
            spent, reserved, cap = view
            if cap is not None and spent + reserved >= cap - EPS:
                return False
    return True


def run_child(
    runner: Any, ledger: RunLedger, state: Any, *, call_index: int, meta: dict[str, Any],
    budget: Budget | None = None, kind: str = "node",
) -> RunResult:
    """Run (or resume) the sync ``@loop`` ``runner`` as the child at ``call_index`` of ``ledger``'s run.

    Call it in the thread that should run the child (a worker thread for a graph).
    ``budget`` replaces the limits of a child that resumes; ``kind`` is stored with a new
    child (``node`` for a graph's node, ``item`` for one item of a map node).
    A completed child is not run again: its stored result is returned.
    """
    with running_under(ledger):
        result: RunResult = runner._run_child(state, call_index=call_index, kind=kind, meta=meta, budget=budget)
    return result


async def arun_child(
    runner: Any, ledger: RunLedger, state: Any, *, call_index: int, meta: dict[str, Any],
    budget: Budget | None = None, kind: str = "node",
) -> RunResult:
    """:func:`run_child` for an async ``@loop``."""
    with running_under(ledger):
        result: RunResult = await runner._run_child(state, call_index=call_index, kind=kind, meta=meta, budget=budget)
    return result


async def charge_left_holds(astore: Any, store: Any, run_id: str, info: RunInfo) -> tuple[RunInfo, float]:
    """Charge holds left in the store by calls in flight when a process died; ``info`` noted, and their total."""
    held = await astore.charge_holds(run_id) if supports_holds(store) else None
    if held is None:
        return info, 0.0
    return replace(info, meta=charge_record(info.meta, held)), held.usd


async def store_spent(astore: Any, store: Any, ledger: RunLedger) -> None:
    """Make the run's stored total hold all its ledger counts once its children have stopped.

    Children's commits raise the stored total as they go; this adds what was spent but
    never committed (a step cut short) and drops the stored holds that spending covers.
    A stored total above the ledger's is kept: children in other processes raised it
    (their spending reaches this ledger only when they report back).
    """
    info = await astore.get_run(ledger.run_id)
    delta = round(ledger.spent - (info.cost_usd if info is not None else 0.0), 12)
    if delta > EPS:
        await astore.add_cost(ledger.run_id, delta)
    held = ledger.take_durable()
    if held and supports_holds(store):
        await astore.drop_holds(held)


def watch_host(
    ledger: RunLedger, *, kind: str, resumed: bool, on_step: Callable[[RunEvent], Any] | None,
    observers: tuple[Callable[[RunEvent], Any], ...],
) -> RunWatch | None:
    """Tell the watchers of a host run (a graph) that it started; ``None`` when nothing watches it.

    Its children (the node runs) are watched by the same callbacks. The caller makes the
    run's span current while children start (``watch.attach()``) and ends the run with
    ``watch.finished(...)``.
    """
    ctx = ledger.context
    watch = watch_run(ctx, kind, resumed, 0, None, on_step, observers)
    if watch is not None:
        ctx.watch = watch
        watch.started(0)
    return watch
