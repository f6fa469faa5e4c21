"""What each page shows, read from a store: plain data for the templates, no HTML.

Every read goes through the store protocol (``loomc.store.protocol``), in windows: a page
of runs is one query on a store with ``search_runs``, a run page reads at most
:data:`WINDOW` steps, the tree at most :data:`TREE_NODES` runs. Stored text (names,
errors, stop reasons, events, states) is passed on as it is stored; the templates escape
it (Jinja autoescape).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loomc._core import events as _events
from loomc._core.errors import StoreError
from loomc._core.types import RunInfo, RunStatus, StepRecord
from loomc.cli.render import budget_dict, dumps, money, own_cost, score_text, when
from loomc.store import core
from loomc.store.codec import decode
from loomc.store.protocol import RunSearch
from loomc.ui._chart import Chart, chart

__all__ = [
    "PAGE",
    "WINDOW",
    "RunPage",
    "RunsPage",
    "StepPage",
    "parse_cursor",
    "run_page",
    "runs_page",
    "step_page",
]

#: Runs on a page of the runs list (``?n=`` picks another size, up to :data:`MAX_PAGE`).
PAGE = 50
MAX_PAGE = 500
#: Steps a run page shows (the last ones, or those from ``?from=``).
WINDOW = 500
#: Characters of each error a run page reads (the step page shows the whole error).
ERROR_CHARS = 2000
#: Characters of a state a page shows (``loomc export`` has all of it).
STATE_CHARS = 20_000
#: Runs the tree draws at most, and children of one run listed before "N more".
TREE_NODES = 300
TREE_CHILDREN = 50
TREE_DEPTH = 30

STATUSES = [s.value for s in RunStatus]


# ---------------------------------------------------------------------------------
# The runs list


@dataclass(frozen=True)
class RunsPage:
    """A page of the runs list, with the filters that made it and the cursor of the next page."""

    runs: list[RunInfo]
    status: str | None
    id_prefix: str
    name: str
    nested: bool
    size: int
    before: tuple[str, str] | None
    #: ``created_at|id`` of the last run shown, when more runs may follow
    next_cursor: str | None
    statuses: list[str] = field(default_factory=lambda: list(STATUSES))


def parse_cursor(text: str | None) -> tuple[str, str] | None:
    """``(created_at, id)`` from a ``created_at|id`` cursor (``None``: the first page).

    Raises:
        ValueError: the text is not a cursor this page made.
    """
    if not text:
        return None
    created, sep, run_id = text.rpartition("|")
    if not sep or not created or not run_id:
        raise ValueError(f"{text!r} is not a page cursor; follow the page's own links, or start again from /")
    return created, run_id


def runs_page(
    store: Any, *, status: str | None = None, id_prefix: str = "", name: str = "", nested: bool = False,
    before: tuple[str, str] | None = None, size: int = PAGE,
) -> RunsPage:
    """One page of runs, newest first.

    A store with ``search_runs`` (:class:`~loomc.store.protocol.RunSearch`) narrows and
    pages in its database; any other store's ``list_runs`` is cut in Python.

    Raises:
        ValueError: an unknown status or a page size out of range.
    """
    if status is not None and status not in STATUSES and status != "waiting":
        raise ValueError(f"unknown status {status!r}; use one of {', '.join(STATUSES)}")
    if not 1 <= size <= MAX_PAGE:
        raise ValueError(f"a page holds 1 to {MAX_PAGE} runs, not {size}")
    query: dict[str, Any] = {
        "status": status, "roots_only": not nested, "id_prefix": id_prefix.strip().lower() or None,
        "name": name.strip() or None, "before": before,
    }
    if isinstance(store, RunSearch):
        found = store.search_runs(**query, limit=size + 1)
    else:
        found = core.page_of(store.list_runs(roots_only=not nested), **query, limit=size + 1)
    more = len(found) > size
    runs = found[:size]
    cursor = f"{runs[-1].created_at}|{runs[-1].id}" if more and runs else None
    return RunsPage(runs, status, id_prefix.strip(), name.strip(), nested, size, before, cursor)


# ---------------------------------------------------------------------------------
# A run


@dataclass(frozen=True)
class StepRow:
    """One row of a run page's step table."""

    step: int
    cost: str
    cumul: str
    score: str
    error: str | None
    #: the error was longer than what was read (the step page shows it whole)
    error_cut: bool
    events: list[str]


@dataclass(frozen=True)
class BudgetRow:
    """A budget limit: what was used, the cap and what is left (``None``: no limit)."""

    label: str
    used: str
    cap: str | None
    left: str | None
    #: used / cap, 0 to 100 (``None``: no limit)
    percent: float | None


