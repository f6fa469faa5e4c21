"""``loomc graph run`` and ``loomc graph show``: run a pipeline file's graph with live progress.

The ``loomc`` command (typer) calls :func:`graph_run` and :func:`graph_show`; both return
the exit code and print errors as one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

from loomc._core.errors import LoomcError
from loomc._core.types import RunInfo, RunStatus
from loomc.cli.common import (
    LIMIT_OPTIONS,
    CliError,
    check_graph_input,
    check_new_limits,
    checkpoint_path,
    error_line,
    fail,
    find_run,
    given_database_path,
    given_limits,
    import_file,
    require_database,
    writable_store,
)
from loomc.cli.render import Col, clip, money, plain_table
from orchestration._graph import PENDING, Graph, GraphResult, NodeInfo, ProgressEvent

__all__ = ["graph_run", "graph_show", "load_graph"]

#: What to add to ``loomc graph run`` for new limits to apply.
GRAPH_RESUME = "--resume RUN_ID (a new run takes the graph's own budget)"


# ---------------------------------------------------------------------------------
# Loading a pipeline file


def _import_file(path: str) -> Any:
    file = Path(path)
    if not file.is_file():
        raise CliError(f"no pipeline file at {path}; pass the path of a .py file that defines a Graph")
    return import_file(file, file.stem if file.stem.isidentifier() else "loomc_pipeline")


def load_graph(path: str, graph_name: str | None = None) -> Graph:
    """Import ``path`` and return its :class:`Graph` (the one named ``graph_name`` if several)."""
    module = _import_file(path)
    found: dict[int, tuple[str, Graph]] = {}
    for var, value in vars(module).items():
        if isinstance(value, Graph) and id(value) not in found:
            found[id(value)] = (var, value)
    graphs = list(found.values())
    if graph_name is not None:
        for var, g in graphs:
            if graph_name in (g.name, var):
                return g
        names = ", ".join(g.name for _, g in graphs) or "none"
        raise CliError(f"no graph named {graph_name!r} in {path} (graphs: {names})")
    if not graphs:
        raise CliError(f"{path} defines no Graph at module level; create one with orchestration.Graph(...)")
    if len(graphs) > 1:
        names = ", ".join(g.name for _, g in graphs)
        raise CliError(f"{path} defines several graphs ({names}); pick one with --graph NAME")
    return graphs[0][1]


def _read_input(input_json: str | None, input_file: str | None) -> Any:
    if input_file is not None:
        try:
            text = Path(input_file).read_text()
        except OSError as exc:
            raise CliError(f"cannot read --input-file {input_file}: {exc.strerror or exc}") from exc
        source = f"--input-file {input_file}"
    elif input_json is not None:
        text, source = input_json, "--input"
    else:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc


def _store_for(graph: Graph, db: str | None, *, resume: bool) -> Any:
    """``--db``, else ``$LOOMC_DB``, else the graph's own checkpoint; a resume never creates a database."""
    path = given_database_path(db)
    if path is not None:
        return writable_store(path, existing=resume)
    if resume:
        require_database(checkpoint_path(graph.checkpoint))
    return graph.store()


# ---------------------------------------------------------------------------------
# Live progress


