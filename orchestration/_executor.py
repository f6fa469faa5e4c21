"""The executor seam: where a graph's nodes and a map node's items run.

By default a graph runs its nodes in its own process (worker threads, the event loop).
An *executor* runs them elsewhere: each node run, and each item of a map node, becomes
one :class:`Unit` — a self-contained piece of work named by its place in the run tree
(parent run, step, call index), its input state (encoded as the store keeps it), the
limits it resumes with, where the store is (:class:`StoreAddress`) and the ``@loop`` to
run. Nothing of it is pickled into the database: the engine carries the unit to a worker,
which calls :func:`run_unit`; the run, its steps and its money are rows of the shared
store, and the worker hands back a small :class:`UnitOutcome`.

An executor is four methods (:class:`Executor`): ``check_store`` (refuse a store its
workers cannot reach, before anything runs), ``open``/``close`` (the engine's session),
``submit`` (a unit, returning the engine's handle) and ``cancel`` (handles), plus
``wait`` (a handle's outcome, awaited on the graph's event loop). :class:`DaskExecutor`
(``orchestration._dask``) is one; another engine plugs in the same way.

What makes a unit safe to run anywhere, any number of times:

- it opens its parent's ledger from the database (``open_shared_parent``): every charge
  is held there against the parent's cap and every cap above it, so all workers share
  the graph's budget exactly;
- it is keyed by its call index: run again (the engine rescheduled it after a worker
  died), it finds its child run and resumes it from its last checkpoint, taking the
  lease over (a new epoch fences the old holder); a completed child returns its result;
- it watches the graph run's row: when the graph stops being ``running`` (cancelled,
  out of budget) the child stops at its next step boundary and records ``interrupted``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import anyio

from loomc import AsyncLoopRunner, Budget, RunResult, RunStatus
from loomc._core.errors import LoomcError, RunLocked
from loomc._core.seams import RunLedger, arun_child, open_shared_parent, run_child, stored_room
from loomc.store import codec
from loomc.store.lease import lease_ttl

__all__ = [
    "Executor", "RemoteRunError", "RemoteRuns", "StoreAddress", "Unit", "UnitCancelled", "UnitLost", "UnitOutcome",
    "run_unit",
]


class RemoteRunError(LoomcError):
    """A node or item that ran on a worker ended with an error (its type and message kept as text).

    Attributes:
        type_name: the error's class name on the worker.
        owner: for a budget stop, the run whose cap refused (``None`` otherwise).
    """

    def __init__(self, message: str, *, type_name: str | None = None, owner: str | None = None) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.owner = owner


class UnitLost(LoomcError):
    """The engine gave up on a unit (its workers kept dying); its run stays in the store, a resume finds it."""


class UnitCancelled(UnitLost):
    """The unit was cancelled before it ended (its run, if it started, stops at its next step boundary)."""


@dataclass(frozen=True)
class StoreAddress:
    """How a worker opens the graph's store: its address (a PostgreSQL DSN) and lease length."""

    dsn: str
    lease_ttl: float | None = None

    def open(self) -> Any:
        """This process's store for the address (opened once per process)."""
        key = (self.dsn, self.lease_ttl)
        with _stores_lock:
            store = _stores.get(key)
            if store is None:
                store = _stores[key] = _open_address(self.dsn, self.lease_ttl)
            return store


_stores: dict[tuple[str, float | None], Any] = {}
_stores_lock = threading.Lock()


def _open_address(dsn: str, ttl: float | None) -> Any:
    from loomc.store.postgres.sync import PostgresStore, require_psycopg

    require_psycopg()
    return PostgresStore(dsn, lease_ttl=ttl)


@dataclass(frozen=True)
class Unit:
    """One node run or map item to run on a worker: the child at ``call_index`` of ``parent_run_id``'s ``step``.

    ``state`` is the input as the store encodes it (``codec.encode``) with its ``state_type``;
    ``budget`` the limits of a child that resumes with new ones; ``deadline`` the graph's
    wall-clock end as a Unix time (``None``: none); ``resources`` the engine's resource
    requirements (Dask: ``{"GPU": 1}``).
    """

    key: str
    store: StoreAddress
    graph_run_id: str
    parent_run_id: str
    step: int
    call_index: int
    kind: str
    runner: Any
    state: str | bytes
    state_type: Any
    meta: dict[str, Any]
    budget: dict[str, Any] | None = None
    deadline: float | None = None
    resources: dict[str, float] | None = None


