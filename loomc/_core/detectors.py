"""Convergence detectors, backtracking strategies and stall handling.

Every object here is a pure function of the run's history (a list of
:class:`~loomc.StepRecord`): no hidden state, so a resumed run decides exactly as the
original would have. Detectors compose: ``a | b`` stops when either does, ``a & b``
when both do; plain callables ``history -> bool`` are accepted anywhere.

The engine's history is a :class:`~loomc._core.types.RunHistory` (a list) that keeps, per
detector, how far it has been read: a detector called after every step reads only the
new records, so a long run costs O(1) per step rather than O(steps). What is kept is
derived from the records alone; when the list changed other than by appending (a resumed
run's earlier steps read in front), it is recomputed from scratch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from loomc._core.types import StepRecord

__all__ = [
    "All",
    "Any_",
    "BestScore",
    "Detector",
    "Escalate",
    "JudgeDetector",
    "LastGood",
    "Predicate",
    "ScorePlateau",
    "as_detector",
    "judge",
    "predicate",
    "score_plateau",
]

#: What a detector reads: a run's step records in order (the engine passes its ``RunHistory``).
StepRecords = Sequence[StepRecord]
_T = TypeVar("_T")


class _Scan:
    """How far a detector has read one history, and what it derived from it."""

    __slots__ = ("data", "first", "last", "n")

    def __init__(self, data: Any) -> None:
        self.data, self.n = data, 0
        self.first: Any = None
        self.last: Any = None


def _fold(history: StepRecords, key: Any, upto: int, init: Callable[[], _T], step: Callable[[_T, StepRecord], None]) -> _T:
    """``init()`` folded with ``step`` over ``history[:upto]``, resuming the last fold of this history.

    On a plain sequence (no ``scans`` room) the fold starts over at every call.
    """
    scans: dict[Any, _Scan] | None = getattr(history, "scans", None)
    scan = scans.get(key) if scans is not None else None
    if scan is None or scan.n > upto or (scan.n and (history[0] is not scan.first or history[scan.n - 1] is not scan.last)):
        scan = _Scan(init())
    data: _T = scan.data
    for i in range(scan.n, upto):
        step(data, history[i])
    if upto:
        scan.first, scan.last, scan.n = history[0], history[upto - 1], upto
    if scans is not None:
        scans[key] = scan
    return data


class _Tail:
    """The last ``size`` scores of successful steps, and the best of those before them."""

    __slots__ = ("before", "count", "counted", "recent", "since")

    def __init__(self, size: int, since: int = 0) -> None:
        self.recent: deque[float] = deque(maxlen=size)
        self.before: float | None = None  # best score older than ``recent``
        self.count = 0  # scored steps
        self.since, self.counted = since, 0  # scored steps numbered ``since`` or later

    def add(self, h: StepRecord) -> None:
        if h.score is None or h.error is not None:
            return
        recent = self.recent
        if len(recent) == recent.maxlen:
            old = recent[0]
            self.before = old if self.before is None else max(self.before, old)
        recent.append(h.score)
        self.count += 1
        if h.step_n >= self.since:
            self.counted += 1


class _Best:
    """The best-scoring successful step so far (the earliest on ties)."""

    __slots__ = ("score", "step_n")

    def __init__(self) -> None:
        self.step_n: int | None = None
        self.score: float | None = None

    def add(self, h: StepRecord) -> None:
        if h.score is not None and h.error is None and (self.score is None or h.score > self.score):
            self.step_n, self.score = h.step_n, h.score


class Detector:
    """Base of convergence detectors: ``detector(history) -> bool`` (True: stop)."""

    def __call__(self, history: StepRecords) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def should_stop(self, history: StepRecords) -> bool:
        """loomc 0.3.0 name of ``__call__``."""
        return bool(self(history))

    def __or__(self, other: Detector | Callable[[StepRecords], bool]) -> Detector:
        return Any_(self, other)

    def __ror__(self, other: Callable[[StepRecords], bool]) -> Detector:
        return Any_(other, self)

    def __and__(self, other: Detector | Callable[[StepRecords], bool]) -> Detector:
        return All(self, other)

    def __rand__(self, other: Callable[[StepRecords], bool]) -> Detector:
        return All(other, self)


def as_detector(obj: Any) -> Callable[[StepRecords], bool]:
    """Accept a detector, a 0.3.0-style object with ``should_stop``, or a plain callable."""
    if isinstance(obj, Detector):
        return obj
    if hasattr(obj, "should_stop"):
        return obj.should_stop  # type: ignore[no-any-return]
    if callable(obj):
        return obj  # type: ignore[no-any-return]
    raise TypeError(f"converge_on={obj!r}: expected a detector or a callable history -> bool")


def _flatten(kind: type, parts: tuple[Any, ...]) -> tuple[Callable[[StepRecords], bool], ...]:
    out: list[Callable[[StepRecords], bool]] = []
    for p in parts:
        if isinstance(p, kind):
            out.extend(p.detectors)  # type: ignore[attr-defined]
        else:
            out.append(as_detector(p))
    return tuple(out)


class Any_(Detector):  # noqa: N801 - ``Any`` would shadow typing.Any
    """Stops when any of its detectors does (``a | b``)."""

    def __init__(self, *detectors: Any) -> None:
        self.detectors = _flatten(Any_, detectors)

    def __call__(self, history: StepRecords) -> bool:
        return any(d(history) for d in self.detectors)

    def __repr__(self) -> str:
        return " | ".join(repr(d) for d in self.detectors)


class All(Detector):
    """Stops when all of its detectors do (``a & b``)."""

    def __init__(self, *detectors: Any) -> None:
        self.detectors = _flatten(All, detectors)

    def __call__(self, history: StepRecords) -> bool:
        return all(d(history) for d in self.detectors)

    def __repr__(self) -> str:
        return " & ".join(f"({d!r})" if isinstance(d, Any_) else repr(d) for d in self.detectors)


class ScorePlateau(Detector):
    """Stop when the score has not improved by ``min_delta`` for ``patience`` scored steps."""

    def __init__(self, patience: int = 3, min_delta: float = 0.01) -> None:
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ValueError(f"score_plateau(patience={patience!r}): must be a whole number >= 1")
        if min_delta < 0:
            raise ValueError(f"score_plateau(min_delta={min_delta!r}): must be >= 0")
        self.patience = patience
        self.min_delta = min_delta

    def __call__(self, history: StepRecords) -> bool:
        tail = _fold(history, self, len(history), lambda: _Tail(self.patience), _Tail.add)
        if tail.count < self.patience + 1:
            return False
        best = tail.before  # the best of all but the last ``patience`` scores
        assert best is not None
        return all(s - best < self.min_delta for s in tail.recent)

    def __repr__(self) -> str:
        return f"score_plateau(patience={self.patience}, min_delta={self.min_delta})"


class Predicate(Detector):
    """Stop when ``fn(history)`` is true."""

    def __init__(self, fn: Callable[[StepRecords], bool]) -> None:
        if not callable(fn):
            raise TypeError(f"predicate({fn!r}): expected a callable history -> bool")
        self.fn = fn

    def __call__(self, history: StepRecords) -> bool:
        return bool(self.fn(history))

    def __repr__(self) -> str:
        return f"predicate({getattr(self.fn, '__qualname__', self.fn)!s})"


class JudgeDetector(Detector):
    """Stop when ``judge_fn(state)`` says the latest (successful) state is done."""

    def __init__(self, judge_fn: Callable[[Any], bool]) -> None:
        if not callable(judge_fn):
            raise TypeError(f"judge({judge_fn!r}): expected a callable state -> bool")
        self.judge_fn = judge_fn

    def __call__(self, history: StepRecords) -> bool:
        if not history or history[-1].error is not None:
            return False
        return bool(self.judge_fn(history[-1].state))

    def __repr__(self) -> str:
        return f"judge({getattr(self.judge_fn, '__qualname__', self.judge_fn)!s})"


def score_plateau(patience: int = 3, min_delta: float = 0.01) -> ScorePlateau:
    """Stop when the score plateaus: no gain of ``min_delta`` in ``patience`` scored steps."""
    return ScorePlateau(patience=patience, min_delta=min_delta)


def predicate(fn: Callable[[StepRecords], bool]) -> Predicate:
    """Stop when ``fn(history)`` returns true."""
    return Predicate(fn)


def judge(judge_fn: Callable[[Any], bool]) -> JudgeDetector:
    """Stop when ``judge_fn(state)`` returns true for the latest state."""
    return JudgeDetector(judge_fn)


# ---------------------------------------------------------------------------------
# Backtracking and stall


class BestScore:
    """When a step scores below the best so far, start the next step from the best step's state."""

    def __init__(self, metric: Callable[[Any], float] | None = None) -> None:
        self.metric = metric

    def target(self, history: StepRecords) -> int | None:
        """The step to go back to after the last step, or ``None``."""
        last = history[-1] if history else None
        if last is None or last.error is not None or last.score is None:
            return None
        best = _fold(history, self, len(history) - 1, _Best, _Best.add)  # every step but the last
        if best.score is not None and last.score < best.score:
            return best.step_n
        return None

    def should_backtrack(self, history: StepRecords) -> tuple[bool, int | None]:
        """loomc 0.3.0 form: ``(backtrack?, step_n)``."""
        k = self.target(history)
        return (k is not None, k)

    def __repr__(self) -> str:
        return "BestScore()"


