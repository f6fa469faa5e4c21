"""``Graph``: a networkx DAG of loops with one budget, per-node checkpoints and graph-wide resume.

The graph run is a run of kind ``graph`` whose ledger is the parent of every node run:
each node is a child run (kind ``node``) keyed by (graph run, step 0, node index), so a
resumed graph finds each node's own run, and every cost a node charges is applied at
once to the graph's ledger, which caps the sum.

A map node (``Graph.map``, see ``_map.py``) is a node run whose one step runs an item
loop once per item, each item a child of the node run. Routing (``add(..., when=)``)
decides per upstream whether a node runs; the decisions are stored in the graph run's
``meta.routes`` before the node starts, and a resume reuses them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import queue
import signal
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import networkx as nx

from loomc import AsyncLoopRunner, Budget, LoopRunner, RunEvent, RunInfo, RunResult, RunStatus, SpecMismatch, loop, predicate
from loomc._core.seams import (
    Claim,
    MemoryStore,
    RunLedger,
    arun_child,
    async_twin,
    charge_left_holds,
    claim,
    has_room,
    new_top_run,
    open_host_ledger,
    open_store,
    owner_token,
    run_child,
    store_spent,
    stored_room,
    watch_host,
)
from orchestration._executor import Executor, RemoteRuns, StoreAddress
from orchestration._map import ItemCounts, MapHalt, MapSpec, item_progress, item_remote, map_runner

__all__ = ["Graph", "GraphResult", "ItemCounts", "NodeInfo", "ProgressEvent", "ProgressHook"]

#: Node statuses besides the run statuses: never started, and not run because an upstream failed.
PENDING = "pending"
SKIPPED = "skipped"
#: The ``stop_reason`` of a skipped node that routing left out (not a failure).
NOT_ROUTED = "not routed"


@dataclass(frozen=True)
class ProgressEvent:
    """A graph run started (``node`` is ``None``), one of its nodes started or finished, or an
    item of a map node finished (``status`` ``"items"``, with ``items_done`` of ``items_total``)."""

    graph_run_id: str
    node: str | None
    status: str
    run_id: str | None = None
    items_done: int | None = None
    items_total: int | None = None


#: ``hook(event)`` is called as the graph and its nodes start and finish (for live progress).
ProgressHook = Callable[[ProgressEvent], None]

_HANDOFF = (RunStatus.COMPLETED.value, RunStatus.BUDGET_EXHAUSTED.value)


@dataclass(frozen=True)
class NodeInfo:
    """How one node of a graph run ended.

    ``status`` is the node run's :class:`RunStatus` (``completed``, ``budget_exhausted``,
    ``failed``, ``stalled``, ``interrupted``), or the string ``"pending"`` (not started: the
    graph's budget ran out) or ``"skipped"`` (an upstream node failed, or, with the
    ``stop_reason`` ``"not routed"``, routing left it out). ``reused`` is true when the node had
    completed in an earlier attempt and its output came from the store. ``items`` counts a
    map node's items (``None`` for other nodes).
    """

    name: str
    status: RunStatus | str
    run_id: str | None = None
    steps: int = 0
    cost_usd: float = 0.0
    stop_reason: str | None = None
    error: BaseException | None = field(default=None, repr=False, compare=False)
    reused: bool = False
    items: ItemCounts | None = None

    @property
    def routed_out(self) -> bool:
        """True when routing left the node out (status ``skipped``, reason ``not routed``)."""
        return self.status == SKIPPED and self.stop_reason == NOT_ROUTED

    def __post_init__(self) -> None:
        if not isinstance(self.status, RunStatus) and self.status in RunStatus._value2member_map_:
            object.__setattr__(self, "status", RunStatus(self.status))


@dataclass
class GraphResult:
    """What a graph run produced: its status, each node's final state, cost and outcome."""

    run_id: str
    status: RunStatus
    outputs: dict[str, Any]
    cost_usd: float
    nodes: dict[str, NodeInfo]
    stop_reason: str | None = None

    @property
    def ok(self) -> bool:
        """True when every node completed (or handed on its state after its own budget ran out)."""
        return self.status is RunStatus.COMPLETED


@dataclass
class _Node:
    name: str
    runner: Any
    after: tuple[str, ...]
    inputs: Callable[[dict[str, Any], Any], Any] | None
    when: Callable[[Any], Any] | None = None
    map: MapSpec | None = None
    resources: dict[str, float] | None = None  # what an executor's worker must offer (Dask resources)

    def describe(self) -> dict[str, Any]:
        """The node as stored in the graph run's ``meta.nodes`` (its index added by the caller)."""
        out: dict[str, Any] = {"name": self.name, "loop": self.runner.spec.name, "after": list(self.after)}
        if self.when is not None:
            out["when"] = True
        if self.map is not None:
            out["map"] = {"item": self.map.item.spec.name, "max_concurrency": self.map.max_concurrency,
                          "on_item_error": self.map.on_item_error}
        return out

    @property
    def is_async(self) -> bool:
        return isinstance(self.runner, AsyncLoopRunner)


def _one_step_done(history: Sequence[Any]) -> bool:
    return bool(history) and history[-1].error is None


def _as_runner(fn: Any) -> Any:
    """A ``@loop`` as it is; a plain function as a loop that completes after one good step."""
    if isinstance(fn, (LoopRunner, AsyncLoopRunner)):
        return fn
    if not callable(fn):
        raise TypeError(f"Graph.add expects a @loop or a function, got {fn!r}")
    name = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
    runner = loop(converge_on=predicate(_one_step_done), name=name)(fn)
    # a plain function's return value is its output, None included (a @loop's step may not return None)
    runner.spec = dataclasses.replace(runner.spec, none_ok=True)
    return runner


def _check_executor(executor: Any, where: str) -> None:
    if executor is not None and not isinstance(executor, Executor):
        raise TypeError(
            f"{where}: got {executor!r}; expected an executor such as orchestration.DaskExecutor(...), or None "
            "to run the nodes in this process"
        )


