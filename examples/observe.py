"""See a run as it happens: its events in code, and OpenTelemetry spans on the console.

Runs offline, with no API key: a "writer" loop improves a draft, a nested "critic" loop
scores each draft, and a graph runs the writer then a summary node.

    python examples/observe.py            # events, then the spans (needs opentelemetry-sdk)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import loomc
from loomc import Budget, RunFinished, RunStarted, StepCommitted, loop, score_plateau
from orchestration import Graph

DB = str(Path(tempfile.mkdtemp()) / "observe.db")


@loop(budget=Budget(iterations=1), checkpoint=DB, name="critic")
def critic(state: dict[str, object]) -> dict[str, object]:
    """Score a draft (a stand-in for an LLM judge): one cent per look."""
    loomc.charge(0.01)
    draft = str(state["draft"])
    return {"draft": draft, "score": min(1.0, len(draft) / 40)}


@loop(budget=Budget(iterations=3, usd=1.00), checkpoint=DB, scorer=lambda s: s["score"],
      converge_on=score_plateau(patience=2), name="writer")
def writer(state: dict[str, object]) -> dict[str, object]:
    """Add to the draft, then ask the critic."""
    draft = f"{state['draft']} more".strip()
    review = critic.run({"draft": draft, "score": 0.0})
    return {"draft": draft, "score": review.state["score"]}


def summary(state: dict[str, object]) -> dict[str, object]:
    """A plain function as a graph node: one checkpointed step."""
    return {"words": len(str(state["draft"]).split())}


def show(event: loomc.RunEvent) -> None:
    """Print one event on one line (nested runs indented under their parent)."""
    pad = "    " if event.parent_run_id else ""
    if isinstance(event, RunStarted):
        print(f"{pad}started  {event.kind} {event.name} {event.run_id} (resumed={event.resumed})")
    elif isinstance(event, StepCommitted):
        r = event.record
        extra = f" events={r.events}" if r.events else ""
        print(f"{pad}step {r.step_n}   {event.name} cost=${r.cost_usd:.4f} score={r.score} total=${event.cost_usd:.4f}{extra}")
    elif isinstance(event, RunFinished):
        print(f"{pad}finished {event.kind} {event.name}: {event.status.value} ({event.reason}) ${event.cost_usd:.4f}")


def main() -> None:
    print("-- fn.stream: the events of one run (and its nested runs)")
    for event in writer.stream({"draft": "", "score": 0.0}):
        show(event)

    print("\n-- Graph.stream: a graph, its nodes and the loops nested in them")
    graph = Graph("observe", checkpoint=DB)
    graph.add(writer)
    graph.add(summary, after=writer)
    for event in graph.stream({"draft": "", "score": 0.0}):
        show(event)

    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
    except ImportError:
        print("\n(pip install opentelemetry-sdk to see the spans too)")
        return
    print("\n-- OpenTelemetry: the same graph as spans (ConsoleSpanExporter, one line per span)")
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(
        formatter=lambda span: f"{span.name:28} {dict(span.attributes or {})}\n")))
    trace.set_tracer_provider(provider)
    graph.run({"draft": "", "score": 0.0})
    provider.shutdown()


if __name__ == "__main__":
    main()
