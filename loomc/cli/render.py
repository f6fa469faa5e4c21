"""What the ``loomc`` command prints: formatting, plain tables, rich tables and trees.

Two outputs share every row: on a terminal, rich renders colour tables, trees and live
views; otherwise (a pipe, a file, a test) the same rows print as plain, aligned text with
stable columns, no colour and no wrapping. rich is imported only for a terminal or a tree.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any

from loomc._core import events as _events
from loomc._core.events import Event
from loomc._core.types import RunInfo, RunStatus, StepRecord

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

__all__ = [
    "Col",
    "Output",
    "budget_lines",
    "clip",
    "duration",
    "json_safe",
    "left_lines",
    "markers",
    "money",
    "own_cost",
    "plain_table",
    "read_steps",
    "run_dict",
    "step_cells",
    "step_dict",
    "step_totals",
    "visible",
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
    RunStatus.WAITING: "bold blue",
}

#: Longest error shown in a table cell (``show --full``, ``--json`` and ``export`` keep the whole text).
ERROR_WIDTH = 72
#: Longest stored text shown as a value line (``stopped``, ``name`` ...) before it is cut.
VALUE_WIDTH = 300
#: What marks a cut: the text goes on in ``show --full`` / ``export``.
CUT = "..."
#: Characters of each error a table reads: enough for :func:`short` to know whether it cut.
ERROR_READ = 4 * ERROR_WIDTH + 17
#: Steps ``show`` prints on a terminal when neither ``--first``, ``--last`` nor ``--all`` is given.
TTY_STEPS = 50

# Characters a terminal may act on rather than print: C0 controls (ESC, BEL, CR, newline ...),
# DEL and the C1 controls (U+009B is a one-byte CSI), bidi embeddings, overrides and isolates
# (a line that reads differently from what it holds), zero-width and other invisible format
# characters, line/paragraph separators, and lone surrogates (which cannot even be encoded).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f"
    "\ufeff\ufff9-\ufffb\ud800-\udfff]"
)


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: object) -> str:
    """``text`` with every character a terminal could act on shown as an escape (``\\x1b``, ``\\u202e``).

    Every stored string the CLI prints (names, errors, stop reasons, node names) goes
    through here, so a step error cannot move the cursor, retitle the window, hide text or
    reorder a line. rich never parses what this returns as markup: the CLI hands it to rich
    as plain ``Text``.
    """
    value = text if isinstance(text, str) else str(text)
    # Every character _UNSAFE matches is one Python counts as unprintable (controls, format
    # characters, separators, surrogates), so a printable string needs no scan: one C call
    # instead of a regex substitution, for almost every cell of a 10,000-row table.
    if value.isprintable():
        return value
    return _UNSAFE.sub(_escape, value)


def clip(text: str | None, width: int = VALUE_WIDTH) -> str:
    """``text`` escaped by :func:`visible` and cut to about ``width`` characters (ends with ``...``)."""
    if not text:
        return ""
    shown = visible(text[: width + 1])
    return shown if len(text) <= width and len(shown) <= width else _PARTIAL.sub("", shown[: width - len(CUT)]) + CUT


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


def short(text: str | None, width: int | None = ERROR_WIDTH) -> str:
    """``text`` on one line, escaped, cut to ``width`` characters (``None``: whole)."""
    if not text:
        return ""
    # Cut before collapsing: a 20 MB error costs no more than a short one.
    head = text if width is None else text[: 4 * width + 16]
    one = visible(" ".join(head.split()))
    if width is None or (len(one) <= width and len(head) == len(text)):
        return one
    return _PARTIAL.sub("", one[: width - len(CUT)]) + CUT


# The start of an escape that a cut split (``\x1``, ``\u20``): dropped rather than shown half.
_PARTIAL = re.compile(r"\\(?:x[0-9a-f]?|u[0-9a-f]{0,3})?$")


def markers(events: list[Event]) -> str:
    """``<- backtrack to step 1  <- converged`` from a step's event records."""
    if not events:
        return ""
    if len(events) == 1:  # the usual case: one backtrack, or converged
        return visible("<- " + _events.text(events[0]))
    return visible("  ".join(["<- " + _events.text(e) for e in events]))


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
        "forked_from": info.forked_from,
        "forked_step": info.forked_step,
    }


def question_dict(q: Any) -> dict[str, Any]:
    """A question a run asked (``loomc.ask``) as plain JSON-ready data."""
    return {
        "run_id": q.run_id, "step": q.step_n, "call_index": q.call_index, "question": q.text,
        "schema": json.loads(q.json_schema) if q.json_schema else None, "asked_at": q.asked_at,
        "answer": json.loads(q.answer) if q.answer is not None else None, "answered_at": q.answered_at,
    }


def size(n: int) -> str:
    """A number of bytes for people (``1.5 MB``)."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"  # pragma: no cover


def step_dict(rec: StepRecord, cumul: float) -> dict[str, Any]:
    """A step's metadata (no state) as JSON-ready data."""
    return {
        "step": rec.step_n,
        "cost_usd": rec.cost_usd,
        "cumul_usd": round(cumul, 9),
        "score": rec.score,
        "error": rec.error,
        **event_fields(rec.events),
        "timestamp": rec.timestamp.isoformat(),
    }


