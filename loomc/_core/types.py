"""The records loomc keeps: run status, step records, run info and run results."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from loomc._core import events as _events
from loomc._core.events import Event

__all__ = ["RunInfo", "RunResult", "RunStatus", "StepRecord"]


class RunStatus(str, enum.Enum):
    """Where a run stands."""

    RUNNING = "running"
    COMPLETED = "completed"
    BUDGET_EXHAUSTED = "budget_exhausted"
    STALLED = "stalled"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    CRASHED = "crashed"
    #: A step asked a person (``loomc.ask``) and the run waits for the answer (``fn.reply``).
    WAITING = "waiting"

    def __str__(self) -> str:
        return self.value

    @property
    def finished(self) -> bool:
        """True once nothing more will happen without a resume."""
        return self is not RunStatus.RUNNING


_MISSING: Any = object()


class StepRecord:
    """One committed iteration of a run.

    ``state`` is the state the step returned (for a failed step, the state it started
    from). A record read back from a long run may load its state lazily from the store.

    ``events`` are what happened during the step, as records (``{"kind": "backtrack",
    "to": 2}``; see ``docs/semantics.md``); ``event`` is their 0.3.0 text, joined with ``"; "``.
    """

    __slots__ = ("_events", "_loader", "_state", "_ts", "cost_usd", "error", "score", "step_n")

    def __init__(
        self,
        step_n: int,
        state: Any = None,
        cost_usd: float = 0.0,
        score: float | None = None,
        timestamp: datetime | str | None = None,
        error: str | None = None,
        event: str | None = None,
        breaker_event: str | None = None,
        *,
        events: list[Event] | None = None,
    ) -> None:
        self.step_n = step_n
        self._state = state
        self._loader: Callable[[int], Any] | None = None
        self.cost_usd = cost_usd
        self.score = score
        self._ts: datetime | str = timestamp if timestamp is not None else datetime.now(UTC)
        self.error = error
        # the stored text (JSON, or an older loomc's line) is parsed when first read
        self._events: list[Event] | str | None = events if events is not None else (
            event if event is not None else breaker_event
        )

    @classmethod
    def lazy(
        cls,
        step_n: int,
        loader: Callable[[int], Any],
        *,
        cost_usd: float = 0.0,
        score: float | None = None,
        timestamp: datetime | str | None = None,
        error: str | None = None,
        event: str | None = None,
    ) -> StepRecord:
        """A record whose state ``loader(step_n)`` loads when first asked for.

        ``timestamp`` may be the stored ISO text; it is parsed on first access.
        """
        rec = cls.__new__(cls)
        rec.step_n, rec.cost_usd, rec.score, rec.error, rec._events = step_n, cost_usd, score, error, event
        rec._ts = timestamp if timestamp is not None else datetime.now(UTC)
        rec._state, rec._loader = _MISSING, loader
        return rec

    @property
    def timestamp(self) -> datetime:
        """When the step was committed (UTC)."""
        ts = self._ts
        if isinstance(ts, str):
            ts = self._ts = datetime.fromisoformat(ts)
        return ts

    @timestamp.setter
    def timestamp(self, value: datetime) -> None:
        self._ts = value

    @property
    def state(self) -> Any:
        """The step's state (loaded on first access for lazy records)."""
        if self._state is _MISSING:
            assert self._loader is not None
            return self._loader(self.step_n)
        return self._state

    @state.setter
    def state(self, value: Any) -> None:
        self._state = value
        self._loader = None

    def drop_state(self, loader: Callable[[int], Any]) -> None:
        """Forget the in-memory state; ``loader(step_n)`` fetches it again when needed."""
        self._state = _MISSING
        self._loader = loader

    @property
    def events(self) -> list[Event]:
        """What happened during the step, as records (``[]``: nothing)."""
        evs = self._events
        if not isinstance(evs, list):
            evs = self._events = _events.decode(evs)
        return evs

    @events.setter
    def events(self, value: list[Event]) -> None:
        self._events = list(value)

    @property
    def event(self) -> str | None:
        """The step's events as one line (``"backtrack to step 1; converged"``), or ``None``.

        Setting it to such a line (or to the stored JSON) replaces :attr:`events`.
        """
        evs = self.events
        return "; ".join(_events.text(e) for e in evs) if evs else None

    @event.setter
    def event(self, value: str | None) -> None:
        self._events = value

    @property
    def breaker_event(self) -> str | None:
        """loomc 0.3.0 name of :attr:`event`."""
        return self.event

    def __repr__(self) -> str:
        state = "<lazy>" if self._state is _MISSING else repr(self._state)
        if len(state) > 60:
            state = state[:57] + "..."
        parts = [f"step_n={self.step_n}", f"state={state}", f"cost_usd={self.cost_usd!r}"]
        if self.score is not None:
            parts.append(f"score={self.score!r}")
        if self.error is not None:
            parts.append(f"error={self.error!r}")
        if self.event is not None:
            parts.append(f"event={self.event!r}")
        return f"StepRecord({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StepRecord):
            return NotImplemented
        return (
            self.step_n == other.step_n
            and self.state == other.state
            and self.cost_usd == other.cost_usd
            and self.score == other.score
            and self.error == other.error
            and self.events == other.events
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class RunInfo:
    """A run as the store knows it (totals include nested child runs)."""

    id: str
    spec_hash: str
    status: RunStatus
    created_at: str
    updated_at: str
    name: str = ""
    kind: str = "loop"
    parent_run_id: str | None = None
    cost_usd: float = 0.0
    steps: int = 0
    parent_step: int | None = None
    call_index: int | None = None
    wall_s: float = 0.0
    max_step_cost: float = 0.0
    budget: dict[str, Any] = field(default_factory=dict)
    stop_reason: str | None = None
    owner: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    #: The run this one was forked from (``fn.fork``) and the step it was forked at.
    forked_from: str | None = None
    forked_step: int | None = None


class RunHistory(list):  # type: ignore[type-arg]
    """A run's step records, in order: a list, with room for what detectors have read of it.

    ``scans`` maps a detector to how far it has read this list and what it derived
    (see ``loomc._core.detectors``), so one called after every step reads only the new records.
    """

    __slots__ = ("scans",)

    def __init__(self, records: Any = ()) -> None:
        super().__init__(records)
        self.scans: dict[Any, Any] = {}


@dataclass
class RunResult:
    """What a finished (or stopped) run produced; ``LoopRunner.run`` returns it."""

    run_id: str
    status: RunStatus
    state: Any
    steps: int
    cost_usd: float
    best_state: Any = None
    best_score: float | None = None
    stop_reason: str | None = None
    error: BaseException | None = None
    history: list[StepRecord] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        """True when the run completed (converged or ran to its natural end)."""
        return self.status is RunStatus.COMPLETED