@dataclass(frozen=True)
class UnitOutcome:
    """What a worker hands back: the child run's id and how it ended (``run_id`` ``None``: not started, no room)."""

    run_id: str | None
    status: str
    state: str | bytes | None = None
    state_type: Any = None
    steps: int = 0
    cost_usd: float = 0.0
    stop_reason: str | None = None
    error: str | None = None
    error_type: str | None = None
    error_owner: str | None = None

    def result(self) -> RunResult:
        """As the engine's :class:`RunResult` (the error, if any, as :class:`RemoteRunError`)."""
        assert self.run_id is not None
        err = None
        if self.error is not None:
            err = RemoteRunError(self.error, type_name=self.error_type, owner=self.error_owner)
        state = codec.decode(self.state, self.state_type) if self.state is not None else None
        return RunResult(self.run_id, RunStatus(self.status), state, self.steps, self.cost_usd,
                         stop_reason=self.stop_reason, error=err)


#: How often a running unit reads its graph run's status (seconds).
WATCH_EVERY_S = 0.5


def run_unit(unit: Unit) -> UnitOutcome:
    """Run (or resume) one unit in this process: the function an executor's workers call.

    Opens the store, the parent's ledger from the database, and runs the unit's loop as
    the child at its call index. A child whose lease another live process holds is
    waited for (the engine may run a unit again while its first attempt still finishes,
    or before a dead worker's lease expires). A unit whose child does not exist yet and
    for which no money or time is left does not start.
    """
    store = unit.store.open()
    give_up = time.monotonic() + 3 * lease_ttl(store) + 5.0
    while True:
        parent = open_shared_parent(store, unit.parent_run_id, step=unit.step)
        if unit.deadline is not None:
            parent_deadline = time.monotonic() + (unit.deadline - time.time())
            led: Any = parent
            led.deadline = parent_deadline
        if store.find_child(unit.parent_run_id, unit.step, unit.call_index) is None and not stored_room(
            store, parent, time.monotonic()
        ):
            return UnitOutcome(None, RunStatus.BUDGET_EXHAUSTED.value, stop_reason="no room to start")
        try:
            with _GraphWatch(store, unit.graph_run_id, parent) as watch:
                result = _run(unit, parent)
        except RunLocked:
            if time.monotonic() > give_up:
                raise
            time.sleep(min(1.0, lease_ttl(store) / 4))
            continue
        if watch.stopped and result.status is RunStatus.BUDGET_EXHAUSTED:
            # stopped because the graph was cancelled, not by a budget
            store.finish_run(result.run_id, RunStatus.INTERRUPTED, "interrupted", 0.0)
            result.status, result.stop_reason = RunStatus.INTERRUPTED, "interrupted"
        return _outcome(result)


def _run(unit: Unit, parent: RunLedger) -> RunResult:
    state = codec.decode(unit.state, unit.state_type)
    budget = Budget.from_dict(unit.budget) if unit.budget is not None else None
    kw: dict[str, Any] = {"call_index": unit.call_index, "meta": unit.meta, "budget": budget, "kind": unit.kind}
    if isinstance(unit.runner, AsyncLoopRunner):
        async def main() -> RunResult:
            return await arun_child(unit.runner, parent, state, **kw)

        return anyio.run(main)
    return run_child(unit.runner, parent, state, **kw)


def _outcome(result: RunResult) -> UnitOutcome:
    err = result.error
    return UnitOutcome(
        result.run_id, result.status.value, codec.encode(result.state), codec.type_ref(result.state), result.steps,
        result.cost_usd, result.stop_reason,
        None if err is None else f"{type(err).__name__}: {err}",
        None if err is None else type(err).__name__,
        getattr(err, "owner", None) if err is not None else None,
    )