@dataclass(frozen=True)
class TreeNode:
    """A run in the tree of its root, or a line standing for runs not drawn."""

    info: RunInfo | None
    label: str
    own: str
    total: str
    current: bool
    children: list[TreeNode]
    #: for a line without a run: what it stands for (``12 more runs``, ``node x pending``)
    note: str = ""


@dataclass(frozen=True)
class Question:
    """A waiting run's question, as stored."""

    text: str
    schema: str | None
    step: int | None
    #: every question of the run is answered: it waits only to be resumed
    answered: bool = False
    #: the run that asked (the page's run, or a run nested below it)
    run_id: str = ""


@dataclass(frozen=True)
class RunPage:
    """Everything the run page shows."""

    info: RunInfo
    parent: RunInfo | None
    budget: list[BudgetRow]
    rows: list[StepRow]
    chart: Chart | None
    #: steps before the window (not shown), steps after it
    hidden_before: int
    hidden_after: int
    first_shown: int | None
    last_shown: int | None
    window_from: int | None
    window: int
    tree: TreeNode | None
    question: Question | None
    state_label: str
    state: str | None
    state_cut: bool


def question_of(store: Any, info: RunInfo) -> Question | None:
    """The question a ``waiting`` run (or a run below it) asks, read through the store's ``questions``.

    ``None`` for a run that is not waiting, or a store that keeps no questions. A question
    answered but not yet resumed is returned with ``answered`` set.
    """
    if info.status.value != "waiting" or not callable(getattr(store, "questions", None)):
        return None
    asked = list(store.questions(info.id, True))
    if not asked:
        return None
    pending = [q for q in asked if q.answer is None]
    q = pending[0] if pending else asked[-1]
    return Question(q.text, q.json_schema, q.step_n, answered=not pending, run_id=q.run_id)


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def budget_rows(info: RunInfo) -> list[BudgetRow]:
    """The run's limits: used, cap, left, as the page prints them."""
    fmt = {"usd": money, "iterations": lambda v: f"{int(v)}", "wall_clock": _seconds}
    labels = {"usd": "usd", "iterations": "iterations", "wall_clock": "wall clock"}
    rows = []
    for key, b in budget_dict(info).items():
        used = float(b["used"] or 0.0)
        cap, left = b["limit"], b["left"]
        if info.kind == "graph" and key == "iterations" and cap is None:
            continue
        show = fmt[key]
        percent = None if cap is None else (100.0 if float(cap) <= 0 else min(100.0, 100.0 * used / float(cap)))
        rows.append(BudgetRow(labels[key], show(used), None if cap is None else show(float(cap)),
                              None if left is None else show(float(left)), percent))
    return rows


def _seconds(s: float) -> str:
    from loomc.cli.render import duration

    return duration(s)


def step_rows(records: Sequence[StepRecord], cumul_before: float, error_chars: int) -> tuple[list[StepRow], list[float]]:
    """The table rows of ``records`` and the cumulative cost after each."""
    rows: list[StepRow] = []
    cumuls: list[float] = []
    cumul = cumul_before
    for rec in records:
        cumul += rec.cost_usd
        cumuls.append(cumul)
        err = rec.error
        rows.append(StepRow(
            step=rec.step_n, cost=money(rec.cost_usd), cumul=money(cumul), score=score_text(rec.score), error=err,
            error_cut=err is not None and len(err) >= error_chars, events=[_events.text(e) for e in rec.events],
        ))
    return rows, cumuls


def _state_text(store: Any, run_id: str, step_n: int | None) -> tuple[str | None, bool]:
    """A stored state as indented JSON, cut to :data:`STATE_CHARS` (``None``: nothing stored)."""
    if step_n is None:
        stored = store.stored_input(run_id)
        blob = stored.input_blob if stored is not None else None
    else:
        blob = store.stored_state(run_id, step_n)
    if blob is None:
        return None, False
    try:
        text = dumps(decode(blob, "json"))
    except (ValueError, StoreError) as exc:
        return f"(the stored state cannot be read: {exc})", False
    if len(text) > STATE_CHARS:
        return text[:STATE_CHARS], True
    return text, False


def run_tree(store: Any, info: RunInfo) -> TreeNode | None:
    """The tree of ``info``'s root run, drawn around ``info`` (``None`` for a run alone)."""
    root = info
    seen = {info.id}
    while root.parent_run_id:
        parent: RunInfo | None = store.get_run(root.parent_run_id)
        if parent is None or parent.id in seen:
            break
        seen.add(parent.id)
        root = parent
    kids = store.children(root.id)
    if root.id == info.id and not kids:
        return None
    budget = [TREE_NODES]
    return _tree_node(store, root, kids, info.id, 0, budget)


