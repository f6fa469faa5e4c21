"""What the ``loomc`` command prints: formatting, plain tables, rich tables and trees.

Two outputs share every row: on a terminal, rich renders colour tables, trees and live
views; otherwise (a pipe, a file, a test) the same rows print as plain, aligned text with
stable columns, no colour and no wrapping. rich is imported only for a terminal or a tree.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loomc._types import RunInfo, RunStatus, StepRecord

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

__all__ = [
    "Col",
    "Output",
    "budget_lines",
    "left_lines",
    "duration",
    "markers",
    "money",
    "own_cost",
    "plain_table",
    "read_steps",
    "run_dict",
    "step_cells",
    "step_dict",
    "when",
]

STATUS_STYLE = {
    RunStatus.RUNNING: "cyan",
    RunStatus.COMPLETED: "green",
    RunStatus.BUDGET_EXHAUSTED: "yellow",
    RunStatus.STALLED: "magenta",
    RunStatus.FAILED: "red",
    RunStatus.INTERRUPTED: "yellow",
    RunStatus.CRASHED: "bold red",
}

#: Longest error shown in a table cell (``--json`` and ``export`` keep the whole text).
ERROR_WIDTH = 72


# ---------------------------------------------------------------------------------
# Values


def money(usd: float | None) -> str:
    """``$0.1500``: costs always print with four decimals."""
    value = float(usd or 0.0)
    if abs(value) < 5e-5:
        value = 0.0
    return f"${value:.4f}"


def duration(seconds: float | None) -> str:
    """A short wall-clock duration: ``0.42s``, ``12.3s``, ``4m05s``, ``1h02m``."""
    s = max(0.0, float(seconds or 0.0))
    if s < 10:
        return f"{s:.2f}s"
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600 - 0.5:
        m, sec = divmod(round(s), 60)
        return f"{m}m{sec:02d}s"
    h, rest = divmod(round(s), 3600)
    return f"{h}h{rest // 60:02d}m"


def when(iso: str) -> str:
    """``2026-11-25 11:45:02``: a stored UTC timestamp, to the second."""
    return iso[:19].replace("T", " ")


def score_text(score: float | None) -> str:
    """A step's score, or ``-`` when it has none."""
    return "-" if score is None else f"{score:.3f}"


def short(text: str | None, width: int = ERROR_WIDTH) -> str:
    """``text`` on one line, cut to ``width`` characters."""
    if not text:
        return ""
    one = " ".join(text.split())
    return one if len(one) <= width else one[: width - 3] + "..."


def markers(event: str | None) -> str:
    """``<- backtrack to step 1  <- converged`` from a stored ``"; "``-joined event."""
    if not event:
        return ""
    return "  ".join(f"<- {e.strip()}" for e in event.split(";") if e.strip())


def own_cost(info: RunInfo, children: Sequence[RunInfo]) -> float:
    """What the run spent itself: its total minus its direct children's totals."""
    own = round(info.cost_usd - sum(c.cost_usd for c in children), 9)
    return own if own > 0 else 0.0


def held_lines(info: RunInfo) -> list[tuple[str, str]]:
    """``("in flight", ...)`` for each charge of holds left by calls in flight when a process died."""
    records = info.meta.get("held_charges") if isinstance(info.meta, dict) else None
    out: list[tuple[str, str]] = []
    for rec in records if isinstance(records, list) else []:
        if not isinstance(rec, dict):
            continue
        n = int(rec.get("holds") or 1)
        calls = "a call" if n == 1 else f"{n} calls"
        out.append(("in flight", f"{money(rec.get('usd'))} charged, held by {calls} in flight when the process died "
                                 f"(counted at resume, {when(str(rec.get('at', '')))} UTC)"))
    return out


def _limits(info: RunInfo) -> list[tuple[str, float, float | None, Callable[[float], str]]]:
    """``(label, used, cap, format)`` for usd, iterations and wall clock."""
    b = info.budget or {}

    def count(v: float) -> str:
        return f"{int(v)}"

    return [
        ("usd", info.cost_usd, b.get("usd"), money),
        ("iterations", float(info.steps), b.get("iterations"), count),
        ("wall clock", info.wall_s, b.get("wall_clock"), duration),
    ]