class Graph:
    """A DAG of loops run as one budgeted, resumable pipeline.

    Args:
        name: the graph's name (stored as the graph run's name).
        budget: a ``Budget(usd=, wall_clock=)`` over the whole graph: it caps the sum
            of every node's cost (nested loops included) and the graph's active time.
            Each node's own budget still applies.
        checkpoint: where the graph and all its node runs are stored: ``"sqlite"``
            (``$LOOMC_DB`` or ``.loomc/checkpoints.db``), a database path, ``"memory"``
            or a store.
        max_concurrency: at most this many nodes run at once (default: unbounded).
        on_step: ``callback(event)`` as the graph run and each node run (and the loops nested
            in them) start, commit a step and finish (see ``@loop(on_step=)``).
        executor: where the nodes run: ``None`` (this process) or an executor such as
            :class:`~orchestration.DaskExecutor` (each node, and each map item, a task on a
            cluster; the store must then be PostgreSQL). ``run(..., executor=)`` overrides it.

    Example::

        graph = Graph("report", budget=Budget(usd=2.00))
        graph.add(research)
        graph.add(draft, after=research)
        result = graph.run({"topic": "tides"})
    """

    def __init__(
        self,
        name: str,
        *,
        budget: Budget | None = None,
        checkpoint: Any = "sqlite",
        max_concurrency: int | None = None,
        on_step: Callable[[RunEvent], Any] | None = None,
        executor: Executor | None = None,
    ) -> None:
        _check_executor(executor, f"Graph({name!r}): executor")
        if on_step is not None and not callable(on_step):
            raise TypeError(f"Graph(on_step={on_step!r}): expected a callable event -> None")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"Graph(name={name!r}): give the graph a non-empty name")
        if budget is not None and not isinstance(budget, Budget):
            raise TypeError(f"Graph(budget={budget!r}): expected loomc.Budget(...)")
        if budget is not None and budget.iterations is not None:
            raise ValueError(
                f"Graph {name!r}: a graph budget takes usd and wall_clock; give iterations to each node's @loop"
            )
        if max_concurrency is not None and (
            isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1
        ):
            raise ValueError(f"Graph(max_concurrency={max_concurrency!r}): use a positive integer or None")
        self.name = name
        self.budget = budget if budget is not None else Budget()
        self.checkpoint = checkpoint
        self.max_concurrency = max_concurrency
        self.on_step = on_step
        self.executor = executor
        self._dag: nx.DiGraph = nx.DiGraph()
        self._nodes: dict[str, _Node] = {}
        self._names_by_obj: dict[int, str] = {}
        self._memory: MemoryStore | None = None

    def __repr__(self) -> str:
        return f"<Graph {self.name!r}: {len(self._nodes)} nodes>"

    # -- building -------------------------------------------------------------------
    def add(
        self,
        fn: Any,
        *,
        name: str | None = None,
        after: Any = None,
        inputs: Callable[[dict[str, Any], Any], Any] | None = None,
        when: Callable[[Any], Any] | None = None,
        resources: dict[str, float] | None = None,
    ) -> Any:
        """Add a node: a ``@loop`` (or a plain function, run as one checkpointed step).

        Args:
            fn: the node's loop, or a sync/async function ``state -> state``.
            name: the node's name (default: the function's ``__name__``).
            after: the upstream node(s): names or the objects added, one or a list.
            inputs: ``inputs(upstream_states, graph_input) -> state`` builds the node's
                input; ``upstream_states`` is ``{name: final state}``. Default: the graph
                input for a root node, the upstream's final state for one upstream,
                ``{name: state}`` for several (those upstreams that ran).
            when: routing: ``when(upstream_state) -> bool`` is asked once per upstream that
                ran; the node runs if one answer is true, else it is ``skipped`` with the
                reason ``"not routed"`` (not a failure). The answers are recorded with the
                graph run, so a resumed graph takes the same branch.
            resources: what a worker must offer to run the node under an executor
                (Dask resources, e.g. ``{"GPU": 1}``); ignored in process.

        Returns:
            ``fn`` unchanged (so ``add`` also works as a decorator).

        Raises:
            ValueError: a duplicate name, an unknown upstream, a cycle, or ``when`` on a
                node with no upstream (naming the node).
            TypeError: ``fn``, ``inputs`` or ``when`` is not callable.
        """
        return self._add(_as_runner(fn), fn, name, after, inputs, when, None, resources)

    def map(
        self,
        name: str,
        fn: Any,
        *,
        over: Callable[[Any, Any], Any],
        after: Any = None,
        max_concurrency: int | None = None,
        on_item_error: str = "fail",
        when: Callable[[Any], Any] | None = None,
        resources: dict[str, float] | None = None,
    ) -> Any:
        """Add a map node: one child run of the ``@loop`` ``fn`` per item of a list.

        Args:
            name: the node's name.
            fn: a ``@loop`` (sync or async) run once per item, from the item as its state.
            over: ``over(upstream_state, graph_input) -> list``: the items. ``upstream_state``
                is what a node added with ``add`` would receive (the graph input for a root).
                Called once, when the node first starts; the list is the node run's stored
                input, so a resume runs the same items.
            after: the upstream node(s), as for :meth:`add`.
            max_concurrency: at most this many items run at once (default: no limit of
                its own; sync items share anyio's worker threads, 40 at once).
            on_item_error: ``"fail"`` (a failed item fails the node; items not yet started
                are not started) or ``"skip"`` (its slot in the output is ``None`` and
                ``NodeInfo.items.failed`` counts it).
            when: routing, as for :meth:`add`.
            resources: what a worker must offer to run each item under an executor (as for :meth:`add`).

        Returns:
            ``fn`` unchanged.

        Raises:
            TypeError: ``fn`` is not a ``@loop``, or ``over`` is not callable.
            ValueError: a bad ``max_concurrency`` or ``on_item_error``, or what :meth:`add` refuses.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"graph {self.name!r}: graph.map(name={name!r}, ...): give the map node a non-empty name")
        if not isinstance(fn, (LoopRunner, AsyncLoopRunner)):
            raise TypeError(
                f"graph {self.name!r}: map node {name!r}: fn={getattr(fn, '__name__', fn)!r} is not a @loop; "
                "decorate it with @loop(...) (each item is a run of that loop)"
            )
        if not callable(over):
            raise TypeError(f"graph {self.name!r}: map node {name!r}: over={over!r} must be a callable "
                            "(upstream_state, graph_input) -> list")
        if max_concurrency is not None and (
            isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1
        ):
            raise ValueError(f"graph {self.name!r}: map node {name!r}: max_concurrency={max_concurrency!r}; "
                             "use a positive integer or None")
        if on_item_error not in ("fail", "skip"):
            raise ValueError(f"graph {self.name!r}: map node {name!r}: on_item_error={on_item_error!r}; "
                             "use 'fail' or 'skip'")
        spec = MapSpec(fn, over, max_concurrency, "skip" if on_item_error == "skip" else "fail")
        self._add(map_runner(name, self.name, spec), fn, name, after, None, when, spec, resources)
        return fn

    def _add(
        self, runner: Any, fn: Any, name: str | None, after: Any, inputs: Callable[[dict[str, Any], Any], Any] | None,
        when: Callable[[Any], Any] | None, spec: MapSpec | None, resources: dict[str, float] | None = None,
    ) -> Any:
        node_name = name if name is not None else getattr(fn, "__name__", None)
        if not isinstance(node_name, str) or not node_name:
            raise ValueError(f"graph {self.name!r}: cannot name the node {fn!r}; pass name=")
        if resources is not None and (
            not isinstance(resources, dict)
            or not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                       for k, v in resources.items())
        ):
            raise ValueError(f"graph {self.name!r}: node {node_name!r}: resources={resources!r}; give a dict of "
                             "resource name to amount, e.g. {'GPU': 1}")
        if node_name in self._nodes:
            raise ValueError(
                f"graph {self.name!r}: a node named {node_name!r} already exists; pass name= to add it again"
            )
        if inputs is not None and not callable(inputs):
            raise TypeError(f"node {node_name!r}: inputs={inputs!r} must be a callable (upstream, graph_input)")
        if when is not None and not callable(when):
            raise TypeError(f"node {node_name!r}: when={when!r} must be a callable (upstream_state) -> bool")

        ups: list[str] = []
        for ref in self._as_list(after):
            up = ref if isinstance(ref, str) else self._names_by_obj.get(id(ref))
            if up == node_name:
                raise ValueError(f"graph {self.name!r}: node {node_name!r} cannot come after itself (a cycle)")
            if up is None or up not in self._nodes:
                raise ValueError(
                    f"graph {self.name!r}: node {node_name!r} comes after unknown node "
                    f"{ref if isinstance(ref, str) else getattr(ref, '__name__', ref)!r}; add that node first"
                )
            if up not in ups:
                ups.append(up)
        if when is not None and not ups:
            raise ValueError(
                f"graph {self.name!r}: node {node_name!r} has when= but no upstream; routing decides on an "
                "upstream's state: give after=, or drop when= (a root node always runs)"
            )
        self._dag.add_node(node_name)
        for up in ups:
            self._dag.add_edge(up, node_name)
        if not nx.is_directed_acyclic_graph(self._dag):  # pragma: no cover - unknown upstreams already refused
            self._dag.remove_node(node_name)
            raise ValueError(f"graph {self.name!r}: adding node {node_name!r} would make a cycle")
        self._nodes[node_name] = _Node(node_name, runner, tuple(ups), inputs, when, spec,
                                       dict(resources) if resources else None)
        self._names_by_obj[id(fn)] = node_name
        self._names_by_obj[id(runner)] = node_name
        return fn

    @staticmethod
    def _as_list(after: Any) -> list[Any]:
        if after is None:
            return []
        if isinstance(after, (list, tuple, set, frozenset)):
            return list(after)
        return [after]

    # -- introspection --------------------------------------------------------------
    @property
    def nodes(self) -> list[str]:
        """Node names in the order they were added."""
        return list(self._nodes)

    def upstream(self, name: str) -> list[str]:
        """The nodes ``name`` comes after."""
        return list(self._nodes[name].after)

    def downstream(self, name: str) -> list[str]:
        """The nodes that come directly after ``name``."""
        return [n.name for n in self._nodes.values() if name in n.after]

    def loop_name(self, name: str) -> str:
        """The stored run name of a node's loop (``module:qualname``)."""
        return str(self._nodes[name].runner.spec.name)

    @property
    def dag(self) -> nx.DiGraph:
        """A copy of the underlying networkx ``DiGraph``."""
        return self._dag.copy()

    @property
    def structure_hash(self) -> str:
        """A hash of the graph's name, nodes, their loops and edges (resume refuses a change)."""
        # The loop's qualname, not its module: a file run as a script (``__main__``) and
        # imported by ``loomc graph run`` (``pipeline``) is the same graph.
        shape = {
            "name": self.name,
            "nodes": [
                [n.name, n.runner.spec.name.rpartition(":")[2], list(n.after), *(["when"] if n.when else [])]
                for n in self._nodes.values()
            ],
        }
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]

    def to_mermaid(self) -> str:
        """The DAG as a mermaid ``flowchart``."""
        ids = {name: f"n{i}" for i, name in enumerate(self._nodes)}
        lines = ["flowchart TD"]
        for name, node in self._nodes.items():
            if node.map is not None:  # a stack of items
                lines.append(f'    {ids[name]}[["{name} (map)"]]')
            else:
                lines.append(f'    {ids[name]}["{name}"]')
            arrow = "-. when .->" if node.when is not None else "-->"
            lines.extend(f"    {ids[up]} {arrow} {ids[name]}" for up in node.after)
        return "\n".join(lines)

    def to_text(self) -> str:
        """The DAG as text: one line per node in run order, its upstreams and what runs beside it."""
        lines = [f"graph {self.name}: {len(self._nodes)} nodes" + self._budget_text()]
        width = max((len(n) for n in self._nodes), default=0)
        for level, names in enumerate(nx.topological_generations(self._dag)):
            ordered = [n for n in self._nodes if n in names]
            par = "  (in parallel)" if len(ordered) > 1 else ""
            lines.append(f"  stage {level + 1}{par}")
            for n in ordered:
                node = self._nodes[n]
                ups = node.after
                arrow = f"  <- {', '.join(ups)}" if ups else "  <- graph input"
                if node.when is not None:
                    arrow += f"  when {getattr(node.when, '__name__', 'when')}"
                loop_name = self.loop_name(n)
                if node.map is not None:
                    bound = f", max {node.map.max_concurrency} at once" if node.map.max_concurrency else ""
                    loop_name = f"map over items: {node.map.item.spec.name}{bound}, on_item_error={node.map.on_item_error}"
                lines.append(f"    {n.ljust(width)}{arrow}    [{loop_name}]")
        return "\n".join(lines)

    def _budget_text(self) -> str:
        b = self.budget
        parts = []
        if b.usd is not None:
            parts.append(f"${b.usd:.4f}")
        if b.wall_clock_seconds is not None:
            parts.append(f"{b.wall_clock_seconds:g}s wall clock")
        if self.max_concurrency is not None:
            parts.append(f"max {self.max_concurrency} at once")
        return f" (budget {', '.join(parts)})" if parts else ""

    # -- running --------------------------------------------------------------------
    def store(self) -> Any:
        """The store the graph writes to (opened on first use; one memory store per graph)."""
        if isinstance(self.checkpoint, str) and self.checkpoint == "memory":
            if self._memory is None:
                self._memory = MemoryStore()
            return self._memory
        return open_store(self.checkpoint)

    def run(
        self, input: Any = None, *, store: Any = None, on_progress: ProgressHook | None = None,
        executor: Executor | None = None,
    ) -> GraphResult:
        """Run the graph from ``input`` and return a :class:`GraphResult` (never raises for node failures).

        ``executor`` runs the nodes elsewhere for this run (default: the graph's ``executor=``,
        else this process); a store its workers cannot reach is refused before anything runs.
        """
        return self._sync(functools.partial(self.arun, input, store=store, on_progress=on_progress, executor=executor))

    async def arun(
        self, input: Any = None, *, store: Any = None, on_progress: ProgressHook | None = None,
        executor: Executor | None = None, _signals: bool = False,
        _observers: tuple[Callable[[RunEvent], Any], ...] = (),
    ) -> GraphResult:
        """Async :meth:`run` (anyio: asyncio or trio)."""
        self._check_not_empty()
        ex = _Execution(self, store if store is not None else await anyio.to_thread.run_sync(self.store), on_progress)
        ex.handle_signals = _signals
        ex.observers = _observers
        await ex.use(executor)
        async with ex.astore:
            try:
                return await ex.start(input)
            finally:
                ex.release()

    def resume(
        self, run_id: str, *, budget: Budget | None = None, force: bool = False, store: Any = None,
        on_progress: ProgressHook | None = None, executor: Executor | None = None,
    ) -> GraphResult:
        """Continue a stopped or crashed graph run.

        Completed nodes are not run again (their outputs come from the store); failed,
        interrupted or crashed nodes resume from their own last checkpoint; nodes not
        yet started run. The graph budget keeps what was spent.

        Args:
            run_id: the graph run's id or a unique prefix of it.
            budget: new limits (the only way to get more): those it names replace the run's own,
                those left as ``None`` are kept, ``math.inf`` removes one. ``usd`` and
                ``wall_clock`` are the graph's; ``iterations`` (a graph has none of its own)
                becomes the iteration limit of each node that resumes.
            force: continue even though the graph's structure changed since the run.
            store: the store to read (default: the graph's ``checkpoint``).
            on_progress: ``hook(ProgressEvent)`` as the graph and its nodes start and finish.
            executor: where the nodes run this time (default: the graph's ``executor=``); a
                graph started on a cluster may be resumed in process and the other way round.

        Raises:
            SpecMismatch: the structure (nodes, loops, edges) changed and ``force`` is false.
            RunNotFound: no such run.
            RunLocked: the graph run is live in another process.
        """
        return self._sync(functools.partial(
            self.aresume, run_id, budget=budget, force=force, store=store, on_progress=on_progress, executor=executor
        ))

    async def aresume(
        self, run_id: str, *, budget: Budget | None = None, force: bool = False, store: Any = None,
        on_progress: ProgressHook | None = None, executor: Executor | None = None, _signals: bool = False,
        _observers: tuple[Callable[[RunEvent], Any], ...] = (),
    ) -> GraphResult:
        """Async :meth:`resume`."""
        self._check_not_empty()
        if budget is not None and not isinstance(budget, Budget):
            raise TypeError(f"budget={budget!r}: expected loomc.Budget(...)")
        ex = _Execution(self, store if store is not None else await anyio.to_thread.run_sync(self.store), on_progress)
        ex.handle_signals = _signals
        ex.observers = _observers
        await ex.use(executor)
        async with ex.astore:
            try:
                return await ex.resume(run_id, budget, force)
            finally:
                ex.release()

    # -- streaming events -----------------------------------------------------------
    def stream(self, input: Any = None, *, store: Any = None) -> Generator[RunEvent, None, GraphResult]:
        """Run the graph, yielding the events of the graph run and of every node run as they happen.

        The graph runs on its own event loop in a worker thread while you iterate; the events
        come in the order its runs told them (``RunStarted`` of the graph first, its
        ``RunFinished`` last). Stop iterating early (``break``, ``close()``, Ctrl-C) and the
        graph is cancelled, recorded ``interrupted`` (resumable). The generator's return value is
        the :class:`GraphResult`.
        """
        self._check_not_empty()
        return self._stream(functools.partial(self.arun, input, store=store))

    def stream_resume(
        self, run_id: str, *, budget: Budget | None = None, force: bool = False, store: Any = None
    ) -> Generator[RunEvent, None, GraphResult]:
        """Like :meth:`stream`, for the resume of a graph run (see :meth:`resume`)."""
        self._check_not_empty()
        return self._stream(functools.partial(self.aresume, run_id, budget=budget, force=force, store=store))

    def astream(self, input: Any = None, *, store: Any = None) -> AsyncGenerator[RunEvent, None]:
        """Run the graph on this event loop, yielding its events (``async for event in graph.astream(x)``).

        Leave early with the generator closed at once (``async with contextlib.aclosing(graph.astream(x))
        as events:``): the graph is cancelled and recorded ``interrupted``. Cancelling the task
        that iterates does the same.
        """
        self._check_not_empty()
        return self._astream(functools.partial(self.arun, input, store=store))

    def astream_resume(
        self, run_id: str, *, budget: Budget | None = None, force: bool = False, store: Any = None
    ) -> AsyncGenerator[RunEvent, None]:
        """Like :meth:`astream`, for the resume of a graph run."""
        self._check_not_empty()
        return self._astream(functools.partial(self.aresume, run_id, budget=budget, force=force, store=store))

    @staticmethod
    def _stream(start: Callable[..., Awaitable[GraphResult]]) -> Generator[RunEvent, None, GraphResult]:
        events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        end = object()

        async def main() -> GraphResult:
            try:
                return await start(_observers=(events.put,))
            finally:
                events.put(end)

        with anyio.from_thread.start_blocking_portal() as portal:
            future = portal.start_task_soon(main)
            try:
                while (event := events.get()) is not end:
                    yield event
            finally:
                if not future.done():  # left early: cancel the graph (recorded interrupted) and wait for it
                    future.cancel()
        return future.result()

    @staticmethod
    async def _astream(start: Callable[..., Awaitable[GraphResult]]) -> AsyncGenerator[RunEvent, None]:
        send, receive = anyio.create_memory_object_stream[RunEvent](math.inf)
        token = anyio.lowlevel.current_token()
        loop_thread = threading.get_ident()

        def tell(event: RunEvent) -> None:  # sync nodes tell their events from worker threads
            if threading.get_ident() == loop_thread:
                send.send_nowait(event)
            else:
                anyio.from_thread.run_sync(send.send_nowait, event, token=token)

        async def main() -> None:
            with send:
                await start(_observers=(tell,))

        async with anyio.create_task_group() as tg:
            tg.start_soon(main)
            with receive:
                async for event in receive:
                    yield event

    def _check_not_empty(self) -> None:
        if not self._nodes:
            raise ValueError(f"graph {self.name!r} has no nodes; add some with graph.add(fn)")

    @staticmethod
    def _sync(fn: Callable[..., Awaitable[GraphResult]]) -> GraphResult:
        # On the main thread, SIGINT/SIGTERM stop the nodes cleanly (runs marked interrupted).
        return anyio.run(functools.partial(fn, _signals=threading.current_thread() is threading.main_thread()))