def _label(info: RunInfo) -> str:
    node = info.meta.get("node")
    if info.kind == "item":
        return f"item {info.call_index}"
    if info.kind == "node" and node is not None:
        return f"node {node}"
    return info.kind


def _tree_node(store: Any, info: RunInfo, kids: list[RunInfo], current: str, depth: int, budget: list[int]) -> TreeNode:
    budget[0] -= 1
    children: list[TreeNode] = []
    if depth < TREE_DEPTH:
        shown = kids[:TREE_CHILDREN]
        for k in shown:
            if budget[0] <= 0:
                break
            children.append(_tree_node(store, k, store.children(k.id), current, depth + 1, budget))
        rest = len(kids) - len(children)
        if rest > 0:
            counts: dict[str, int] = {}
            for k in kids[len(children):]:
                counts[k.status.value] = counts.get(k.status.value, 0) + 1
            what = ", ".join(f"{n} {st}" for st, n in sorted(counts.items(), key=lambda kv: -kv[1]))
            children.append(TreeNode(None, "", "", "", False, [], note=f"{rest} more runs ({what})"))
    if info.kind == "graph":
        have = {k.meta.get("node") for k in kids if k.kind == "node"}
        children.extend(
            TreeNode(None, "", "", "", False, [], note=f"node {n['name']}: not started")
            for n in info.meta.get("nodes", []) if isinstance(n, dict) and "name" in n and n["name"] not in have
        )
    return TreeNode(info, _label(info), money(own_cost(info, kids)), money(info.cost_usd), info.id == current, children)


def run_page(store: Any, info: RunInfo, *, start: int | None = None, window: int = WINDOW) -> RunPage:
    """The run page of ``info``: its steps from ``start`` (``None``: the last ``window``), chart, tree, budget.

    Raises:
        ValueError: ``window`` out of range or ``start`` negative.
    """
    if not 1 <= window <= 10 * WINDOW:
        raise ValueError(f"a run page shows 1 to {10 * WINDOW} steps, not {window}")
    if start is not None and start < 0:
        raise ValueError(f"steps are numbered from 0, not {start}")
    if start is None:
        records = store.step_window(info.id, last=window, error_chars=ERROR_CHARS)
    else:
        records = store.step_window(info.id, start - 1, first=window, error_chars=ERROR_CHARS)
    first = records[0].step_n if records else None
    last = records[-1].step_n if records else None
    before_count, before_cost = store.step_totals(info.id, first) if first is not None else (0, 0.0)
    after_count = 0
    if start is not None and last is not None:
        # the window was asked for from a step: the later steps are counted, not read
        after_count = max(0, info.steps - store.step_totals(info.id, last + 1)[0])
    rows, cumuls = step_rows(records, before_cost, ERROR_CHARS)
    picture = chart(
        [r.step_n for r in records], [r.score for r in records], cumuls, [r.error is not None for r in records],
    )
    parent = store.get_run(info.parent_run_id) if info.parent_run_id else None
    state_step = last
    state, cut = _state_text(store, info.id, state_step)
    label = f"state after step {state_step}" if state_step is not None else "input"
    return RunPage(
        info=info, parent=parent, budget=budget_rows(info), rows=rows, chart=picture, hidden_before=before_count,
        hidden_after=after_count, first_shown=first, last_shown=last, window_from=start, window=window,
        tree=run_tree(store, info), question=question_of(store, info), state_label=label, state=state, state_cut=cut,
    )


# ---------------------------------------------------------------------------------
# A step


@dataclass(frozen=True)
class StepPage:
    """One step of a run: its record in full, its events as records, its state."""

    info: RunInfo
    step: int
    cost: str
    score: str
    timestamp: str
    error: str | None
    events: list[str]
    event_records: str
    state: str | None
    state_cut: bool
    previous: int | None
    next: int | None


def step_page(store: Any, info: RunInfo, step_n: int) -> StepPage | None:
    """The page of step ``step_n`` of ``info`` (``None``: the run has no such step)."""
    found = store.step_window(info.id, step_n - 1, first=1)
    if not found or found[0].step_n != step_n:
        return None
    rec = found[0]
    state, cut = _state_text(store, info.id, step_n)
    prev = step_n - 1 if step_n > 0 and store.step_totals(info.id, step_n)[0] > 0 else None
    after = store.step_window(info.id, step_n, first=1, error_chars=0)
    return StepPage(
        info=info, step=step_n, cost=money(rec.cost_usd), score=score_text(rec.score), timestamp=when(rec.timestamp.isoformat()),
        error=rec.error, events=[_events.text(e) for e in rec.events],
        event_records=dumps(rec.events) if rec.events else "", state=state, state_cut=cut, previous=prev,
        next=after[0].step_n if after else None,
    )