class _GraphWatch:
    """While a unit runs: stop it (its parent's ledger expired) once the graph run is no longer ``running``."""

    def __init__(self, store: Any, graph_run_id: str, parent: RunLedger) -> None:
        self.store, self.graph_run_id, self.parent = store, graph_run_id, parent
        self.stopped = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="loomc-unit-watch", daemon=True)

    def __enter__(self) -> _GraphWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._done.wait(WATCH_EVERY_S):
            try:
                info = self.store.get_run(self.graph_run_id)
            except Exception:  # noqa: BLE001, S112 - a failed read is tried again at the next tick
                continue
            if info is None or info.status is not RunStatus.RUNNING:
                self.stopped = True
                self.parent.expire()
                return


@runtime_checkable
class Executor(Protocol):
    """Where a graph's units run (the seam an engine implements; see the module's docstring)."""

    def check_store(self, store: Any) -> StoreAddress:
        """The address workers open ``store`` by; raise (``LoomcError``: what and how to fix) if they cannot."""
        ...

    def open(self) -> None:
        """Start (or connect to) the engine; called in a worker thread before the first submit."""
        ...

    def close(self) -> None:
        """Let go of what :meth:`open` started (a later :meth:`open` starts again)."""
        ...

    def submit(self, unit: Unit) -> Any:
        """Hand ``unit`` to the engine (it calls :func:`run_unit` on a worker); the engine's handle."""
        ...

    def cancel(self, handles: Sequence[Any]) -> None:
        """Cancel units not finished (one already running stops at its next step boundary through the store)."""
        ...

    def wait(self, handle: Any) -> Awaitable[UnitOutcome]:
        """The unit's outcome, awaited on the graph's event loop.

        Raises:
            UnitCancelled: the unit was cancelled.
            UnitLost: the engine gave up on it.
        """
        ...


@dataclass
class RemoteRuns:
    """The graph's side of an executor: submits units, carries their spending into the local ledgers, cancels."""

    executor: Executor
    address: StoreAddress
    graph_run_id: str
    on_cancel: Callable[[], Awaitable[None]]
    handles: dict[int, Any] = field(default_factory=dict)
    cancelled: bool = False

    async def run(
        self, ledger: RunLedger, runner: Any, state: Any, *, call_index: int, kind: str, meta: dict[str, Any],
        budget: Budget | None, resources: dict[str, float] | None, key: str, group: dict[int, Any] | None = None,
    ) -> RunResult | None:
        """Run the child at ``call_index`` of ``ledger``'s run on a worker; ``None`` when it could not start.

        Its spending is carried into ``ledger`` (and the ledgers above it here) once it ends,
        as a child found again is (the database held it against every cap as it ran).
        """
        ctx = ledger.context
        assert ctx is not None
        deadline = ledger.deadline_in_chain()
        unit = Unit(
            key=key, store=self.address, graph_run_id=self.graph_run_id, parent_run_id=ledger.run_id, step=ctx.step_n,
            call_index=call_index, kind=kind, runner=runner, state=codec.encode(state), state_type=codec.type_ref(state),
            meta=meta, budget=budget.to_dict() if budget is not None else None,
            deadline=None if deadline is None else time.time() + (deadline - time.monotonic()), resources=resources,
        )
        handle = self.executor.submit(unit)
        self.handles[id(handle)] = handle
        if group is not None:
            group[id(handle)] = handle
        try:
            outcome = await self.executor.wait(handle)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self.cancel_all()
            raise
        except UnitCancelled:
            return None
        finally:
            self.handles.pop(id(handle), None)
            if group is not None:
                group.pop(id(handle), None)
        if outcome.run_id is None:
            return None
        paid = ctx.carry(outcome.run_id, outcome.cost_usd)
        if paid:
            ledger.carry(paid)
        ctx.child_paid(outcome.run_id, outcome.cost_usd)
        return outcome.result()

    def cancel(self, group: dict[int, Any]) -> None:
        """Cancel the units of ``group`` not finished yet."""
        if group:
            self.executor.cancel(list(group.values()))

    async def cancel_all(self) -> None:
        """The graph is cancelled: every unit not finished is cancelled, running ones told through the store."""
        if self.cancelled:
            return
        self.cancelled = True
        if self.handles:
            self.executor.cancel(list(self.handles.values()))
        await self.on_cancel()
