"""OpenTelemetry spans for runs, their steps and LLM calls (extra ``loomc[otel]``).

loomc instruments itself with the OpenTelemetry *API* only: the application picks the SDK,
the exporter and the tracer provider. This module is imported only once the application
has imported ``opentelemetry.trace`` (see ``loomc._core.observe``), and spans are kept only
when they record (a tracer provider is set and the trace is sampled).

The spans nest like the run tree: a run's span is a child of whatever span is current when
it starts; each step's span is a child of its run's, and is the current span while the
step's code runs, so a loop nested in the step, a graph node's run under a graph, and an
LLM call made through an adapter hang under it. Attribute names are listed in
``docs/observability.md``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from loomc._core import events as _events
from loomc._core.types import RunStatus, StepRecord

__all__ = ["CallSpan", "RunSpans", "start_call_span", "tracer"]

#: The outcomes a run span reports as an error (a budget or convergence stop is a normal end).
_ERRORS = frozenset({RunStatus.FAILED, RunStatus.INTERRUPTED, RunStatus.CRASHED})


def tracer() -> trace.Tracer:
    """loomc's tracer, from the application's tracer provider."""
    from loomc import __version__

    return trace.get_tracer("loomc", __version__)


def _attrs(values: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes that have a value (OpenTelemetry takes no ``None``)."""
    return {k: v for k, v in values.items() if v is not None}


class RunSpans:
    """One run's span and the span of its step in flight."""

    __slots__ = ("backtracks", "ctx", "retries", "run_span", "step_span", "token", "tracer")

    def __init__(self, tracer: trace.Tracer, ctx: Any, run_span: Span) -> None:
        self.tracer = tracer
        self.ctx = ctx
        self.run_span = run_span
        self.step_span: Span | None = None
        self.token: Any = None
        self.retries = 0
        self.backtracks = 0

    @classmethod
    def start(cls, tracer: trace.Tracer, ctx: Any, kind: str, resumed: bool, step: int) -> RunSpans:
        """The span of run ``ctx`` (a ``RunContext``), started as a child of the current span."""
        budget = ctx.budget
        span = tracer.start_span(
            f"loomc.{kind} {ctx.name}",
            attributes=_attrs({
                "loomc.run_id": ctx.run_id,
                "loomc.name": ctx.name,
                "loomc.kind": kind,
                "loomc.parent_run_id": ctx.parent_run_id,
                "loomc.resumed": resumed,
                "loomc.start_step": step,
                "loomc.budget.usd": budget.usd,
                "loomc.budget.iterations": budget.iterations,
                "loomc.budget.wall_clock_s": budget.wall_clock_seconds,
            }),
        )
        return cls(tracer, ctx, span)

    @property
    def recording(self) -> bool:
        """Whether the run's span is recorded (a tracer provider is set, the trace sampled)."""
        return self.run_span.is_recording()

    def attach(self) -> Any:
        """Make the run's span current; returns the token for :meth:`detach`."""
        return otel_context.attach(trace.set_span_in_context(self.run_span))

    @staticmethod
    def detach(token: Any) -> None:
        """Undo :meth:`attach`."""
        otel_context.detach(token)

    def step_entered(self, step_n: int) -> None:
        """Start step ``step_n``'s span and make it current while the step runs."""
        if self.step_span is None:
            self.step_span = self.tracer.start_span(
                f"loomc.step {self.ctx.name}",
                context=trace.set_span_in_context(self.run_span),
                attributes={"loomc.run_id": self.ctx.run_id, "loomc.step": step_n},
            )
        self.token = otel_context.attach(trace.set_span_in_context(self.step_span))

    def step_left(self) -> None:
        """The step's code is over: its span is no longer current (it ends at the commit)."""
        if self.token is not None:
            otel_context.detach(self.token)
            self.token = None

    def committed(self, record: StepRecord, run_cost: float, usd_left: float | None) -> None:
        """End the step's span with what the step recorded."""
        span = self.step_span
        if span is None:  # pragma: no cover - a step always enters before it commits
            return
        self.step_span = None
        evs = record.events
        retries = sum(1 for e in evs if e.get("kind") == "retry")
        back = next((e.get("to") for e in evs if e.get("kind") == "backtrack"), None)
        self.retries += retries
        if back is not None:
            self.backtracks += 1
        span.set_attributes(_attrs({
            "loomc.step": record.step_n,
            "loomc.cost_usd": record.cost_usd,
            "loomc.score": record.score,
            "loomc.error": record.error,
            "loomc.events": [_events.text(e) for e in evs] if evs else None,
            "loomc.retries": retries,
            "loomc.backtrack_to": back,
            "loomc.converged": True if any(e.get("kind") == "converged" for e in evs) else None,
            "loomc.run.cost_usd": run_cost,
            "loomc.budget.usd_left": usd_left,
        }))
        if record.error is not None:
            span.set_status(Status(StatusCode.ERROR, record.error))
        span.end()

    def finished(
        self, status: RunStatus, reason: str | None, steps: int, cost_usd: float, error: BaseException | None,
        extra: Mapping[str, Any],
    ) -> None:
        """End the run's span (and a step's cut short) with the run's outcome."""
        self.step_left()
        step = self.step_span
        if step is not None:  # interrupted, cancelled or failed inside loomc mid-step
            self.step_span = None
            if error is not None:
                step.record_exception(error)
            step.set_status(Status(StatusCode.ERROR, f"{status.value}: {reason}" if reason else status.value))
            step.end()
        ctx = self.ctx
        budget = ctx.budget
        ledger = ctx.ledger
        wall_left = None
        if ledger is not None and ledger.deadline is not None:
            wall_left = max(0.0, ledger.deadline - time.monotonic())
        span = self.run_span
        span.set_attributes(_attrs({
            "loomc.status": status.value,
            "loomc.stop_reason": reason,
            "loomc.cost_usd": cost_usd,
            "loomc.steps": steps,
            "loomc.retries": self.retries,
            "loomc.backtracks": self.backtracks,
            "loomc.budget.usd_left": ledger.available() if ledger is not None else None,
            "loomc.budget.iterations_left": None if budget.iterations is None else max(0, int(budget.iterations) - steps),
            "loomc.budget.wall_clock_left_s": wall_left,
            **{f"loomc.{k}": v for k, v in extra.items()},
        }))
        if status in _ERRORS:
            if error is not None:
                span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{status.value}: {reason}" if reason else status.value))
        span.end()


