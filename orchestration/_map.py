"""A map node: one child run of a ``@loop`` per item of a list, in one step of the node's run.

The map node is a node run under the graph (kind ``node``) whose only step runs the
items: item ``i`` is the child run at (node run, step 0, call index ``i``), kind ``item``,
run through the same seam as a graph's nodes (:func:`~loomc._core.seams.run_child` /
:func:`~loomc._core.seams.arun_child`), so each item is a self-contained unit: its key,
its input, the ledger it charges into, its store.

When the items cannot all finish (one failed under ``on_item_error="fail"``, or the
graph's budget ran out), the step ends with :class:`MapHalt` instead of an error: no
step is committed, so the next attempt runs step 0 again and finds each item at the
same place — a completed item returns its stored result without running, an unfinished
one resumes from its own checkpoint, one never started starts.
"""

from __future__ import annotations

import functools
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

import anyio

from loomc import AsyncLoopRunner, LoopRunner, RunResult, RunStatus, loop, predicate
from loomc._core.seams import arun_child, current_ledger, has_room, run_child

__all__ = ["ItemCounts", "MapHalt", "MapSpec", "item_progress", "item_remote", "map_runner"]

OnItemError = Literal["fail", "skip"]

#: ``report(done, total)`` as a map node's items finish (set by the graph for live progress).
item_progress: ContextVar[Any] = ContextVar("loomc_map_item_progress", default=None)

#: ``(RemoteRuns, resources)`` when the graph runs its units on an executor: items run there.
item_remote: ContextVar[Any] = ContextVar("loomc_map_item_remote", default=(None, None))


@dataclass(frozen=True)
class ItemCounts:
    """How a map node's items stand: ``done`` (completed, or out of their own budget with a
    last state), ``failed`` (failed or stalled), ``pending`` (not started or not finished)."""

    total: int
    done: int = 0
    failed: int = 0

    @property
    def pending(self) -> int:
        """Items not started, or stopped by the graph's budget before they finished."""
        return self.total - self.done - self.failed

    def to_dict(self) -> dict[str, int]:
        """As stored in the map node run's ``meta.items``."""
        return {"total": self.total, "done": self.done, "failed": self.failed, "pending": self.pending}

    @classmethod
    def from_dict(cls, data: Any) -> ItemCounts | None:
        """From ``meta.items`` (``None`` when absent or malformed)."""
        if not isinstance(data, dict):
            return None
        try:
            return cls(int(data["total"]), int(data.get("done", 0)), int(data.get("failed", 0)))
        except (KeyError, TypeError, ValueError):
            return None

    def __str__(self) -> str:
        text = f"{self.done}/{self.total} items"
        if self.failed:
            text += f", {self.failed} failed"
        if self.pending:
            text += f", {self.pending} pending"
        return text


@dataclass(frozen=True)
class MapSpec:
    """What ``Graph.map`` was given."""

    item: Any  # the item loop: LoopRunner | AsyncLoopRunner
    over: Any  # over(upstream_state, graph_input) -> list
    max_concurrency: int | None
    on_item_error: OnItemError


class MapHalt(BaseException):
    """The map step stops without a result (an item failed, or the graph's budget ran out).

    A ``BaseException`` so the engine commits no step for it (it records the node run
    ``interrupted``; the graph then writes the real status): a later attempt re-runs
    step 0 and finds every item where it was.
    """

    def __init__(self, run_id: str, status: RunStatus, reason: str, error: BaseException | None, counts: ItemCounts):
        super().__init__(reason)
        self.run_id, self.status, self.reason, self.error, self.counts = run_id, status, reason, error, counts


def map_runner(node: str, graph: str, spec: MapSpec) -> AsyncLoopRunner:
    """The node's loop: one step that runs every item and returns their final states in order."""
    item_name = str(spec.item.spec.name)

    async def map_items(items: list[Any]) -> list[Any]:
        return await _run_items(node, graph, spec, items)

    runner = loop(converge_on=predicate(_step_done), name=f"{item_name}[map]")(map_items)
    assert isinstance(runner, AsyncLoopRunner)
    return runner


def _step_done(history: Any) -> bool:
    return bool(history) and history[-1].error is None


def _stopped_by_enclosing(result: RunResult) -> bool:
    """An item out of budget because of an enclosing run's cap (the map's or the graph's), not its own."""
    owner = getattr(result.error, "owner", None)
    if owner is not None:
        return bool(owner != result.run_id)
    return bool(result.stop_reason and "enclosing run" in result.stop_reason)


