"""The run page's chart: score and cumulative cost over steps, as SVG geometry.

Pure: step numbers, scores and costs in, coordinates and labels out. The template draws
them as SVG elements (the page fetches nothing and ships no chart library); every value
here is a number or text made from numbers, so nothing stored reaches the markup.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Chart", "chart"]

WIDTH = 760
HEIGHT = 220
#: Room for the axis labels: left (score), right (cost), top, bottom (steps).
LEFT, RIGHT, TOP, BOTTOM = 48, 64, 14, 26


@dataclass(frozen=True)
class Tick:
    """A label on an axis and where it goes."""

    x: float
    y: float
    text: str
    #: SVG ``text-anchor``: ``start`` or ``end``
    anchor: str = "start"


@dataclass(frozen=True)
class Chart:
    """What the template draws: two lines, their axes, and the failed steps."""

    width: int
    height: int
    #: the plot area: left, top, right, bottom
    box: tuple[float, float, float, float]
    #: ``x,y x,y ...`` of the cumulative cost line (one point per step)
    cost_points: str
    #: ``x,y x,y ...`` of each unbroken run of scored steps (a step without a score breaks the line)
    score_lines: tuple[str, ...]
    #: the scored steps as points, when there are few enough to mark one by one
    score_marks: tuple[tuple[float, float], ...]
    #: x of each failed step (a mark along the bottom)
    errors: tuple[float, ...]
    ticks: tuple[Tick, ...]
    #: how many steps the chart draws
    steps: int
    #: how many of them have a score
    scored: int


def _fmt_cost(usd: float) -> str:
    return f"${usd:.4f}" if usd < 100 else f"${usd:,.0f}"


def _fmt_score(v: float) -> str:
    return f"{v:.3g}"


def chart(
    steps: Sequence[int], scores: Sequence[float | None], cumul: Sequence[float], errors: Sequence[bool],
    *, width: int = WIDTH, height: int = HEIGHT, mark_below: int = 80,
) -> Chart | None:
    """The chart of a run's steps (``None`` when there is no step to draw).

    Args:
        steps: the step numbers, ascending.
        scores: each step's score (``None``, NaN or infinite: not drawn).
        cumul: the cumulative cost after each step (what the run had spent).
        errors: whether each step failed.
        width: of the whole SVG, in pixels.
        height: of the whole SVG, in pixels.
        mark_below: mark each scored step with a dot when fewer steps than this are drawn.
    """
    n = len(steps)
    if n == 0:
        return None
    x0, y0, x1, y1 = float(LEFT), float(TOP), float(width - RIGHT), float(height - BOTTOM)
    first, last = steps[0], steps[-1]
    span = last - first

    def x(step: int) -> float:
        return round(x0 + (x1 - x0) * ((step - first) / span if span else 0.5), 1)

    # cost: from 0 to the largest total, so the line's slope reads as spending per step
    finite_cost = [c for c in cumul if math.isfinite(c)]
    top_cost = max(finite_cost, default=0.0)
    low_cost = min(0.0, min(finite_cost, default=0.0))
    cost_span = (top_cost - low_cost) or 1.0

    def y_cost(c: float) -> float:
        return round(y1 - (y1 - y0) * ((c - low_cost) / cost_span), 1)

    # score: the scores' own range, widened to at least [0, 1] when they lie inside it
    good = [s for s in scores if s is not None and math.isfinite(s)]
    lo = min(good, default=0.0)
    hi = max(good, default=1.0)
    if lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    score_span = (hi - lo) or 1.0

    def y_score(s: float) -> float:
        return round(y1 - (y1 - y0) * ((s - lo) / score_span), 1)

    cost_points = " ".join(f"{x(st)},{y_cost(c)}" for st, c in zip(steps, cumul, strict=True) if math.isfinite(c))
    lines: list[str] = []
    current: list[str] = []
    marks: list[tuple[float, float]] = []
    for st, s in zip(steps, scores, strict=True):
        if s is None or not math.isfinite(s):
            if current:
                lines.append(" ".join(current))
                current = []
            continue
        pt = (x(st), y_score(s))
        current.append(f"{pt[0]},{pt[1]}")
        marks.append(pt)
    if current:
        lines.append(" ".join(current))
    ticks = [
        Tick(x0 - 6, y1, _fmt_score(lo), "end"), Tick(x0 - 6, y0 + 4, _fmt_score(hi), "end"),
        Tick(x1 + 6, y1, _fmt_cost(low_cost)), Tick(x1 + 6, y0 + 4, _fmt_cost(top_cost)),
        Tick(x0, y1 + 16, f"step {first}"),
    ]
    if span:
        ticks.append(Tick(x1, y1 + 16, f"step {last}", "end"))
    return Chart(
        width=width, height=height, box=(x0, y0, x1, y1), cost_points=cost_points, score_lines=tuple(lines),
        score_marks=tuple(marks) if n < mark_below else (), errors=tuple(x(st) for st, e in zip(steps, errors, strict=True) if e),
        ticks=tuple(ticks), steps=n, scored=len(marks),
    )
