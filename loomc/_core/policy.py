"""The pure policy core: every decision a run makes, as functions of data.

Nothing here reads a clock, sleeps, awaits or touches storage. Elapsed time, costs and
history come in as arguments; decisions go out as frozen values. The sync driver, the
async driver, resume and the graph layer all call these functions, so they cannot
disagree, and a resumed run decides exactly as the uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from loomc._core import events as _events
from loomc._core.budget import Budget
from loomc._core.detectors import All, Any_, BestScore, Escalate, LastGood, ScorePlateau, as_detector
from loomc._core.events import Event
from loomc._core.types import RunStatus, StepRecord

__all__ = ["Headroom", "Policy", "Stop", "RunUsage", "Verdict", "after_step", "check_budget"]

#: Slack for float sums of costs (a cent is 1e-2; this is far below any price).
EPS = 1e-9


@dataclass(slots=True)  # not frozen: one is made before every step, and frozen costs ~0.4 us more
class RunUsage:
    """What a run has used so far (carried across attempts)."""

    usd: float = 0.0
    iterations: int = 0
    wall_s: float = 0.0
    max_step_cost: float = 0.0


@dataclass(frozen=True, slots=True)
class Headroom:
    """What the enclosing runs (ancestors) leave: the tightest of their remaining limits."""

    usd: float | None = None
    usd_owner: str | None = None
    usd_cap: float | None = None
    wall_s: float | None = None
    wall_owner: str | None = None


@dataclass(frozen=True, slots=True)
class Stop:
    """Why a run stops: its final status and, for a budget stop, which limit."""

    status: RunStatus
    reason: str
    limit: str | None = None
    used: float = 0.0
    cap: float = 0.0
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a finished step means: the step's events, where the next step starts, and any stop."""

    events: tuple[Event, ...]
    next_from: int
    stop: Stop | None

    @property
    def event(self) -> str | None:
        """The events as one line (``"backtrack to step 1; converged"``), or ``None``."""
        return "; ".join(_events.text(e) for e in self.events) or None


@dataclass(frozen=True)
class Policy:
    """The loop's strategies, as given to ``@loop``."""

    budget: Budget
    converge_on: Callable[[Sequence[StepRecord]], bool] | None = None
    backtrack: tuple[Any, ...] = ()
    on_stall: Escalate | None = None

    @classmethod
    def build(cls, budget: Budget | None, converge_on: Any, backtrack: Any, on_stall: Any) -> Policy:
        """Validate ``@loop`` arguments (raising ``TypeError``/``ValueError`` at decoration)."""
        if budget is None:
            budget = Budget()
        if not isinstance(budget, Budget):
            raise TypeError(f"budget={budget!r}: expected loomc.Budget(...)")
        detector = as_detector(converge_on) if converge_on is not None else None
        if backtrack is None:
            strategies: tuple[Any, ...] = ()
        elif isinstance(backtrack, (list, tuple)):
            strategies = tuple(backtrack)
        else:
            strategies = (backtrack,)
        for s in strategies:
            if not isinstance(s, (BestScore, LastGood)) and not hasattr(s, "should_backtrack"):
                raise TypeError(f"backtrack={s!r}: expected BestScore(), LastGood() or a list of them")
        if on_stall is not None and not isinstance(on_stall, Escalate):
            raise TypeError(f"on_stall={on_stall!r}: expected Escalate(after=n)")
        return cls(budget, detector, strategies, on_stall)

    @property
    def scored_parts(self) -> list[str]:
        """The detectors and strategies that decide from scores (they need ``scorer=``)."""

        def walk(d: Any) -> list[str]:
            if isinstance(d, (Any_, All)):
                return [p for part in d.detectors for p in walk(part)]
            return [repr(d)] if isinstance(d, ScorePlateau) else []

        found = walk(self.converge_on)
        found += [repr(s) for s in self.backtrack if isinstance(s, BestScore)]
        if self.on_stall is not None:
            found.append(repr(self.on_stall))
        return found

    @property
    def unbounded(self) -> bool:
        """No budget limit and no convergence detector: nothing but an error ends the run."""
        b = self.budget
        return self.converge_on is None and b.usd is None and b.iterations is None and b.wall_clock_seconds is None

    @property
    def last_good(self) -> LastGood | None:
        """The error-recovery strategy, if any."""
        for s in self.backtrack:
            if isinstance(s, LastGood):
                return s
        return None