def event_fields(events: list[Event]) -> dict[str, Any]:
    """A step's events for JSON output: ``events`` (their text, as loomc 0.3.0 showed them) and
    ``event_records`` (the records themselves, e.g. ``{"kind": "backtrack", "to": 2}``)."""
    return {"events": [_events.text(e) for e in events], "event_records": events}


def step_cells(rec: StepRecord, cumul: float, *, full: bool = False) -> list[str]:
    """One row of the step table: STEP COST CUMUL SCORE ERROR and the markers (``full``: errors uncut)."""
    error = short(rec.error, None if full else ERROR_WIDTH)
    return [str(rec.step_n), money(rec.cost_usd), money(cumul), score_text(rec.score), error, markers(rec.events)]


def read_steps(
    store: Any, run_id: str, after: int = -1, *, first: int | None = None, last: int | None = None,
    error_chars: int | None = None,
) -> list[StepRecord]:
    """Step metadata of a run (no state), in step order: ``store.step_window`` (see ``CheckpointStore``)."""
    return store.step_window(run_id, after, first=first, last=last, error_chars=error_chars)  # type: ignore[no-any-return]


def step_totals(store: Any, run_id: str, before: int) -> tuple[int, float]:
    """``(steps, cost)`` of a run's steps numbered below ``before``: what a window leaves out."""
    return store.step_totals(run_id, before)  # type: ignore[no-any-return]


def json_safe(data: Any) -> Any:
    """``data`` with every float that is not finite as a string: ``"NaN"``, ``"Infinity"``, ``"-Infinity"``.

    Standard JSON has no such numbers; printing them bare would break every strict parser.
    """
    if isinstance(data, float):
        if math.isfinite(data):
            return data
        return "NaN" if math.isnan(data) else ("Infinity" if data > 0 else "-Infinity")
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    return data


# In JSON text, C1 controls, bidi and invisible characters are written as \uXXXX (valid JSON,
# and harmless when the JSON itself lands on a terminal); json escapes C0 itself.
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]")


def dumps(data: Any, *, indent: int | None = 2) -> str:
    """JSON as the CLI prints it: strictly valid (no bare NaN), terminal-safe, UTF-8 kept."""
    text = json.dumps(json_safe(data), indent=indent, ensure_ascii=False, default=str, allow_nan=False)
    if _JSON_UNSAFE.search(text) is None and not _has_surrogate(text):
        return text
    text = _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return re.sub("[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", text)


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


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


def _template(cols: Sequence[Col], widths: Sequence[int]) -> str:
    """A ``str.format`` template: each cell padded to its column's width, two spaces between."""
    return "  ".join(
        "{:" + (">" if col.right else "<") + f"{width}}}" if width else "{}"
        for col, width in zip(cols, widths, strict=True)
    )


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
    # One template for the whole table: a row is then one C-level format call.
    fmt = _template(cols, widths).format
    return [fmt(*[c.header for c in cols]).rstrip(), *(fmt(*r).rstrip() for r in rows)]


def stream_header() -> str:
    """The step table's header for rows printed as they arrive."""
    return _line([c.header for c in STEP_COLS], STEP_COLS, STREAM_WIDTHS)


def stream_row(cells: Sequence[str]) -> str:
    """One step row with the fixed widths of :func:`stream_header`."""
    widths = list(STREAM_WIDTHS)
    widths[4] = max(len(cells[4]), 5) if cells[5] else 0
    return _line(cells, STEP_COLS, widths)


def _visible_rows(rows: Sequence[Sequence[Any]]) -> Sequence[Sequence[str]]:
    """``rows`` with every cell escaped by :func:`visible`.

    A table whose cells are all printable strings (almost every table) is checked with one
    scan of its joined text and returned as it is.
    """
    try:
        if "".join(chain.from_iterable(rows)).isprintable():
            return rows
    except TypeError:  # a cell that is not a string: str() it, cell by cell
        pass
    return [[visible(c) for c in r] for r in rows]


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
        """Print one line of plain text (escaped by :func:`visible`; never read as markup)."""
        text = visible(text)
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
            # One write for the whole table: with PYTHONUNBUFFERED (or a pipe that
            # writes through) a write per row is a system call per row.
            sys.stdout.write("\n".join(plain_table(cols, _visible_rows(rows))) + "\n")
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
        from rich.text import Text

        for r in rows:
            # Plain strings become Text: stored text like "[red]" is shown, not styled.
            table.add_row(*(Text(visible(c)) if isinstance(c, str) else c for c in r))
        return table

    def kv(self, pairs: Sequence[tuple[str, Any]], *, width: int | None = VALUE_WIDTH) -> None:
        """``key  value`` lines (the header of ``show`` and ``resume``); values escaped, cut to ``width``."""
        keys = max(len(k) for k, _ in pairs)
        for key, raw in pairs:
            value = (visible(raw) if width is None else clip(raw, width)) if isinstance(raw, str) else raw
            if self.tty and not isinstance(value, str):
                from rich.text import Text

                self.console.print(Text(key.ljust(keys) + "  ", style="bold"), value, sep="")
            elif self.tty:
                from rich.text import Text

                self.console.print(Text(key.ljust(keys) + "  ", style="bold") + Text(value))
            else:
                sys.stdout.write(f"{key.ljust(keys)}  {value}\n")

    def render(self, renderable: RenderableType) -> None:
        """Print any rich renderable (a tree), plain when not a terminal."""
        self.console.print(renderable)