def budget_lines(info: RunInfo) -> list[tuple[str, str]]:
    """``(limit, "used of cap (left)")`` for usd, iterations and wall clock."""
    return [
        (label, f"{fmt(used)} (no limit)" if cap is None
         else f"{fmt(used)} of {fmt(float(cap))} ({fmt(max(0.0, float(cap) - used))} left)")
        for label, used, cap, fmt in _limits(info)
    ]


def left_lines(info: RunInfo) -> list[tuple[str, str]]:
    """``(limit, "left of cap (used)")`` for usd, iterations and wall clock (``loomc resume``)."""
    return [
        (label, f"no limit ({fmt(used)} used)" if cap is None
         else f"{fmt(max(0.0, float(cap) - used))} left of {fmt(float(cap))} ({fmt(used)} used)")
        for label, used, cap, fmt in _limits(info)
    ]


def budget_dict(info: RunInfo) -> dict[str, dict[str, float | None]]:
    """Each budget limit as ``{"limit", "used", "left"}`` (``None`` = no limit)."""
    b = info.budget or {}
    out: dict[str, dict[str, float | None]] = {}
    for key, used in (("usd", info.cost_usd), ("iterations", float(info.steps)), ("wall_clock", info.wall_s)):
        cap = b.get(key)
        if key == "iterations":
            out[key] = {"limit": cap, "used": int(used), "left": None if cap is None else max(0, int(cap) - int(used))}
        else:
            left = None if cap is None else round(max(0.0, float(cap) - used), 9)
            out[key] = {"limit": cap, "used": round(used, 9), "left": left}
    return out


def run_dict(info: RunInfo) -> dict[str, Any]:
    """A run's metadata as plain JSON-ready data."""
    return {
        "id": info.id,
        "name": info.name,
        "kind": info.kind,
        "status": info.status.value,
        "parent_run_id": info.parent_run_id,
        "parent_step": info.parent_step,
        "call_index": info.call_index,
        "created_at": info.created_at,
        "updated_at": info.updated_at,
        "steps": info.steps,
        "cost_usd": info.cost_usd,
        "wall_s": info.wall_s,
        "budget": budget_dict(info),
        "stop_reason": info.stop_reason,
        "owner": info.owner,
        "meta": info.meta,
    }


def step_dict(rec: StepRecord, cumul: float) -> dict[str, Any]:
    """A step's metadata (no state) as JSON-ready data."""
    return {
        "step": rec.step_n,
        "cost_usd": rec.cost_usd,
        "cumul_usd": round(cumul, 9),
        "score": rec.score,
        "error": rec.error,
        "events": [e.strip() for e in (rec.event or "").split(";") if e.strip()],
        "timestamp": rec.timestamp.isoformat(),
    }


def step_cells(rec: StepRecord, cumul: float) -> list[str]:
    """One row of the step table: STEP COST CUMUL SCORE ERROR and the markers."""
    return [str(rec.step_n), money(rec.cost_usd), money(cumul), score_text(rec.score), short(rec.error), markers(rec.event)]


def read_steps(store: Any, run_id: str, after: int = -1) -> list[StepRecord]:
    """Step metadata of a run, without reading any state; only steps after ``after``."""
    from datetime import datetime

    from loomc import _sql

    rows = store._read(_sql.SELECT_STEP_META, (run_id,))
    return [
        StepRecord(
            row[0],
            None,
            cost_usd=row[1],
            score=row[2],
            timestamp=datetime.fromisoformat(row[3]),
            error=row[4],
            event=row[5],
        )
        for row in rows
        if row[0] > after
    ]


def dumps(data: Any) -> str:
    """JSON as the CLI prints it."""
    return json.dumps(data, indent=2, ensure_ascii=False, default=str)


# ---------------------------------------------------------------------------------
# Tables


@dataclass(frozen=True)
class Col:
    """A table column: its header and whether its values align right."""

    header: str
    right: bool = False


STEP_COLS = (Col("STEP", True), Col("COST", True), Col("CUMUL", True), Col("SCORE", True), Col("ERROR"), Col(""))
RUN_COLS = (Col("ID"), Col("STATUS"), Col("STEPS", True), Col("COST", True), Col("CREATED"), Col("NAME"))
#: Fixed widths for rows printed one by one (``watch``), when the widths cannot be measured first.
STREAM_WIDTHS = (4, 7, 7, 5, 0, 0)