async def _run_items(node: str, graph: str, spec: MapSpec, items: list[Any]) -> list[Any]:
    ledger = current_ledger()  # the map node run's: every item is its child
    assert ledger is not None
    ctx = ledger.context
    assert ctx is not None
    total = len(items)
    out: list[Any] = [None] * total
    done = failed = 0
    first_failure: tuple[int, RunResult | None, BaseException | None] | None = None
    budget_stop: BaseException | None = None
    no_room = False
    stop = False
    report = item_progress.get()
    item = spec.item
    is_async = isinstance(item, AsyncLoopRunner)
    assert is_async or isinstance(item, LoopRunner)
    workers = min(total, spec.max_concurrency or total)
    # sync items run in worker threads: a bound of our own when given, else anyio's default
    threads = anyio.CapacityLimiter(spec.max_concurrency) if spec.max_concurrency and not is_async else None
    indexes = iter(range(total))  # shared by the workers: each takes the next item
    remote, resources = item_remote.get()
    submitted: dict[int, Any] = {}  # the items on the executor, cancelled when the map stops early

    async def one(i: int) -> RunResult | None:
        meta = {"node": node, "graph": graph, "item": i}
        if remote is not None:  # a task on the executor; None: it did not start (no room, or cancelled)
            found: RunResult | None = await remote.run(
                ledger, item, items[i], call_index=i, kind="item", meta=meta, budget=None, resources=resources,
                key=f"item-{node}-{i}", group=submitted,
            )
            return found
        if is_async:
            return await arun_child(item, ledger, items[i], call_index=i, meta=meta, kind="item")
        call = functools.partial(run_child, item, ledger, items[i], call_index=i, meta=meta, kind="item")
        # A thread cannot be cancelled: on cancellation the item stops at its next step
        # boundary (the graph expires its ledger) and its result is still recorded.
        with anyio.CancelScope(shield=True):
            result: RunResult = await anyio.to_thread.run_sync(call, limiter=threads)
        return result

    def halt(*, cancel: bool) -> None:
        """No more items start. On an executor, with ``cancel``, the items waiting for a worker are
        cancelled (those running finish there); without, they find no room and return at once."""
        nonlocal stop
        stop = True
        if cancel and remote is not None:
            remote.cancel(submitted)

    async def worker() -> None:
        nonlocal done, failed, first_failure, budget_stop, no_room, stop
        for i in indexes:
            if stop:
                return
            if not has_room(ledger, time.monotonic()):
                no_room = stop = True
                return
            try:
                found = await one(i)
            except Exception as exc:  # noqa: BLE001 - an item that cannot run fails alone
                failed += 1
                if first_failure is None:
                    first_failure = (i, None, exc)
                if spec.on_item_error == "fail":
                    halt(cancel=True)
                continue
            if found is None:  # on the executor, not started: no room left (or the graph was cancelled)
                no_room = True
                halt(cancel=False)
                continue
            result = found
            status = result.status
            if status is RunStatus.COMPLETED or (
                status is RunStatus.BUDGET_EXHAUSTED and not _stopped_by_enclosing(result)
            ):
                out[i] = result.state
                done += 1
            elif status is RunStatus.BUDGET_EXHAUSTED:
                budget_stop = budget_stop or result.error
                halt(cancel=False)
            else:
                failed += 1
                if first_failure is None:
                    first_failure = (i, result, result.error)
                if spec.on_item_error == "fail":
                    halt(cancel=True)
            if report is not None:
                report(done + failed, total)

    async with anyio.create_task_group() as tg:
        for _ in range(workers):
            tg.start_soon(worker)

    counts = ItemCounts(total, done, failed)
    if first_failure is not None and spec.on_item_error == "fail":
        i, res, err = first_failure
        what = res.stop_reason if res is not None and res.stop_reason else f"{type(err).__name__}: {err}"
        run = f" (run {res.run_id})" if res is not None else ""
        if err is not None:
            err.add_note(f"loomc: item {i} of map node {node!r}{run} failed")
        raise MapHalt(ctx.run_id, RunStatus.FAILED, f"item {i} failed{run}: {what}", err, counts)
    if budget_stop is not None or no_room or counts.pending:
        raise MapHalt(
            ctx.run_id, RunStatus.BUDGET_EXHAUSTED,
            f"budget: an enclosing run's budget ran out; {counts.pending} of {total} items not finished",
            budget_stop, counts,
        )
    ctx.meta["items"] = counts.to_dict()
    ctx.meta_dirty = True  # written with the step's commit
    return out
