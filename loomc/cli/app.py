"""The ``loomc`` command: list, inspect, follow, export and resume runs; run graphs.

Every command reads the checkpoint database (``--db``, else ``$LOOMC_DB``, else
``.loomc/checkpoints.db``) and never creates one. A unique prefix of a run id works
everywhere. Errors print one line on stderr (``loomc: ...``) and exit 1; usage errors
exit 2. Output is plain, aligned text when stdout is not a terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from loomc._core import events as _step_events
from loomc._core.errors import LoomcError
from loomc._core.types import RunInfo, RunStatus
from loomc.cli.common import (
    LIMIT_OPTIONS,
    CliError,
    OptionError,
    check_executor,
    check_graph_input,
    check_new_limits,
    database_path,
    error_line,
    fail,
    find_run,
    given_limits,
    open_reader,
    root_run,
    writable_store,
)

if TYPE_CHECKING:
    from loomc.store.protocol import CheckpointStore

__all__ = ["app", "main"]

#: Help and usage errors are drawn by rich on a terminal, as plain text otherwise (faster, parseable).
_MARKUP: Any = "rich" if sys.stdout.isatty() else None

app = typer.Typer(
    name="loomc",
    rich_markup_mode=_MARKUP,
    help="Durable, budgeted agent loops: see every run, every step, every cost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
graph_app = typer.Typer(
    help="Run and draw multi-agent graphs (orchestration.Graph).",
    rich_markup_mode=_MARKUP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(graph_app, name="graph")
db_app = typer.Typer(
    help="Whole databases: describe one, copy every run between two (SQLite, PostgreSQL), vacuum one.",
    rich_markup_mode=_MARKUP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(db_app, name="db")

DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db", help="Checkpoint database: a SQLite file or a postgresql:// DSN [default: $LOOMC_DB, else .loomc/checkpoints.db].",
        show_default=False,
    ),
]
RunIdArg = Annotated[str, typer.Argument(metavar="RUN_ID", help="A run id, or a unique prefix of one.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
# New limits for a resume (``loomc resume --run``, ``loomc graph run --resume``).
UsdOpt = Annotated[
    float | None,
    typer.Option("--usd", help="With a resume: a new USD limit (the only way to get more; inf: no limit).", show_default=False),
]
IterationsOpt = Annotated[
    float | None,
    typer.Option("--iterations", metavar="N", show_default=False,
                 help="With a resume: a new iteration limit (a graph: for each node that resumes; inf: no limit)."),
]
WallClockOpt = Annotated[
    str | None,
    typer.Option("--wall-clock", help="With a resume: a new wall-clock limit (30s, 10m, 1h30m; inf: no limit).", show_default=False),
]
PipelineArg = Annotated[Path, typer.Argument(help="A Python file defining an orchestration.Graph.", show_default=False)]
GraphOpt = Annotated[
    str | None, typer.Option("--graph", "-g", help="The graph's name, when the file defines several.", show_default=False)
]


def _usage(check: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    """Run an options ``check``; what it refuses is a usage error (exit 2, with the usage line)."""
    try:
        check(*args, **kwargs)
    except OptionError as exc:
        raise typer.BadParameter(str(exc), param_hint=exc.options) from exc


def main() -> None:
    """Entry point of the ``loomc`` command."""
    try:
        app(prog_name="loomc")
    except (LoomcError, CliError) as exc:
        raise SystemExit(fail(str(exc))) from None
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        error_line("interrupted")
        raise SystemExit(130) from None
    except BrokenPipeError:
        # `loomc runs | head`: the reader left; say nothing more.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(0) from None


# ---------------------------------------------------------------------------------
# Reading the store


def _open(db: str | None) -> Any:
    """The database named by ``--db`` / ``$LOOMC_DB`` / the default, opened for reading.

    A reader never creates a database, nor migrates one: a database older than this
    loomc reads is refused untouched (``create=False``). A ``postgresql://`` DSN opens a
    :class:`~loomc.PostgresStore`.
    """
    return open_reader(database_path(db))


# ---------------------------------------------------------------------------------
# runs


@app.command()
def runs(
    status: Annotated[
        RunStatus | None,
        typer.Option("--status", help="Only runs with this status.", case_sensitive=False, show_default=False),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=0, help="At most N runs (0: all).")] = 20,
    all_: Annotated[bool, typer.Option("--all", "-a", help="Include nested runs (child loops, graph nodes).")] = False,
    db: DbOpt = None,
    json_: JsonOpt = False,
) -> None:
    """List runs, newest first: ID STATUS STEPS COST CREATED NAME."""
    from loomc.cli import render as r

    store = _open(db)
    found = store.list_runs(status=status.value if status else None, limit=limit or None, roots_only=not all_)
    if json_:
        sys.stdout.write(r.dumps([r.run_dict(i) for i in found]) + "\n")
        return
    out = r.Output()
    if not found:
        what = f"{status.value} " if status else ""
        sys.stderr.write(f"loomc: no {what}runs in {store.path}\n")
        return
    rows = [[i.id, out.status(i.status), str(i.steps), r.money(i.cost_usd), r.when(i.created_at), r.clip(i.name, 120)] for i in found]
    out.table(r.RUN_COLS, rows)
    if out.tty and limit and len(found) == limit:
        out.console.print(f"[dim]newest {limit} shown; --limit N for more, --all for nested runs[/dim]")


# ---------------------------------------------------------------------------------
# show


def _tree_json(store: CheckpointStore, info: RunInfo, depth: int = 0) -> dict[str, Any]:
    from loomc.cli import render as r

    kids = store.children(info.id)
    d = r.run_dict(info)
    d["own_cost_usd"] = r.own_cost(info, kids)
    d["children"] = [_tree_json(store, k, depth + 1) for k in kids] if depth < 50 else []
    return d


def _tree_label(out: Any, info: RunInfo, kids: list[RunInfo], route: str = "") -> Any:
    from rich.text import Text

    from loomc.cli import render as r

    label = Text()
    label.append(r.visible(info.id), style="bold")
    node = info.meta.get("node")
    name = r.clip(info.name, 120)
    if info.kind == "item":
        label.append(f"  item {info.call_index} ({name})  ")
    else:
        label.append(f"  {info.kind} {r.clip(str(node), 120)} ({name})  " if info.kind == "node" and node else f"  {info.kind} {name}  ")
    label.append_text(Text(info.status.value, style=r.STATUS_STYLE.get(info.status, "") if out.tty else ""))
    label.append(f"  steps {info.steps}  own {r.money(r.own_cost(info, kids))}  total {r.money(info.cost_usd)}")
    if info.parent_step is not None and info.kind not in ("node", "item"):
        label.append(f"  (parent step {info.parent_step})", style="dim")
    if route:
        label.append(f"  routed ({route})", style="dim")
    return label


#: How many unfinished items a folded map node still lists one by one in ``show --tree``.
_FOLDED_ITEMS = 10


def _route_text(answers: Any) -> str:
    """``when``'s recorded answers for a node: ``classify: true, draft: false``."""
    if not isinstance(answers, dict):
        return ""
    return ", ".join(f"{up}: {'true' if yes else 'false'}" for up, yes in answers.items())