class LastGood:
    """When a step raises, restore the last good state and continue.

    After ``max_consecutive_errors`` errors in a row the run fails.
    """

    def __init__(self, max_consecutive_errors: int = 3) -> None:
        if not isinstance(max_consecutive_errors, int) or max_consecutive_errors < 1:
            raise ValueError(f"LastGood(max_consecutive_errors={max_consecutive_errors!r}): must be >= 1")
        self.max_consecutive_errors = max_consecutive_errors

    def should_backtrack(self, history: StepRecords) -> tuple[bool, int | None]:
        """loomc 0.3.0 form: after an error, the last step without one."""
        if not history or history[-1].error is None:
            return False, None
        for h in reversed(history[:-1]):
            if h.error is None:
                return True, h.step_n
        return False, None

    def __repr__(self) -> str:
        return f"LastGood(max_consecutive_errors={self.max_consecutive_errors})"


class Escalate:
    """Stop the run as ``stalled`` (raising ``StallError``) after ``after`` scored steps without improvement.

    The window counts only steps since the run started or was last resumed.
    """

    def __init__(self, after: int = 3) -> None:
        if not isinstance(after, int) or isinstance(after, bool) or after < 1:
            raise ValueError(f"Escalate(after={after!r}): must be a whole number >= 1")
        self.after = after

    def stalled(self, history: StepRecords, since: int = 0) -> bool:
        """True when the last ``after`` scored steps (from ``since`` on) beat no earlier score."""
        tail = _fold(history, (self, since), len(history), lambda: _Tail(self.after, since), _Tail.add)
        if tail.counted < self.after:
            return False
        # the window's last ``after`` scores against the best of everything scored before
        # them, earlier attempts included
        baseline = tail.before
        if baseline is None:
            return False
        return all(s <= baseline for s in tail.recent)

    def __repr__(self) -> str:
        return f"Escalate(after={self.after})"