def check_budget(budget: Budget, used: RunUsage, outer: Headroom | None = None) -> Stop | None:
    """May the next step start? ``None`` if yes, else the limit that stops the run.

    A step starts only if iterations and wall clock remain and the run (and every
    ancestor) can afford the largest step cost seen so far.
    """
    if budget.iterations is not None and used.iterations >= budget.iterations:
        return _exhausted("iterations", used.iterations, budget.iterations)
    wall = budget.wall_clock_seconds
    if wall is not None and used.wall_s >= wall:
        return _exhausted("wall_clock", used.wall_s, wall)
    estimate = used.max_step_cost
    if budget.usd is not None and used.usd + estimate > budget.usd + EPS:
        return _exhausted("usd", used.usd, budget.usd)
    if outer is not None:
        if outer.wall_s is not None and outer.wall_s <= 0:
            return _exhausted("wall_clock", 0.0, 0.0, outer.wall_owner)
        if outer.usd is not None and estimate > outer.usd + EPS:
            cap = outer.usd_cap if outer.usd_cap is not None else outer.usd
            return _exhausted("usd", cap - outer.usd, cap, outer.usd_owner)
    return None


def _exhausted(limit: str, used: float, cap: float, owner: str | None = None) -> Stop:
    reason = f"budget: {limit}"
    if owner is not None:
        reason += f" (enclosing run {owner})"
    return Stop(RunStatus.BUDGET_EXHAUSTED, reason, limit, float(used), float(cap), owner)


def consecutive_errors(history: Sequence[StepRecord]) -> int:
    """How many steps at the end of the history raised."""
    n = 0
    for h in reversed(history):
        if h.error is None:
            break
        n += 1
    return n


def after_step(policy: Policy, history: Sequence[StepRecord], *, start_from: int, attempt_start: int) -> Verdict:
    """Decide what the last step of ``history`` means.

    Args:
        policy: the loop's strategies.
        history: every step so far, the new one last.
        start_from: the step whose state the new step started from (-1: the input).
        attempt_start: the first step number of the current attempt (the stall window
            restarts on resume).
    """
    last = history[-1]
    if last.error is not None:
        lg = policy.last_good
        if lg is None:
            return Verdict((), start_from, Stop(RunStatus.FAILED, f"error: {last.error}"))
        if consecutive_errors(history) >= lg.max_consecutive_errors:
            return Verdict(
                (), start_from,
                Stop(RunStatus.FAILED, f"error: {lg.max_consecutive_errors} consecutive errors ({last.error})"),
            )
        return Verdict((_events.backtrack(start_from),), start_from, None)

    events: list[Event] = []
    next_from = last.step_n
    for strategy in policy.backtrack:
        if isinstance(strategy, BestScore):
            k = strategy.target(history)
        elif isinstance(strategy, LastGood):
            continue
        else:  # a 0.3.0-style strategy object
            ok, k = strategy.should_backtrack(history)
            k = k if ok else None
        if k is not None:
            next_from = k
            events.append(_events.backtrack(k))
            break

    stop = None
    if policy.converge_on is not None and policy.converge_on(history):
        events.append({"kind": "converged"})
        stop = Stop(RunStatus.COMPLETED, "converged")
    elif policy.on_stall is not None and policy.on_stall.stalled(history, attempt_start):
        events.append({"kind": "stalled", "after": policy.on_stall.after})
        stop = Stop(RunStatus.STALLED, f"stalled: no score improvement in {policy.on_stall.after} steps")
    return Verdict(tuple(events), next_from, stop)


def best_step(history: Sequence[StepRecord]) -> StepRecord | None:
    """The highest-scoring successful step (the earliest on ties)."""
    best = None
    for h in history:
        if h.score is not None and h.error is None and (best is None or h.score > best.score):  # type: ignore[operator]
            best = h
    return best