def _item_counts(kids: list[RunInfo]) -> str:
    """``10 items: 8 completed, 2 failed`` for a map node's item runs."""
    counts: dict[str, int] = {}
    for k in kids:
        counts[k.status.value] = counts.get(k.status.value, 0) + 1
    parts = ", ".join(f"{n} {st}" for st, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{len(kids)} items: {parts}"


def _not_run_nodes(info: RunInfo, kids: list[RunInfo]) -> list[tuple[str, str]]:
    """A graph's declared nodes without a run: ``(name, why)``, ``why`` saying if routing left it out."""
    have = {k.meta.get("node") for k in kids if k.kind == "node"}
    stored = info.meta.get("routes")
    routes: dict[str, Any] = stored if isinstance(stored, dict) else {}
    not_routed: set[str] = set()
    out: list[tuple[str, str]] = []
    for n in info.meta.get("nodes", []):
        if not isinstance(n, dict) or "name" not in n or n["name"] in have:
            continue
        name, after = str(n["name"]), [str(a) for a in n.get("after", [])]
        answers = routes.get(name)
        if isinstance(answers, dict) and not any(answers.values()):
            not_routed.add(name)
            out.append((name, f"skipped  not routed ({_route_text(answers)})"))
        elif after and all(a in not_routed for a in after):
            not_routed.add(name)
            out.append((name, "skipped  not routed (no upstream ran)"))
        else:
            out.append((name, "pending"))
    return out


def _node_rows(info: RunInfo, kids: list[RunInfo]) -> list[tuple[str, Any, str, str, str, list[str], RunInfo | None]]:
    """A graph's nodes in declaration order, with their runs (``pending`` for a node not started)."""
    from loomc.cli import render as r

    by_node = {k.meta.get("node"): k for k in kids if k.kind == "node"}
    declared = [n for n in info.meta.get("nodes", []) if isinstance(n, dict) and "name" in n]
    rows: list[tuple[str, Any, str, str, str, list[str], RunInfo | None]] = []
    not_run = dict(_not_run_nodes(info, kids))
    for n in declared:
        k = by_node.pop(n["name"], None)
        after = [str(a) for a in n.get("after", [])]
        if k is None:
            why = not_run.get(str(n["name"]), "pending")
            status = "skipped (not routed)" if why.startswith("skipped") else "pending"
            rows.append((str(n["name"]), status, "0", r.money(0), "-", after, None))
        else:
            rows.append((str(n["name"]), k.status, str(k.steps), r.money(k.cost_usd), k.id, after, k))
    for name, k in by_node.items():  # nodes the stored graph no longer declares
        rows.append((str(name or k.name), k.status, str(k.steps), r.money(k.cost_usd), k.id, [], k))
    return rows


def _add_tree(out: Any, store: CheckpointStore, node: Any, info: RunInfo, depth: int, items: bool, route: str = "") -> None:
    kids = store.children(info.id)
    branch = node.add(_tree_label(out, info, kids, route))
    if depth > 50:  # a malformed (cyclic) parent chain must not recurse forever
        return
    _add_kids(out, store, branch, info, kids, depth, items)


def _add_kids(out: Any, store: CheckpointStore, branch: Any, info: RunInfo, kids: list[RunInfo], depth: int, items: bool) -> None:
    """A run's children under ``branch``: a map node's items folded unless ``items``; a graph's routing."""
    from rich.text import Text

    if not items and kids and all(k.kind == "item" for k in kids):
        # thousands of items: one line, then only those that did not complete
        open_items = [k for k in kids if k.status is not RunStatus.COMPLETED]
        more = f"; {len(open_items) - _FOLDED_ITEMS} more not completed" if len(open_items) > _FOLDED_ITEMS else ""
        branch.add(Text(f"{_item_counts(kids)}{more}  (loomc show {info.id} --tree --items lists every item)"))
        for k in open_items[:_FOLDED_ITEMS]:
            _add_tree(out, store, branch, k, depth + 1, items)
        return
    stored = info.meta.get("routes") if info.kind == "graph" else None
    routes: dict[str, Any] = stored if isinstance(stored, dict) else {}
    for k in kids:
        _add_tree(out, store, branch, k, depth + 1, items, _route_text(routes.get(str(k.meta.get("node")))))
    if info.kind == "graph" and routes:  # the nodes routing left out (they have no run)
        for name, why in _not_run_nodes(info, kids):
            if why != "pending":
                branch.add(Text(f"node {name}  {why}"))


def _show_tree(out: Any, store: CheckpointStore, info: RunInfo, items: bool = False) -> None:
    from rich.tree import Tree

    kids = store.children(info.id)
    tree = Tree(_tree_label(out, info, kids), guide_style="dim" if out.tty else "")
    _add_kids(out, store, tree, info, kids, 0, items)
    out.render(tree)


def _header(info: RunInfo, out: Any) -> list[tuple[str, Any]]:
    from loomc.cli import render as r

    pairs: list[tuple[str, Any]] = [("run", info.id), ("name", info.name or "-"), ("kind", info.kind)]
    pairs.append(("status", out.status(info.status)))
    if info.stop_reason:
        pairs.append(("stopped", info.stop_reason))
    elif info.status is RunStatus.CRASHED:
        pairs.append(("stopped", "its process died (resume it to continue from the last step)"))
    elif info.status is RunStatus.RUNNING and info.owner:
        pairs.append(("owner", info.owner))
    pairs.extend(
        (label, text) for label, text in r.budget_lines(info) if not (info.kind == "graph" and label == "iterations" and "no limit" in text)
    )
    pairs.extend(r.held_lines(info))
    pairs.append(("created", r.when(info.created_at) + " UTC"))
    if info.parent_run_id:
        pairs.append(("parent", f"{info.parent_run_id} (step {info.parent_step})"))
    if info.forked_from:
        pairs.append(("forked from", f"{info.forked_from} at step {info.forked_step}"))
    return pairs


def _question_lines(store: Any, info: RunInfo) -> list[tuple[str, Any]]:
    """What a waiting run (or a run below it) asks, and how to answer."""
    if info.status is not RunStatus.WAITING or not callable(getattr(store, "questions", None)):
        return []
    pairs: list[tuple[str, Any]] = []
    for q in [q for q in store.questions(info.id, True) if q.answer is None]:
        where = "" if q.run_id == info.id else f"run {q.run_id}, "
        lines = q.text.splitlines() or [""]
        pairs.append(("question", f"({where}step {q.step_n}) {lines[0]}"))
        pairs.extend(("", line) for line in lines[1:])  # each line escaped on its own
        if q.json_schema:
            pairs.append(("schema", q.json_schema))
        pairs.append(("answer with", f"loomc reply {q.run_id} 'JSON'"))
    return pairs


def _window(first: int | None, last: int | None, all_: bool, tty: bool) -> tuple[int | None, int | None]:
    """``(first, last)`` steps to show: as asked, else the last few on a terminal, else all."""
    if all_:
        if first is not None or last is not None:
            raise typer.BadParameter("--all shows every step: drop --first/--last, or drop --all", param_hint="--all")
        return None, None
    if first is None and last is None and tty:
        from loomc.cli.render import TTY_STEPS

        return None, TTY_STEPS
    return first, last



def _step_rows(
    store: CheckpointStore, run_id: str, first: int | None, last: int | None, *, full: bool
) -> tuple[list[tuple[Any, float]], int, int, int, int]:
    """The steps to print with their cumulative cost, and what is left out.

    Returns ``(rows, skipped before, index of the gap, skipped in the gap, skipped after)``.
    Only the rows shown are read (``LIMIT``); what a window leaves out is counted and
    summed by SQLite, never loaded.
    """
    from loomc.cli import render as r

    chars = None if full else r.ERROR_READ
    head = r.read_steps(store, run_id, first=first, error_chars=chars) if first is not None or last is None else []
    tail = r.read_steps(store, run_id, head[-1].step_n if head else -1, last=last, error_chars=chars) if last is not None else []
    rows: list[tuple[Any, float]] = []
    cumul = 0.0
    for rec in head:
        cumul += rec.cost_usd
        rows.append((rec, cumul))
    before = gap = after = 0
    if tail:
        skipped, cumul = r.step_totals(store, run_id, tail[0].step_n)
        if head:
            gap = skipped - len(head)
        else:
            before = skipped
        for rec in tail:
            cumul += rec.cost_usd
            rows.append((rec, cumul))
    elif first is not None and head:
        after = r.step_totals(store, run_id, 2**62)[0] - len(head)
    return rows, before, len(head), gap, after


@app.command()
def show(
    run_id: RunIdArg,
    tree: Annotated[bool, typer.Option("--tree", "-t", help="Draw the run and all its nested runs.")] = False,
    items: Annotated[
        bool, typer.Option("--items", help="List every item of a map node (folded by default to a count and those not completed).")
    ] = False,
    first: Annotated[
        int | None, typer.Option("--first", min=0, help="Only the first N steps (with --last: both ends).", show_default=False)
    ] = None,
    last: Annotated[
        int | None,
        typer.Option("--last", min=0, help="Only the last N steps [default on a terminal: the last 50].", show_default=False),
    ] = None,
    all_: Annotated[bool, typer.Option("--all", "-a", help="Every step, even on a terminal.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Errors and reasons whole, not cut to fit a line.")] = False,
    db: DbOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Show a run: budget used and left, why it stopped, and STEP COST CUMUL SCORE ERROR per step."""
    from loomc.cli import render as r

    store = _open(db)
    info = find_run(store, run_id)
    out = r.Output()
    if json_:
        if tree:
            sys.stdout.write(r.dumps(_tree_json(store, info)) + "\n")
            return
        data = r.run_dict(info)
        kids = store.children(info.id)
        data["own_cost_usd"] = r.own_cost(info, kids)
        pick_first, pick_last = _window(first, last, all_, tty=False)
        picked, before, _, gap, after = _step_rows(store, info.id, pick_first, pick_last, full=True)
        data["history"] = [r.step_dict(rec, cumul) for rec, cumul in picked]
        if pick_first is not None or pick_last is not None:
            data["steps_not_shown"] = before + gap + after
        data["children"] = [r.run_dict(k) for k in kids]
        if callable(getattr(store, "questions", None)):
            data["questions"] = [r.question_dict(q) for q in store.questions(info.id, True)]
        if info.kind == "graph":
            data["nodes"] = [
                {
                    "node": name,
                    "status": st if isinstance(st, str) else st.value,
                    "run_id": k.id if k else None,
                    "steps": k.steps if k else 0,
                    "cost_usd": k.cost_usd if k else 0.0,
                    "after": after,
                }
                for name, st, _, _, _, after, k in _node_rows(info, kids)
            ]
        sys.stdout.write(r.dumps(data) + "\n")
        return
    if tree:
        _show_tree(out, store, info, items)
        return
    pick_first, pick_last = _window(first, last, all_, out.tty)
    out.kv(_header(info, out) + _question_lines(store, info), width=None if full else r.VALUE_WIDTH)
    kids = store.children(info.id)
    picked, before, at, gap, after = _step_rows(store, info.id, pick_first, pick_last, full=full)
    if info.kind == "graph":
        out.line()
        out.table(
            (r.Col("NODE"), r.Col("STATUS"), r.Col("STEPS", True), r.Col("COST", True), r.Col("RUN"), r.Col("AFTER")),
            [
                [name, out.status(st) if k else st, steps, cost, rid, ",".join(after) or "-"]
                for name, st, steps, cost, rid, after, k in _node_rows(info, kids)
            ],
        )
    if picked or info.kind != "graph":
        out.line()
        if picked:
            rows = [r.step_cells(rec, cumul, full=full) for rec, cumul in picked]
            cut = not full and any(row[4].endswith(r.CUT) for row in rows)
            if gap:
                rows.insert(at, ["...", "", "", "", f"{gap} steps not shown", ""])
            if before:
                out.line(f"... {before} earlier steps not shown: --all shows every step (--first N, --last N)")
            out.table(r.STEP_COLS, rows)
            if after:
                out.line(f"... {after} later steps not shown: --all shows every step (--first N, --last N)")
            if gap:
                out.line(f"... {gap} steps not shown: --all shows every step (--first N, --last N)")
            if cut:
                out.line(f"errors are cut to fit a line: loomc show {info.id} --full (or loomc export {info.id}) shows them whole")
        else:
            out.line("no steps committed yet")
    if kids and info.kind != "graph" and not items and all(k.kind == "item" for k in kids):
        out.line()
        out.line(f"{_item_counts(kids)} (loomc show {info.id} --items lists every item)")
        kids = [k for k in kids if k.status is not RunStatus.COMPLETED][:_FOLDED_ITEMS]
    if kids and info.kind != "graph":
        out.line()
        out.line(f"nested runs: {len(kids)} (loomc show {info.id} --tree)")
        out.table(
            (r.Col("ID"), r.Col("STATUS"), r.Col("STEPS", True), r.Col("COST", True), r.Col("STEP", True), r.Col("NAME")),
            [[k.id, out.status(k.status), str(k.steps), r.money(k.cost_usd), str(k.parent_step), r.clip(k.name, 120)] for k in kids],
        )


# ---------------------------------------------------------------------------------
# resume


def _import_hint(info: RunInfo) -> tuple[str, str]:
    """``(import line, function name)`` for the resume snippet."""
    module, _, qualname = info.name.partition(":")
    top = qualname.split(".")[0] or "fn"
    if module == "__main__":
        file = info.meta.get("file")
        stem = Path(file).stem if isinstance(file, str) and file else "your_script"
        module = stem
    if "<locals>" in qualname:
        return f"# {info.name} is defined inside a function: get hold of that loop object", "fn"
    return f"from {module} import {top}", qualname


@app.command()
def resume(
    run_id: RunIdArg,
    run: Annotated[bool, typer.Option("--run", help="Import the run's function (from the working directory) and resume it now.")] = False,
    usd: UsdOpt = None,
    iterations: IterationsOpt = None,
    wall_clock: WallClockOpt = None,
    db: DbOpt = None,
) -> None:
    """How to resume a run, and what is left of its budget; --run resumes it here, with live progress."""
    from loomc.cli import render as r

    limits = given_limits(usd, iterations, wall_clock)
    _usage(check_new_limits, limits, resuming=run, how="--run")
    store = _open(db)
    info = find_run(store, run_id)
    if run:
        from loomc.cli.resume import resume_budget, resume_here

        try:
            budget = resume_budget(info.budget, **limits)
        except (TypeError, ValueError) as exc:
            raise typer.BadParameter(str(exc), param_hint=LIMIT_OPTIONS) from exc
        raise typer.Exit(resume_here(store, info, budget))
    out = r.Output()
    pairs: list[tuple[str, Any]] = [("run", info.id), ("function", info.name or "-")]
    file = info.meta.get("file")
    if isinstance(file, str) and file:
        pairs.append(("file", file))
    pairs.append(("status", out.status(info.status)))
    if info.stop_reason:
        pairs.append(("stopped", info.stop_reason))
    elif info.status is RunStatus.CRASHED:
        pairs.append(("stopped", "its process died; resuming continues from the last committed step"))
    pairs.extend(r.left_lines(info))
    out.kv(pairs)
    out.line()
    rid = info.id
    if info.parent_run_id:
        root = root_run(store, info)
        out.line(f"{rid} is a nested run of {root.id} ({root.name}); resume the root run, which resumes its nested runs:")
        out.line(f"    loomc resume {root.id}")
        return
    if info.kind == "graph":
        out.line("a graph run: resume it with its pipeline file")
        out.line(f"    loomc graph run PIPELINE.py --resume {rid}")
        out.line("or from Python:")
        out.line(f"    graph.resume({rid!r})")
        return
    if info.status is RunStatus.COMPLETED:
        out.line("this run completed: resuming it returns its final state without running a step")
    elif info.status is RunStatus.RUNNING:
        out.line(f"this run is running in a live process ({info.owner}); follow it with `loomc watch {rid}`")
        out.line("resume it only once that process has stopped:")
    imp, fn = _import_hint(info)
    out.line("resume it from Python:")
    out.line(f"    {imp}")
    out.line(f"    state = {fn}.resume({rid!r})")
    out.line("with more budget (the only way to get more):")
    out.line("    from loomc import Budget")
    out.line(f"    state = {fn}.resume({rid!r}, budget=Budget(usd=..., iterations=..., wall_clock=...))")
    out.line("or from here (imports the function from the working directory):")
    out.line(f"    loomc resume {rid} --run")
    if info.status is RunStatus.BUDGET_EXHAUSTED:
        out.line(f"    loomc resume {rid} --run --usd ... --iterations ... --wall-clock ...")


# ---------------------------------------------------------------------------------
# watch


@app.command()
def watch(
    run_id: RunIdArg,
    interval: Annotated[float, typer.Option("--interval", min=0.05, help="Seconds between polls.")] = 0.5,
    db: DbOpt = None,
) -> None:
    """Follow a run from another terminal: new steps appear as they commit; ends when the run ends."""
    from loomc.cli.follow import Follower

    store = _open(db)
    info = find_run(store, run_id)
    follower = Follower(store, info.id)
    follower.run_until_ended(interval)
    raise typer.Exit(0)


# ---------------------------------------------------------------------------------
# ui


@app.command()
def ui(
    db: DbOpt = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; any but a loopback one needs --token.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on (0: a free one).")] = 8765,
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="LOOMC_UI_TOKEN", show_default=False,
                     help="A secret every request must carry (required with a non-loopback --host)."),
    ] = None,
) -> None:
    """Serve a local web page of runs: list, steps, chart, tree, live updates (needs loomc[ui])."""
    from loomc.ui._extra import require
    from loomc.ui._guard import check_bind

    try:
        check_bind(host, token)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    require()
    from loomc.ui._serve import serve

    store = _open(db)
    serve(store, host, port, token, where=str(store.path))


# ---------------------------------------------------------------------------------
# export


def _export_node(store: CheckpointStore, info: RunInfo, depth: int = 0) -> dict[str, Any]:
    from loomc.cli import render as r
    from loomc.store.codec import decode

    kids = store.children(info.id)
    stored = store.stored_input(info.id)
    state_type, input_blob, next_from = stored if stored is not None else (None, None, None)
    d = r.run_dict(info)
    d["own_cost_usd"] = r.own_cost(info, kids)
    d["state_type"] = state_type or "json"
    d["next_from"] = next_from
    # States are exported as the JSON they are stored as (a pydantic model's fields,
    # named by state_type); the user's modules are never imported to read them.
    d["input"] = decode(input_blob, "json")
    steps, cumul = [], 0.0
    for s in store.stored_steps(info.id):
        cumul += s.cost_usd
        steps.append(
            {
                "step": s.step_n,
                "cost_usd": s.cost_usd,
                "cumul_usd": round(cumul, 9),
                "score": s.score,
                "error": s.error,
                **r.event_fields(_step_events.decode(s.event)),
                "timestamp": s.timestamp,
                "state": decode(s.state, "json"),
            }
        )
    d["history"] = steps
    d["children"] = [_export_node(store, k, depth + 1) for k in kids] if depth < 50 else []
    return d


@app.command()
def export(
    run_id: RunIdArg,
    json_: Annotated[bool, typer.Option("--json", help="JSON (the only format; the flag may be omitted).")] = True,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write to this file instead of stdout.", show_default=False),
    ] = None,
    db: DbOpt = None,
) -> None:
    """Export a run and its whole subtree (nested runs), states included, as JSON."""
    from datetime import datetime

    from loomc.cli import render as r

    store = _open(db)
    info = find_run(store, run_id)
    data = {
        "loomc_export": 1,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "database": str(store.path),
        "run": _export_node(store, info),
    }
    text = r.dumps(data)
    if output is not None:
        try:
            output.write_text(text + "\n", encoding="utf-8")
        except OSError as exc:
            raise CliError(f"cannot write {output}: {exc.strerror or exc}") from exc
        sys.stderr.write(f"loomc: exported run {info.id} to {output}\n")
    else:
        sys.stdout.write(text + "\n")


# ---------------------------------------------------------------------------------
# reply, fork, prune, db


def _json_arg(text: str | None, file: Path | None, what: str, options: str) -> tuple[bool, Any]:
    """``(given, value)`` of a JSON value passed inline or in a file (one of the two)."""
    import json

    if text is not None and file is not None:
        raise typer.BadParameter(f"give the {what} inline or with a file, not both", param_hint=options)
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise CliError(f"cannot read {file}: {exc.strerror or exc}") from exc
    if text is None:
        return False, None
    try:
        return True, json.loads(text)
    except ValueError as exc:
        raise CliError(f"the {what} is not valid JSON ({exc}); quote it for the shell, e.g. '{{\"ok\": true}}'") from exc


@app.command()
def reply(
    run_id: RunIdArg,
    answer: Annotated[str | None, typer.Argument(metavar="JSON", help="The answer, as JSON.", show_default=False)] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the answer (JSON) from a file.", show_default=False)] = None,
    db: DbOpt = None,
) -> None:
    """Answer the question a waiting run asks (loomc.ask); then resume it."""
    from loomc._core.life import reply_to
    from loomc.cli import render as r

    given, value = _json_arg(answer, file, "answer", "JSON/--file")
    if not given:
        raise typer.BadParameter("give the answer as JSON, or --file PATH", param_hint="JSON/--file")
    store = writable_store(database_path(db), existing=True)
    q = reply_to(store, run_id, value)
    out = r.Output()
    first_line = (q.text.splitlines() or [""])[0]
    out.line(f"answered run {q.run_id}'s question at step {q.step_n}: {r.clip(first_line)}")
    root = root_run(store, find_run(store, q.run_id))
    how = (f"loomc graph run PIPELINE.py --resume {root.id}" if root.kind == "graph" else f"loomc resume {root.id} --run")
    out.line(f"resume it to continue: {how}")


@app.command()
def fork(
    run_id: RunIdArg,
    step: Annotated[int, typer.Option("--step", "-s", help="The last step the fork keeps.", show_default=False)],
    state: Annotated[str | None, typer.Option("--state", help="Continue from this state (JSON) instead.", show_default=False)] = None,
    state_file: Annotated[
        Path | None, typer.Option("--state-file", help="Continue from the state (JSON) in this file.", show_default=False)
    ] = None,
    run: Annotated[bool, typer.Option("--run", help="Resume the fork here at once (imports the run's function).")] = False,
    usd: UsdOpt = None,
    iterations: IterationsOpt = None,
    wall_clock: WallClockOpt = None,
    db: DbOpt = None,
) -> None:
    """A new run whose history is the run's steps 0..STEP (shared, not copied); the original is unchanged."""
    from loomc._core.life import fork_run
    from loomc.cli import render as r
    from loomc.cli.resume import resume_budget

    given, value = _json_arg(state, state_file, "state", "--state/--state-file")
    store = writable_store(database_path(db), existing=True)
    info = find_run(store, run_id)
    try:
        budget = resume_budget(info.budget, **given_limits(usd, iterations, wall_clock))
    except (TypeError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint=LIMIT_OPTIONS) from exc
    try:
        new_id = fork_run(store, info.id, at_step=step, state=value, state_given=given, budget=budget)
    except ValueError as exc:
        if isinstance(exc, LoomcError):
            raise
        raise typer.BadParameter(str(exc), param_hint="--step") from exc
    new = find_run(store, new_id)
    out = r.Output()
    out.line(f"forked run {info.id} at step {step}: new run {new_id} ({new.steps} steps, {r.money(new.cost_usd)} used)")
    if not run:
        out.line(f"resume it to continue: loomc resume {new_id} --run")
        return
    from loomc.cli.resume import resume_here

    raise typer.Exit(resume_here(store, new))


@app.command()
def prune(
    older_than: Annotated[
        str | None, typer.Option("--older-than", help="Only runs not updated for this long (30d, 12h).", show_default=False)
    ] = None,
    status: Annotated[
        str | None, typer.Option("--status", help="Only runs with these statuses (comma-separated).", show_default=False)
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Only runs whose name matches a glob ('app:*').", show_default=False)] = None,
    keep_last: Annotated[
        int | None, typer.Option("--keep-last", min=0, help="Of each name, keep the newest N runs.", show_default=False)
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be removed; remove nothing.")] = False,
    db: DbOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Delete whole run trees (runs, steps, unshared states); never a running or waiting run."""
    from loomc.cli import render as r

    store = writable_store(database_path(db), existing=True)
    try:
        report = store.prune(older_than=older_than, status=status, name=name, keep_last=keep_last, dry_run=dry_run)
    except ValueError as exc:
        if isinstance(exc, LoomcError):
            raise
        raise typer.BadParameter(str(exc), param_hint="--older-than/--status/--keep-last") from exc
    if json_:
        data = {
            "dry_run": report.dry_run, "runs": report.runs, "steps": report.steps, "blobs": report.blobs,
            "questions": report.questions, "bytes_freed": report.bytes_freed, "skipped": report.skipped,
            "removed": [r.run_dict(i) for i in report.roots],
        }
        sys.stdout.write(r.dumps(data) + "\n")
        return
    out = r.Output()
    verb = "would remove" if dry_run else "removed"
    shown = report.roots[:_PRUNE_LISTED]
    if shown:
        out.table(r.RUN_COLS, [[i.id, out.status(i.status), str(i.steps), r.money(i.cost_usd), r.when(i.created_at),
                                r.clip(i.name, 120)] for i in shown])
        if len(report.roots) > len(shown):
            out.line(f"... and {len(report.roots) - len(shown)} more (--json lists every one)")
    out.line(
        f"{verb} {len(report.roots)} run trees ({report.runs} runs), {report.steps} steps, "
        f"{report.blobs} stored states, {report.questions} questions: {r.size(report.bytes_freed)} of data"
    )
    if report.skipped:
        out.line(f"left alone: {len(report.skipped)} runs that started running or waiting meanwhile")
    if not dry_run and report.runs:
        if getattr(store, "dsn", None):  # PostgreSQL: the DSN may hold a password, never printed
            out.line("the tables keep their size until `loomc db vacuum` (with the same --db) frees the space")
        else:
            out.line(f"the file keeps its size until `loomc db vacuum --db {store.path}` returns the space")


_PRUNE_LISTED = 20



@db_app.command("vacuum")
def db_vacuum(db: DbOpt = None) -> None:
    """Return the space of deleted runs to the file system (SQLite VACUUM; PostgreSQL VACUUM of loomc's tables)."""
    from loomc.cli import render as r

    store = writable_store(database_path(db), existing=True)
    vacuum = getattr(store, "vacuum", None)
    if not callable(vacuum):
        raise CliError(f"{store!r} has nothing to vacuum")
    before, after = vacuum()
    r.Output().line(f"{store.path}: {r.size(before)} -> {r.size(after)} ({r.size(before - after)} returned)")


# db


@db_app.command("info")
def db_info(db: DbOpt = None, json_: JsonOpt = False) -> None:
    """The database's kind, schema version, runs, steps and size."""
    from loomc.cli import render as r
    from loomc.store.transfer import db_info as read_info

    store = _open(db)
    try:
        info = read_info(store)
    finally:
        store.close()
    if json_:
        sys.stdout.write(r.dumps(vars(info)) + "\n")
        return
    r.Output().kv([
        ("database", info.where), ("kind", info.kind), ("schema", f"v{info.schema_version}"),
        ("runs", str(info.runs)), ("steps", str(info.steps)), ("size", _size_text(info.bytes)),
    ])


def _size_text(n: int) -> str:
    """``n`` bytes for a reader: ``812 B``, ``3.4 MB``."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


@db_app.command("copy")
def db_copy(
    src: Annotated[str, typer.Argument(metavar="SRC", help="The database to copy from: a SQLite file or a postgresql:// DSN.")],
    dst: Annotated[str, typer.Argument(metavar="DST", help="The database to copy into (created if missing).")],
    skip_existing: Annotated[
        bool, typer.Option("--skip-existing", help="Skip run trees whose ids DST already has (default: refuse the copy).")
    ] = False,
) -> None:
    """Copy every run (whole trees: steps, states, reservations) from SRC into DST; leases are not copied."""
    from loomc.cli.common import same_database
    from loomc.store.transfer import copy_runs, open_for_copy

    source, target = database_path(src), database_path(dst)
    if same_database(source, target):
        raise CliError("SRC and DST are the same database; copy into another one")
    reader = open_reader(source)
    writer = open_for_copy(target, create=True)
    tty = sys.stderr.isatty()
    shown = [0.0]

    def progress(done: int, total: int) -> None:
        import time

        now = time.monotonic()
        if done == total or now - shown[0] >= 1.0:
            shown[0] = now
            end = "\n" if done == total or not tty else ""
            sys.stderr.write(f"{chr(13) if tty else ''}loomc: copied {done}/{total} run trees{end}")
            sys.stderr.flush()

    try:
        report = copy_runs(reader, writer, skip_existing=skip_existing, progress=progress)
    finally:
        reader.close()
        writer.close()
    line = f"copied {report.runs} runs ({report.steps} steps, {report.holds} reservations) from {reader.path} to {writer.path}"
    if report.skipped:
        more = " ..." if len(report.skipped) > 5 else ""
        line += f"; skipped {len(report.skipped)} run trees DST already had ({', '.join(report.skipped[:5])}{more})"
    sys.stdout.write(line + "\n")


# ---------------------------------------------------------------------------------
# graph


def _orchestration_cli() -> Any:
    try:
        from orchestration import _cli
    except ImportError as exc:
        raise CliError(f"the graph commands are not available in this install (cannot import orchestration._cli: {exc})") from exc
    return _cli


@graph_app.command("run")
def graph_run(
    pipeline: PipelineArg,
    graph: GraphOpt = None,
    input_json: Annotated[
        str | None,
        typer.Option("--input", "-i", help="The graph input, as JSON.", show_default=False),
    ] = None,
    input_file: Annotated[
        Path | None,
        typer.Option("--input-file", help="Read the graph input (JSON) from this file.", show_default=False),
    ] = None,
    resume_id: Annotated[
        str | None,
        typer.Option("--resume", help="Resume this graph run instead of starting one.", show_default=False),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="With --resume: continue even though the graph's structure changed.")
    ] = False,
    usd: UsdOpt = None,
    iterations: IterationsOpt = None,
    wall_clock: WallClockOpt = None,
    db: DbOpt = None,
    executor: Annotated[
        str | None,
        typer.Option("--executor", help="Where the nodes run: local (this process) or dask (a Dask cluster; the "
                     "store must be PostgreSQL) [default: local].", show_default=False),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option("--address", help="With --executor dask: the scheduler, e.g. tcp://10.0.0.5:8786 "
                     "[default: a local cluster on 127.0.0.1].", show_default=False),
    ] = None,
) -> None:
    """Run (or resume) the graph defined in PIPELINE.py, with live progress per node."""
    _usage(check_graph_input, input_json, input_file, resuming=resume_id is not None)  # a usage error first
    _usage(check_executor, executor, address)
    cli = _orchestration_cli()
    _usage(check_new_limits, given_limits(usd, iterations, wall_clock), resuming=resume_id is not None, how=cli.GRAPH_RESUME)
    raise typer.Exit(
        cli.graph_run(
            path=str(pipeline),
            graph_name=graph,
            input_json=input_json,
            input_file=str(input_file) if input_file is not None else None,
            resume=resume_id,
            db=str(db) if db is not None else None,
            force=force,
            usd=usd,
            iterations=iterations,
            wall_clock=wall_clock,
            executor=executor,
            address=address,
        )
    )


@graph_app.command("show")
def graph_show(
    pipeline: PipelineArg,
    graph: GraphOpt = None,
    mermaid: Annotated[bool, typer.Option("--mermaid", help="Print the graph as a mermaid diagram.")] = False,
) -> None:
    """Draw the graph defined in PIPELINE.py (nodes, edges, budgets)."""
    cli = _orchestration_cli()
    raise typer.Exit(cli.graph_show(path=str(pipeline), graph_name=graph, mermaid=mermaid))


def _version(value: bool) -> None:
    if value:
        from loomc import __version__

        sys.stdout.write(f"loomc {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Durable, budgeted agent loops: see every run, every step, every cost."""