class _Progress:
    """Node statuses from the run's events, steps and costs polled from the store."""

    def __init__(self, graph: Graph, store: Any, path: str) -> None:
        self.graph = graph
        self.store = store
        self.path = path
        self.run_id: str | None = None
        self.status: dict[str, str] = dict.fromkeys(graph.nodes, PENDING)
        self.items: dict[str, tuple[int, int]] = {}  # a map node's items: (finished, total)
        self.runs: dict[str, RunInfo] = {}
        self.lock = threading.Lock()
        self.tty = sys.stdout.isatty()
        self.cap_usd: float | None = graph.budget.usd  # the graph's USD limit (a resume may give a new one)

    def hook(self, event: ProgressEvent) -> None:
        with self.lock:
            self.run_id = event.graph_run_id
            if event.node is None:
                if not self.tty:
                    print(f"graph {self.graph.name}: run {event.graph_run_id}", flush=True)
                return
            if event.status == "items":
                done, total = event.items_done or 0, event.items_total or 0
                self.items[event.node] = (done, total)
                # a plain log says where a long map is every tenth of the way, not every item
                if self.tty or (done != total and done % max(1, total // 10)):
                    return
                print(f"  {event.node}: {done}/{total} items", flush=True)
                return
            self.status[event.node] = event.status
        if not self.tty:
            suffix = f" (run {event.run_id})" if event.run_id else ""
            print(f"  {event.node}: {event.status}{suffix}", flush=True)

    def poll(self) -> None:
        run_id = self.run_id
        if run_id is None:
            return
        index = {}
        info = self.store.get_run(run_id)
        if info is not None:
            index = {int(n["index"]): n["name"] for n in info.meta.get("nodes", [])}
        for child in self.store.children(run_id):
            name = index.get(child.call_index) if child.call_index is not None else None
            if name is not None:
                self.runs[name] = child

    def table(self, result: GraphResult | None = None) -> Any:
        from rich.table import Table

        total = result.cost_usd if result is not None else sum(r.cost_usd for r in self.runs.values())
        cap = f" of {money(self.cap_usd)}" if self.cap_usd is not None else ""
        title = f"graph {self.graph.name}" + (f"  run {self.run_id}" if self.run_id else "")
        table = Table(title=title, caption=f"total {money(total)}{cap}", title_justify="left")
        for col in ("NODE", "STATUS", "STEPS", "COST", "RUN"):
            table.add_column(col, justify="right" if col in ("STEPS", "COST") else "left")
        for name in self.graph.nodes:
            if result is not None:
                n = result.nodes[name]
                status, steps, cost, rid = _node_status(n), n.steps, n.cost_usd, n.run_id
            else:
                run = self.runs.get(name)
                status = self.status[name]
                if run is not None and status == RunStatus.RUNNING.value:
                    status = run.status.value
                steps, cost, rid = (run.steps, run.cost_usd, run.id) if run else (0, 0.0, None)
                if name in self.items:
                    status += " {}/{} items".format(*self.items[name])
            table.add_row(name, status, str(steps), money(cost), rid or "-")
        return table


def _node_status(n: NodeInfo) -> str:
    """A node's outcome in a word or three: ``completed (done before)``, ``skipped (not routed)``, its items."""
    status = str(n.status)
    if n.reused:
        status += " (done before)"
    if n.routed_out:
        status += " (not routed)"
    if n.items is not None:
        status += f" {n.items}"
    return status


def _summary_text(progress: _Progress, result: GraphResult) -> str:
    rows = []
    for name in progress.graph.nodes:
        n = result.nodes[name]
        status = _node_status(n)
        rows.append((name, status, str(n.steps), money(n.cost_usd), n.run_id or "-"))
    return "\n".join(plain_table([Col(h) for h in ("NODE", "STATUS", "STEPS", "COST", "RUN")], rows))


# ---------------------------------------------------------------------------------
# Commands


def graph_run(
    path: str,
    graph_name: str | None = None,
    input_json: str | None = None,
    input_file: str | None = None,
    resume: str | None = None,
    db: str | None = None,
    *,
    force: bool = False,
    usd: float | None = None,
    iterations: float | None = None,
    wall_clock: str | None = None,
    executor: str | None = None,
    address: str | None = None,
) -> int:
    """``loomc graph run PATH``: run (or ``--resume``) the file's graph with live progress.

    With ``--resume``, ``usd``, ``iterations`` and ``wall_clock`` give new limits, built
    as ``loomc resume --run`` builds them: the graph's ``usd`` and ``wall_clock``, and the
    ``iterations`` of each node that resumes. ``executor="dask"`` runs the nodes on the
    Dask scheduler at ``address`` (``None``: a local cluster); the store must be PostgreSQL.

    Returns:
        0 when the graph completed, 1 otherwise (errors: one line on stderr), 130 when
        interrupted.
    """
    try:
        limits = given_limits(usd, iterations, wall_clock)
        check_graph_input(input_json, input_file, resuming=resume is not None)
        check_new_limits(limits, resuming=resume is not None, how=GRAPH_RESUME)
        graph = load_graph(path, graph_name)
        graph_input = _read_input(input_json, input_file) if resume is None else None
        store = _store_for(graph, db, resume=resume is not None)
        budget = _new_limits(store, resume, limits) if resume is not None and limits else None
        progress = _Progress(graph, store, path)
        if budget is not None:
            progress.cap_usd = budget.usd
        chosen = _executor(executor, address, store)
        result = _run_live(graph, store, progress, graph_input, resume, force, budget, chosen)
    except KeyboardInterrupt:
        rid = progress.run_id if "progress" in locals() else None
        hint = f"; resume with: loomc graph run {path} --resume {rid}" if rid else ""
        error_line(f"interrupted{hint}")
        return 130
    except (CliError, LoomcError, ValueError, TypeError, OSError) as exc:
        return fail(str(exc) or type(exc).__name__)
    _print_end(path, progress, result)
    if result.status is RunStatus.COMPLETED:
        return 0
    more = ""
    if result.status is RunStatus.BUDGET_EXHAUSTED:
        more = f"; give it more with `loomc graph run {path} --resume {result.run_id} --usd/--iterations/--wall-clock ...`"
    return fail(f"graph run {result.run_id} ended {result.status.value}: {result.stop_reason or ''}".rstrip(": ") + more)


def _new_limits(store: Any, run_id: str, limits: dict[str, Any]) -> Any:
    """The graph run's stored budget with the limits given on the command line."""
    from loomc.cli.resume import resume_budget

    info = find_run(store, run_id)
    try:
        return resume_budget(info.budget, **limits)
    except (TypeError, ValueError) as exc:
        raise CliError(f"{LIMIT_OPTIONS}: {exc}") from exc


def _executor(name: str | None, address: str | None, store: Any) -> Any:
    """``--executor dask [--address ADDR]``: the executor, its store checked before anything runs."""
    if name != "dask":
        return None
    from orchestration._dask import DaskExecutor

    executor = DaskExecutor(address)
    executor.check_store(store)
    return executor


def _run_live(
    graph: Graph, store: Any, progress: _Progress, graph_input: Any, resume: str | None, force: bool, budget: Any = None,
    executor: Any = None,
) -> GraphResult:
    def go() -> GraphResult:
        try:
            if resume is not None:
                return graph.resume(resume, budget=budget, force=force, store=store, on_progress=progress.hook,
                                    executor=executor)
            return graph.run(graph_input, store=store, on_progress=progress.hook, executor=executor)
        finally:
            if executor is not None:
                executor.close()

    if not progress.tty:
        return go()
    from rich.console import Console
    from rich.live import Live

    stop = threading.Event()
    with Live(progress.table(), console=Console(), refresh_per_second=4, transient=True) as live:

        def refresh() -> None:
            while not stop.wait(0.25):
                try:
                    progress.poll()
                    live.update(progress.table())
                except Exception:  # noqa: BLE001, S112 - the display never breaks the run
                    continue

        t = threading.Thread(target=refresh, name="loomc-graph-progress", daemon=True)
        t.start()
        try:
            return go()
        finally:
            stop.set()
            t.join(timeout=2)


def _print_end(path: str, progress: _Progress, result: GraphResult) -> None:
    progress.run_id = result.run_id
    cap = f" of {money(progress.cap_usd)}" if progress.cap_usd is not None else ""
    head = f"graph {progress.graph.name}: run {result.run_id} {result.status.value}, cost {money(result.cost_usd)}{cap}"
    if result.stop_reason:
        head += f" ({result.stop_reason})"
    head = clip(head)  # the stop reason can quote a node's error
    if progress.tty:
        from rich.console import Console

        console = Console()
        console.print(progress.table(result))
        console.print(head, markup=False, highlight=False)
    else:
        print(_summary_text(progress, result))
        print(head)
    print(f"run id: {result.run_id}")
    print(f"resume: loomc graph run {path} --resume {result.run_id}")
    print(f"tree:   loomc show {result.run_id} --tree")


def graph_show(path: str, graph_name: str | None = None, mermaid: bool = False) -> int:
    """``loomc graph show PATH``: draw the file's graph as text, or as mermaid with ``--mermaid``."""
    try:
        graph = load_graph(path, graph_name)
    except (CliError, LoomcError, ValueError, TypeError, OSError) as exc:
        return fail(str(exc))
    print(graph.to_mermaid() if mermaid else graph.to_text())
    return 0