class _Execution:
    """One attempt at a graph run: the scheduler."""

    def __init__(self, graph: Graph, store: Any, hook: ProgressHook | None) -> None:
        self.graph = graph
        self.store = store
        self.astore = async_twin(store)
        self.hook = hook
        self.owner = owner_token()
        self.outputs: dict[str, Any] = {}
        self.infos: dict[str, NodeInfo] = {}
        self.done: dict[str, anyio.Event] = {}
        self.exhausted = False  # the graph's own budget ran out
        self.aborted = False  # the attempt is being cancelled
        self.spent_before = 0.0  # what the graph's tree had spent before this attempt
        self.carried_in = 0.0  # of which its node runs' stored totals (re-found nodes carry from it)
        self.handle_signals = False
        self.signalled: int | None = None
        self.run_id = ""
        self.ledger: RunLedger | None = None  # the graph run's, once the attempt starts
        self.priors: dict[str, RunInfo] = {}
        self.node_iterations: int | float | None = None  # a resume's new iteration limit for resumed nodes
        self.claim: Claim | None = None  # this process's hold on the graph run
        self.meta: dict[str, Any] = {}  # the graph run's meta as stored (routing decisions are added to it)
        self.routes: dict[str, dict[str, bool]] = {}  # node -> {upstream: when's answer}, recorded
        self.unfinished: set[str] = set()  # map nodes the graph's budget stopped: no output to hand on
        self.observers: tuple[Callable[[RunEvent], Any], ...] = ()  # a stream's callbacks
        self.resumed = False
        self.executor: Executor | None = None  # where nodes run (None: in this process)
        self.address: StoreAddress | None = None  # the store as the executor's workers open it
        self.remote: RemoteRuns | None = None  # the attempt's units on the executor
        self.wall_now: Callable[[], float] = lambda: 0.0  # the graph's active time so far (this attempt included)

    async def use(self, executor: Executor | None) -> None:
        """Run the nodes on ``executor`` (else the graph's): the store checked, the engine opened, before any write."""
        executor = executor if executor is not None else self.graph.executor
        _check_executor(executor, f"graph {self.graph.name!r}: executor")
        if executor is None:
            return
        self.address = executor.check_store(self.store)
        await anyio.to_thread.run_sync(executor.open)
        self.executor = executor

    def release(self) -> None:
        """Let go of the graph run in this process (the attempt is over)."""
        if self.claim is not None:
            self.claim.release()
            self.claim = None

    # -- entry points ---------------------------------------------------------------
    async def start(self, graph_input: Any) -> GraphResult:
        g = self.graph
        meta: dict[str, Any] = {"nodes": [
            {**n.describe(), "index": i} for i, n in enumerate(g._nodes.values())
        ], "max_concurrency": g.max_concurrency}
        self.meta = meta
        new = new_top_run(
            name=g.name, kind="graph", spec_hash=g.structure_hash, state=graph_input, budget=g.budget, meta=meta,
            owner=self.owner,
        )
        assert new.run_id is not None
        self.claim = claim(self.store, new.run_id, self.owner)
        with anyio.CancelScope(shield=True):  # once the row exists, the attempt below records how it ends
            run_id = await self.astore.begin_run(new)
        index = {name: i for i, name in enumerate(g._nodes)}
        return await self._attempt(run_id, graph_input, g.budget, index, {}, 0.0)

    async def resume(self, run_id: str, budget: Budget | None, force: bool) -> GraphResult:
        g = self.graph
        run_id = await self.astore.resolve(run_id)
        self.claim = claim(self.store, run_id, self.owner)  # before reading it: one driver per process
        info: RunInfo = await self.astore.get_run(run_id)
        if info.kind != "graph":
            raise SpecMismatch(
                f"run {run_id} is a {info.kind} run ({info.name}), not a graph; resume it with `loomc resume {run_id}`"
            )
        if not force and info.name != g.name:
            raise SpecMismatch(
                f"run {run_id} belongs to graph {info.name!r}, not {g.name!r}; resume it with that graph, "
                "or pass force=True"
            )
        if not force and info.spec_hash != g.structure_hash:
            raise SpecMismatch(
                f"graph {g.name!r} changed since run {run_id} started (its nodes, their loops or edges differ); "
                "resume it with the graph as it was, or call graph.resume(run_id, force=True) to continue with this one"
            )
        limits = Budget.merged(info.budget, budget)
        self.resumed = True
        with anyio.CancelScope(shield=True):
            await self.astore.acquire(run_id, self.owner, limits.to_dict() if budget is not None else None)
        try:
            graph_input, index, existing = await self._prepare_resume(run_id, info, limits)
        except BaseException:
            with anyio.CancelScope(shield=True):  # cancelled before the attempt began: still recorded
                await self.astore.finish_run(run_id, RunStatus.INTERRUPTED, "interrupted", info.wall_s)
            raise
        return await self._attempt(run_id, graph_input, limits, index, existing, info.wall_s)

    async def _prepare_resume(
        self, run_id: str, info: RunInfo, limits: Budget
    ) -> tuple[Any, dict[str, int], dict[str, RunInfo]]:
        """The graph input, each node's call index and the node runs already started."""
        g = self.graph
        # calls in flight in its nodes when a process died: charged to the graph
        info, held = await charge_left_holds(self.astore, self.store, run_id, info)
        self.node_iterations = limits.iterations
        graph_input = await self.astore.load_state(run_id, -1)
        old = {n["name"]: int(n["index"]) for n in info.meta.get("nodes", []) if "name" in n and "index" in n}
        index: dict[str, int] = {}
        free = max(old.values(), default=-1) + 1
        for name in g._nodes:
            if name in old:
                index[name] = old[name]
            else:
                index[name], free = free, free + 1
        if index != old:
            meta = dict(info.meta)
            meta["nodes"] = [{**n.describe(), "index": index[n.name]} for n in g._nodes.values()]
            await self.astore.set_meta(run_id, meta)
            info = dataclasses.replace(info, meta=meta)
        self.meta = dict(info.meta)
        # routing decisions of earlier attempts: taken again, never asked again
        routes = info.meta.get("routes")
        self.routes = {k: dict(v) for k, v in routes.items() if isinstance(v, dict)} if isinstance(routes, dict) else {}
        children = {
            c.call_index: c for c in await self.astore.children(run_id) if c.parent_step == 0 and c.call_index is not None
        }
        # Node runs roll their spending into the graph's row as they commit, so the stored
        # total holds all of it (and what interrupted steps spent); a node no longer in the
        # graph stays counted. Re-found nodes carry their spending from ``carried_in``.
        self.carried_in = round(sum(c.cost_usd for c in children.values()), 12)
        # holds left by calls in flight when a process died were just added to the stored total
        self.spent_before = round(max(info.cost_usd, self.carried_in) + held, 12)
        existing = {name: children[i] for name, i in index.items() if i in children}
        return graph_input, index, existing

    # -- the attempt ----------------------------------------------------------------
    async def _attempt(
        self,
        run_id: str,
        graph_input: Any,
        budget: Budget,
        index: dict[str, int],
        existing: dict[str, RunInfo],
        wall_base: float,
    ) -> GraphResult:
        g = self.graph
        t0 = time.monotonic()
        wall_cap = budget.wall_clock_seconds
        self.ledger = open_host_ledger(
            run_id, g.name, self.store, budget, spent=self.spent_before, prepaid=self.carried_in,
            deadline=(t0 + wall_cap - wall_base) if wall_cap is not None else None, shared=self.executor is not None,
        )
        self.wall_now = lambda: wall_base + (time.monotonic() - t0)
        if self.executor is not None:
            assert self.address is not None
            self.remote = RemoteRuns(self.executor, self.address, run_id, self._remote_cancelled)
        self.priors, self.run_id = existing, run_id
        self.done = {name: anyio.Event() for name in g._nodes}
        limiter = anyio.CapacityLimiter(g.max_concurrency) if g.max_concurrency else None
        observed = watch_host(self.ledger, kind="graph", resumed=self.resumed, on_step=g.on_step, observers=self.observers)
        span_token = observed.attach() if observed is not None else None  # node runs' spans hang under the graph's
        try:
            self._emit(None, RunStatus.RUNNING.value, run_id)
            finished = False

            async def watch() -> None:
                try:
                    await anyio.sleep_forever()
                finally:
                    if not finished:
                        self._abort()

            async with anyio.create_task_group() as outer:
                outer.start_soon(watch)
                if self.handle_signals:
                    outer.start_soon(self._on_signal, outer.cancel_scope)
                async with anyio.create_task_group() as tg:
                    for name in g._nodes:
                        tg.start_soon(self._node, name, index[name], graph_input, existing.get(name), limiter)
                finished = True
                outer.cancel_scope.cancel()
            if self.signalled is not None:
                raise KeyboardInterrupt(signal.Signals(self.signalled).name)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                wall = wall_base + (time.monotonic() - t0)
                await self._sync_cost()
                await self.astore.finish_run(run_id, RunStatus.INTERRUPTED, "interrupted", wall)
            if observed is not None:
                observed.detach(span_token)
                observed.finished(RunStatus.INTERRUPTED, "interrupted", 0, self._total(), exc)
            raise
        status, reason = self._verdict()
        wall = wall_base + (time.monotonic() - t0)
        with anyio.CancelScope(shield=True):  # the outcome is written even if cancelled now
            await self._sync_cost()
            await self.astore.finish_run(run_id, status, reason, wall)
        nodes = {name: self.infos[name] for name in g._nodes}
        result = GraphResult(run_id, status, dict(self.outputs), self._total(), nodes, reason)
        if observed is not None:
            observed.detach(span_token)
            observed.finished(status, reason, 0, result.cost_usd)
        return result

    async def _on_signal(self, scope: anyio.CancelScope) -> None:
        """SIGINT/SIGTERM while ``run``/``resume`` drive the graph: stop every node, then interrupt."""
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                self.signalled = int(signum)
                self._abort()
                scope.cancel()
                return

    async def _remote_cancelled(self) -> None:
        """Units on the executor are being cancelled: the graph's row says so at once (running ones stop)."""
        await self.astore.finish_run(self.run_id, RunStatus.INTERRUPTED, "interrupted", self.wall_now())

    def _abort(self) -> None:
        """Cancelled: stop sync nodes (running in threads) at their next step boundary."""
        self.aborted = True
        if self.ledger is not None:
            self.ledger.expire()

    def _total(self) -> float:
        return round(self.ledger.spent, 12) if self.ledger is not None else 0.0

    async def _sync_cost(self) -> None:
        """Store the graph's exact total once every node has stopped (what steps cut short spent included)."""
        if self.ledger is not None:
            await store_spent(self.astore, self.store, self.ledger)

    def _verdict(self) -> tuple[RunStatus, str | None]:
        order = [n for n in self.graph.nodes if n in self.infos]

        def named(status: str) -> list[str]:
            return [n for n in order if self.infos[n].status == status]

        if failed := named(RunStatus.FAILED.value):
            first = self.infos[failed[0]]
            detail = f" ({first.stop_reason})" if first.stop_reason else ""
            return RunStatus.FAILED, f"failed: node {first.name!r}{detail}"
        if stalled := named(RunStatus.STALLED.value):
            return RunStatus.STALLED, f"stalled: node {stalled[0]!r}"
        if waiting := named(RunStatus.WAITING.value):
            # a node asked a person: the other branches finished; reply, then resume the graph
            return RunStatus.WAITING, "waiting: " + ", ".join(
                f"node {n!r} ({self.infos[n].stop_reason or 'asks a question'})" for n in waiting
            )
        pending = named(PENDING)
        if self.exhausted or pending:
            tail = f"; not started: {', '.join(pending)}" if pending else ""
            for n in order:
                items = self.infos[n].items
                if n in self.unfinished and items is not None:
                    tail += f"; {n}: {items.pending} of {items.total} items not finished"
            return RunStatus.BUDGET_EXHAUSTED, f"budget: graph {self._limit_hit()}{tail}"
        return RunStatus.COMPLETED, None

    def _limit_hit(self) -> str:
        deadline = self.ledger.deadline if self.ledger is not None else None
        if deadline is not None and deadline - time.monotonic() <= 0:
            return "wall_clock"
        return "usd"

    def _stored_room(self) -> bool:
        """Money left on the graph as the database holds it (nodes on other workers spend as they go)."""
        assert self.ledger is not None
        return stored_room(self.store, self.ledger, time.monotonic())

    def _room(self) -> bool:
        """May a new node start under the graph's budget?"""
        return self.ledger is not None and has_room(self.ledger, time.monotonic())

    def _emit(self, name: str | None, status: str, run_id: str | None) -> None:
        if self.hook is not None:
            try:
                self.hook(ProgressEvent(self.run_id, name, status, run_id))
            except Exception:  # noqa: BLE001, S110 - a display must never break the run
                pass

    def _finish(self, info: NodeInfo) -> None:
        self.infos[info.name] = info
        self._emit(info.name, str(info.status), info.run_id)
        self.done[info.name].set()

    # -- one node -------------------------------------------------------------------
    async def _node(
        self, name: str, idx: int, graph_input: Any, prior: RunInfo | None, limiter: anyio.CapacityLimiter | None
    ) -> None:
        node = self.graph._nodes[name]
        try:
            for up in node.after:
                await self.done[up].wait()
            ups = [self.infos[u] for u in node.after]
            if any(u.status in (PENDING, RunStatus.WAITING.value) or u.name in self.unfinished for u in ups):
                # (downstream of a node waiting for an answer: it runs once the graph resumes)
                return self._finish(self._not_run(name, PENDING))
            ran = [u for u in ups if not u.routed_out]
            if ups and not ran:  # every upstream was left out by routing: so is this node
                return self._finish(self._not_run(name, SKIPPED, NOT_ROUTED))
            blocked = [u.name for u in ran if u.status not in _HANDOFF]
            if blocked:
                return self._finish(self._not_run(name, SKIPPED, f"upstream {blocked[0]!r} did not finish"))
            if node.when is not None:
                try:
                    routed = await self._route(node, [u.name for u in ran])
                except Exception as exc:  # noqa: BLE001 - the node fails, its branch stops
                    exc.add_note(f"loomc: raised by when= of node {name!r} in graph {self.graph.name!r}")
                    return self._finish(NodeInfo(name, RunStatus.FAILED.value,
                                                 stop_reason=f"when: {type(exc).__name__}: {exc}", error=exc))
                if not routed:
                    return self._finish(self._not_run(name, SKIPPED, NOT_ROUTED))
            reused = prior is not None and prior.status is RunStatus.COMPLETED
            try:
                state = self._input(node, graph_input)
                if node.map is not None:
                    state = self._items(node, state, graph_input)
            except Exception as exc:  # noqa: BLE001 - the node fails, its branch stops
                what = "over" if node.map is not None and node.inputs is None else "inputs"
                return self._finish(NodeInfo(name, RunStatus.FAILED.value, stop_reason=f"{what}: {type(exc).__name__}: {exc}",
                                             error=exc))
            if limiter is not None and not reused:
                async with limiter:
                    await self._start(node, idx, state, prior, reused)
            else:
                await self._start(node, idx, state, prior, reused)
        finally:
            if name not in self.infos:
                self.infos[name] = self._not_run(name, RunStatus.INTERRUPTED.value if self.aborted else PENDING)
                self.done[name].set()
        return None

    def _not_run(self, name: str, status: str, reason: str | None = None) -> NodeInfo:
        """A node this attempt did not run: what its run of an earlier attempt, if any, had done."""
        prior = self.priors.get(name)
        if prior is None:
            return NodeInfo(name, status, stop_reason=reason)
        if status == PENDING:  # it ran before: it keeps the status it ended with
            status, reason = prior.status.value, prior.stop_reason
        return NodeInfo(name, status, prior.id, prior.steps, prior.cost_usd, reason)

    async def _route(self, node: _Node, ran: list[str]) -> bool:
        """Whether routing lets ``node`` run: its recorded decision, else ``when`` asked and recorded."""
        decision = self.routes.get(node.name)
        if decision is None:
            assert node.when is not None
            decision = {u: bool(node.when(self.outputs[u])) for u in ran}
            self.routes[node.name] = decision
            # recorded before the node starts: a resumed graph takes the same branch
            self.meta["routes"] = dict(self.routes)
            with anyio.CancelScope(shield=True):
                await self.astore.set_meta(self.run_id, dict(self.meta))
        return any(decision.values())

    def _items(self, node: _Node, upstream: Any, graph_input: Any) -> list[Any]:
        """A map node's items: ``over(upstream_state, graph_input)``, which must be a list."""
        assert node.map is not None
        items = node.map.over(upstream, graph_input)
        if isinstance(items, tuple):
            items = list(items)
        if not isinstance(items, list):
            raise TypeError(
                f"map node {node.name!r}: over returned {type(items).__name__}, not a list; "
                "make over(upstream_state, graph_input) return a list of the items"
            )
        return items

    def _input(self, node: _Node, graph_input: Any) -> Any:
        # upstreams left out by routing have no output: those that ran are handed on
        up = {u: self.outputs[u] for u in node.after if u in self.outputs}
        if node.inputs is not None:
            return node.inputs(up, graph_input)
        if not node.after:
            return graph_input
        if len(node.after) == 1:
            return up[node.after[0]]
        return up

    async def _start(self, node: _Node, idx: int, state: Any, prior: RunInfo | None, reused: bool) -> None:
        name = node.name
        # A node that ran before is resumed even without room: it stops at once on the
        # graph's budget and reports its run (id, steps, cost, last state) as it stands.
        if prior is None and (self.exhausted or not self._room() or (
            self.remote is not None and not await anyio.to_thread.run_sync(self._stored_room)
        )):
            self.exhausted = True
            return self._finish(NodeInfo(name, PENDING, stop_reason="graph budget ran out before it started"))
        if self.aborted:
            return None
        if not reused:
            self._emit(name, RunStatus.RUNNING.value, prior.id if prior else None)
        meta = {"node": name, "graph": self.graph.name}
        limits = None
        if prior is not None and not reused and self.node_iterations is not None:
            limits = Budget.from_dict({**prior.budget, "iterations": self.node_iterations})
        assert self.ledger is not None
        token = item_progress.set(functools.partial(self._items_progress, name)) if node.map is not None else None
        remote_token = item_remote.set((self.remote, node.resources)) if node.map is not None else None
        result: RunResult
        try:
            if self.remote is not None and node.map is None:
                found = await self.remote.run(
                    self.ledger, node.runner, state, call_index=idx, kind="node", meta=meta, budget=limits,
                    resources=node.resources, key=f"node-{name}",
                )
                if found is None:  # cancelled, or not started: no room left by the time a worker took it
                    if self.aborted:
                        return None
                    self.exhausted = True
                    return self._finish(NodeInfo(name, PENDING, stop_reason="graph budget ran out before it started"))
                result = found
            elif node.is_async:
                result = await arun_child(
                    node.runner, self.ledger, state, call_index=idx, meta=meta, budget=limits
                )
            else:
                call = functools.partial(
                    run_child, node.runner, self.ledger, state, call_index=idx, meta=meta, budget=limits
                )
                # A thread cannot be cancelled: on cancellation the node stops at its next step
                # boundary (see _abort) and its result is still recorded.
                with anyio.CancelScope(shield=True):
                    result = await anyio.to_thread.run_sync(call)
        except MapHalt as halt:
            with anyio.CancelScope(shield=True):
                await self._map_halted(name, halt)
            return None
        except Exception as exc:  # noqa: BLE001 - a node that cannot run fails alone
            self._finish(NodeInfo(name, RunStatus.FAILED.value, prior.id if prior else None,
                                  stop_reason=f"{type(exc).__name__}: {exc}", error=exc))
            return None
        finally:
            if token is not None:
                item_progress.reset(token)
            if remote_token is not None:
                item_remote.reset(remote_token)
        if self.aborted and result.status is RunStatus.BUDGET_EXHAUSTED:
            # Stopped by the cancellation, not by a budget: record it as interrupted.
            with anyio.CancelScope(shield=True):
                await self.astore.finish_run(result.run_id, RunStatus.INTERRUPTED, "interrupted", 0.0)
            status = RunStatus.INTERRUPTED.value
        else:
            status = result.status.value
        if result.status is RunStatus.BUDGET_EXHAUSTED and self._graph_stopped(result):
            self.exhausted = True
        items: ItemCounts | None = None
        handoff = status in _HANDOFF or status == RunStatus.STALLED.value
        if node.map is not None:
            # a map node's output is its items' states: only a completed step has them
            items = ItemCounts.from_dict((await self.astore.get_run(result.run_id)).meta.get("items"))
            handoff = status == RunStatus.COMPLETED.value
            if status == RunStatus.BUDGET_EXHAUSTED.value:
                self.unfinished.add(name)
        if handoff:
            self.outputs[name] = result.state
        self._finish(NodeInfo(
            name, status, result.run_id, result.steps, result.cost_usd, result.stop_reason,
            result.error if status != RunStatus.COMPLETED.value else None, reused, items,
        ))
        return None

    def _items_progress(self, name: str, done: int, total: int) -> None:
        if self.hook is not None:
            try:
                self.hook(ProgressEvent(self.run_id, name, "items", None, done, total))
            except Exception:  # noqa: BLE001, S110 - a display must never break the run
                pass

    async def _map_halted(self, name: str, halt: MapHalt) -> None:
        """A map node stopped before all its items finished: record why (no step was committed)."""
        info = await self.astore.get_run(halt.run_id)
        status = halt.status
        if self.aborted:
            status = RunStatus.INTERRUPTED
        elif status is RunStatus.BUDGET_EXHAUSTED:
            self.exhausted = True
        reason = "interrupted" if status is RunStatus.INTERRUPTED else halt.reason
        await self.astore.set_meta(halt.run_id, {**(info.meta or {}), "items": halt.counts.to_dict()})
        await self.astore.finish_run(halt.run_id, status, reason, info.wall_s)
        if status is RunStatus.BUDGET_EXHAUSTED:  # its downstream waits (pending), as for nodes not started
            self.unfinished.add(name)
        self._finish(NodeInfo(
            name, status.value, halt.run_id, info.steps, info.cost_usd, reason, halt.error, False, halt.counts,
        ))

    def _graph_stopped(self, result: RunResult) -> bool:
        """Whether the graph's budget (not the node's own) stopped this node."""
        owner = getattr(result.error, "owner", None)
        if owner == self.run_id:
            return True
        return bool(result.stop_reason and f"enclosing run {self.run_id}" in result.stop_reason)