# -- LLM calls: the GenAI semantic conventions ------------------------------------------

_MAX_TOKENS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def _number(value: Any) -> int | float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class CallSpan:
    """The span of one LLM call made through an adapter (``gen_ai.*`` attributes)."""

    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    def attach(self) -> Any:
        """Make the call's span current while the request is sent; returns the token."""
        return otel_context.attach(trace.set_span_in_context(self.span))

    @staticmethod
    def detach(token: Any) -> None:
        """Undo :meth:`attach`."""
        otel_context.detach(token)

    def response(self, response: Any) -> None:
        """Note what the response says of itself: model, id, why it stopped."""
        reasons: list[str] = []
        stop = _get(response, "stop_reason")  # Anthropic
        if isinstance(stop, str):
            reasons.append(stop)
        for choice in _get(response, "choices") or ():  # OpenAI chat completions
            reason = _get(choice, "finish_reason")
            if isinstance(reason, str):
                reasons.append(reason)
        model, rid = _get(response, "model"), _get(response, "id")
        self.span.set_attributes(_attrs({
            "gen_ai.response.model": model if isinstance(model, str) else None,
            "gen_ai.response.id": rid if isinstance(rid, str) else None,
            "gen_ai.response.finish_reasons": reasons or None,
        }))

    def end(self, usage: Any, cost_usd: float | None, error: BaseException | None = None) -> None:
        """End the span with the call's token usage and cost (``error``: the request failed)."""
        span = self.span
        if usage is not None:
            inp = _number(_get(usage, "input_tokens"))
            out = _number(_get(usage, "output_tokens"))
            span.set_attributes(_attrs({
                "gen_ai.usage.input_tokens": inp if inp is not None else _number(_get(usage, "prompt_tokens")),
                "gen_ai.usage.output_tokens": out if out is not None else _number(_get(usage, "completion_tokens")),
            }))
        if cost_usd is not None:
            span.set_attribute("loomc.cost_usd", cost_usd)
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            span.set_attribute("error.type", type(error).__qualname__)
        span.end()


def start_call_span(provider: str, kwargs: Mapping[str, Any], default_model: str) -> CallSpan | None:
    """The span of an LLM call about to be sent with ``kwargs``, or ``None`` when it would not be recorded."""
    model = kwargs.get("model")
    model = model if isinstance(model, str) else default_model
    max_tokens = next((_number(kwargs.get(k)) for k in _MAX_TOKENS if kwargs.get(k) is not None), None)
    span = tracer().start_span(
        f"chat {model}",
        kind=SpanKind.CLIENT,
        attributes=_attrs({
            "gen_ai.operation.name": "chat",
            "gen_ai.system": provider,
            "gen_ai.provider.name": provider,
            "gen_ai.request.model": model,
            "gen_ai.request.max_tokens": max_tokens,
            "gen_ai.request.temperature": _number(kwargs.get("temperature")),
            "gen_ai.request.top_p": _number(kwargs.get("top_p")),
        }),
    )
    if not span.is_recording():
        return None
    return CallSpan(span)
