"""Watching runs: the events a run tells its observers, and the one hook the engine calls.

A run tells three things, in this order: it started (:class:`RunStarted`), a step was
committed (:class:`StepCommitted`, once per step) and it finished (:class:`RunFinished`).
Who listens is decided once, when the run is opened (:func:`watch_run`): the callbacks of
the enclosing run (a nested run's events go to its parent's observers too), the loop's own
``on_step`` and the caller's stream, and OpenTelemetry when the application configured it.
With nobody listening :func:`watch_run` returns ``None`` and a step costs one ``is None`` test.

The engine calls :class:`RunWatch` at four places: the run was taken (``started``), a step
starts and ends executing (``step_entered``/``step_left``: the step's span is the current
one while the user's code runs, so nested runs and LLM calls hang under it), a step was
committed (``committed``), and the run ended (``finished``).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loomc._core.errors import EventCallbackWarning
from loomc._core.types import RunStatus, StepRecord

if TYPE_CHECKING:
    from loomc.integrations.otel import RunSpans

__all__ = ["RunEvent", "RunFinished", "RunStarted", "RunWatch", "StepCommitted", "watch_run"]


@dataclass(frozen=True, slots=True)
class RunStarted:
    """A run started, or resumed (``resumed``), at step ``step``.

    ``parent_run_id`` names the run it is nested in (a graph for a node, the loop whose step
    called it for a nested loop), ``None`` for a top-level run. ``kind`` is ``loop``,
    ``node``, ``item`` (one item of a map node) or ``graph``.
    """

    run_id: str
    name: str
    kind: str
    parent_run_id: str | None
    resumed: bool
    step: int


@dataclass(frozen=True, slots=True)
class StepCommitted:
    """A step of a run was committed: ``record`` is its :class:`~loomc.StepRecord`.

    ``record`` carries the step's number, state, cost, score, error and events (retries,
    backtrack, converged ...). ``cost_usd`` is the run's total so far (nested runs included),
    ``usd_left`` what its budget (and every enclosing one) still allows (``None``: no cap).
    """

    run_id: str
    name: str
    kind: str
    parent_run_id: str | None
    record: StepRecord
    cost_usd: float
    usd_left: float | None


@dataclass(frozen=True, slots=True)
class RunFinished:
    """A run ended with ``status`` (``reason`` says why, as ``RunResult.stop_reason`` does).

    ``steps`` counts its committed steps (of every attempt), ``cost_usd`` its total.
    ``error`` is the exception that ended it, if any (a failed step's, a cancellation).
    """

    run_id: str
    name: str
    kind: str
    parent_run_id: str | None
    status: RunStatus
    reason: str | None
    steps: int
    cost_usd: float
    error: BaseException | None = None


#: What an ``on_step`` callback, ``stream`` and ``astream`` receive.
RunEvent = RunStarted | StepCommitted | RunFinished


class _Callback:
    """A user's callback: called with every event; the first exception it raises is reported once."""

    __slots__ = ("fn", "reported")

    def __init__(self, fn: Callable[[RunEvent], Any]) -> None:
        self.fn = fn
        self.reported = False

    def __call__(self, event: RunEvent) -> None:
        try:
            self.fn(event)
        except Exception as exc:  # noqa: BLE001 - an observer must never break the run
            if not self.reported:
                self.reported = True
                name = getattr(self.fn, "__qualname__", None) or repr(self.fn)
                warnings.warn(
                    f"loomc: the event callback {name} raised {type(exc).__name__}: {exc} on "
                    f"{type(event).__name__} of run {event.run_id}; the run goes on (later errors of "
                    "this callback in this run are not reported): fix the callback, or catch its errors",
                    EventCallbackWarning,
                    stacklevel=2,
                )


class RunWatch:
    """Who watches one run: the callbacks of its tree and its OpenTelemetry spans."""

    __slots__ = ("callbacks", "ctx", "kind", "resumed", "spans")

    def __init__(self, callbacks: tuple[_Callback, ...], ctx: Any, kind: str, resumed: bool) -> None:
        self.callbacks = callbacks
        self.ctx = ctx  # the engine's RunContext: run id, name, budget, ledger
        self.kind = kind
        self.resumed = resumed
        self.spans: RunSpans | None = None

    def _emit(self, event: RunEvent) -> None:
        for cb in self.callbacks:
            cb(event)

    def started(self, step: int) -> None:
        """The run was taken (created or resumed) and starts at ``step`` (its span started with the watch)."""
        ctx = self.ctx
        if self.callbacks:
            self._emit(RunStarted(ctx.run_id, ctx.name, self.kind, ctx.parent_run_id, self.resumed, step))

    def step_entered(self, step_n: int) -> None:
        """Step ``step_n`` starts executing (its span becomes the current one)."""
        if self.spans is not None:
            self.spans.step_entered(step_n)

    def step_left(self) -> None:
        """The step's code is over (its span is no longer the current one)."""
        if self.spans is not None:
            self.spans.step_left()

    def committed(self, record: StepRecord) -> None:
        """Step ``record`` was committed."""
        if self.spans is None and not self.callbacks:
            return
        ctx = self.ctx
        ledger = ctx.ledger
        usd_left = ledger.available()
        if self.spans is not None:
            self.spans.committed(record, ledger.spent, usd_left)
        if self.callbacks:
            self._emit(StepCommitted(ctx.run_id, ctx.name, self.kind, ctx.parent_run_id, record, ledger.spent, usd_left))

    def finished(
        self, status: RunStatus, reason: str | None, steps: int, cost_usd: float, error: BaseException | None = None,
        **attributes: Any,
    ) -> None:
        """The run ended (``attributes``: more for its span, e.g. ``best_score``)."""
        ctx = self.ctx
        if self.spans is not None:
            self.spans.finished(status, reason, steps, cost_usd, error, attributes)
            self.spans = None
        if self.callbacks:
            self._emit(RunFinished(ctx.run_id, ctx.name, self.kind, ctx.parent_run_id, status, reason, steps, cost_usd, error))

    def attach(self) -> Any:
        """Make the run's span the current one (a run whose children start outside a step: a graph).

        Returns the token for :meth:`detach` (``None`` when there is no span).
        """
        return self.spans.attach() if self.spans is not None else None

    def detach(self, token: Any) -> None:
        """Undo :meth:`attach`."""
        if token is not None and self.spans is not None:
            self.spans.detach(token)


def _tracer() -> Any:
    """The tracer for loomc's spans, or ``None`` when the application does not use OpenTelemetry.

    An application that configured a tracer provider has imported ``opentelemetry.trace``;
    loomc never imports it first (so it costs nothing where OpenTelemetry is not used).
    """
    if "opentelemetry.trace" not in sys.modules:
        return None
    from loomc.integrations.otel import tracer

    return tracer()


def watch_run(
    ctx: Any, kind: str, resumed: bool, step: int, parent: Any, on_step: Callable[[RunEvent], Any] | None,
    observers: tuple[Callable[[RunEvent], Any], ...],
) -> RunWatch | None:
    """The watch of the run ``ctx`` (a ``RunContext``), or ``None`` when nothing watches it.

    The run's span (when OpenTelemetry records) starts here, a child of the current span.

    Args:
        ctx: the run's context (its id, name, parent, budget and ledger).
        kind: the run's kind (``loop``, ``node``, ``item``, ``graph``).
        resumed: the run existed before this attempt.
        step: the step it starts at.
        parent: the enclosing run's context, if the run is nested (its observers watch this run too).
        on_step: the loop's own callback.
        observers: the caller's callbacks (a stream's queue).
    """
    inherited: RunWatch | None = parent.watch if parent is not None else None
    callbacks = inherited.callbacks if inherited is not None else ()
    if on_step is not None:
        callbacks = (*callbacks, _Callback(on_step))
    if observers:
        callbacks = (*callbacks, *(_Callback(fn) for fn in observers))
    spans = None
    tracer = _tracer()
    if tracer is not None:
        from loomc.integrations.otel import RunSpans

        spans = RunSpans.start(tracer, ctx, kind, resumed, step)
        if not spans.recording:  # no tracer provider configured, or not sampled
            spans = None
    if not callbacks and spans is None:
        return None
    watch = RunWatch(callbacks, ctx, kind, resumed)
    watch.spans = spans
    return watch