def _line(cells: Sequence[str], cols: Sequence[Col], widths: Sequence[int]) -> str:
    parts = []
    for cell, col, width in zip(cells, cols, widths, strict=True):
        parts.append(cell.rjust(width) if col.right else cell.ljust(width))
    return "  ".join(parts).rstrip()


def plain_table(cols: Sequence[Col], rows: Iterable[Sequence[str]]) -> list[str]:
    """Rows as aligned plain text: two spaces between columns, no trailing blanks.

    Empty trailing columns (no markers on any row) are dropped.
    """
    rows = [list(r) for r in rows]
    n = len(cols)
    while n > 1 and not cols[n - 1].header and not any(r[n - 1] for r in rows):
        n -= 1
    cols = cols[:n]
    rows = [r[:n] for r in rows]
    widths = [max([len(c.header)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    widths[-1] = 0  # the last column is never padded: nothing follows it
    return [_line([c.header for c in cols], cols, widths), *(_line(r, cols, widths) for r in rows)]


def stream_header() -> str:
    """The step table's header for rows printed as they arrive."""
    return _line([c.header for c in STEP_COLS], STEP_COLS, STREAM_WIDTHS)


def stream_row(cells: Sequence[str]) -> str:
    """One step row with the fixed widths of :func:`stream_header`."""
    widths = list(STREAM_WIDTHS)
    widths[4] = max(len(cells[4]), 5) if cells[5] else 0
    return _line(cells, STEP_COLS, widths)


# ---------------------------------------------------------------------------------
# Output


class Output:
    """Where the CLI writes: a rich console on a terminal, plain text otherwise."""

    def __init__(self, tty: bool | None = None) -> None:
        self.tty = sys.stdout.isatty() if tty is None else tty
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        """A rich console (colour on a terminal; plain and unwrapped otherwise)."""
        if self._console is None:
            from rich.console import Console

            if self.tty:
                self._console = Console(highlight=False)
            else:
                self._console = Console(
                    highlight=False,
                    no_color=True,
                    color_system=None,
                    width=100_000,
                    soft_wrap=True,
                    force_terminal=False,
                )
        return self._console

    def line(self, text: str = "") -> None:
        """Print one line of plain text."""
        if self.tty:
            self.console.print(text, markup=False, highlight=False)
        else:
            sys.stdout.write(text + "\n")

    def flush(self) -> None:
        """Flush stdout (rows streamed by ``watch``)."""
        sys.stdout.flush()

    def status(self, status: RunStatus) -> Any:
        """A status as rich text (styled) on a terminal, its value otherwise."""
        if not self.tty:
            return status.value
        from rich.text import Text

        return Text(status.value, style=STATUS_STYLE.get(status, ""))

    def table(self, cols: Sequence[Col], rows: Sequence[Sequence[Any]]) -> None:
        """Print a table: rich on a terminal, :func:`plain_table` otherwise."""
        if not self.tty:
            for text in plain_table(cols, [[str(c) for c in r] for r in rows]):
                sys.stdout.write(text + "\n")
            return
        self.console.print(self.rich_table(cols, rows))

    def rich_table(self, cols: Sequence[Col], rows: Sequence[Sequence[Any]], title: str | None = None) -> Any:
        """The rich ``Table`` for ``rows`` (marker columns styled, long cells cut)."""
        from rich import box
        from rich.table import Table

        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title=title, title_justify="left")
        for col in cols:
            table.add_column(
                col.header,
                justify="right" if col.right else "left",
                no_wrap=True,
                style="dim" if col.header in ("CREATED",) else ("bold" if not col.header else None),
                overflow="ellipsis",
            )
        for r in rows:
            table.add_row(*r)
        return table

    def kv(self, pairs: Sequence[tuple[str, Any]]) -> None:
        """``key  value`` lines (the header of ``show`` and ``resume``)."""
        width = max(len(k) for k, _ in pairs)
        for key, value in pairs:
            if self.tty and not isinstance(value, str):
                from rich.text import Text

                self.console.print(Text(key.ljust(width) + "  ", style="bold"), value, sep="")
            elif self.tty:
                from rich.text import Text

                self.console.print(Text(key.ljust(width) + "  ", style="bold") + Text(value))
            else:
                sys.stdout.write(f"{key.ljust(width)}  {value}\n")

    def render(self, renderable: RenderableType) -> None:
        """Print any rich renderable (a tree), plain when not a terminal."""
        self.console.print(renderable)
