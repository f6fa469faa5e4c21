"""Runs one traced scenario in a fresh process and prints the finished spans as JSON lines.

A tracer provider is process-global (OpenTelemetry refuses to replace it), so each
scenario of tests/test_otel.py runs here, in its own process.
Usage: ``python otel_subject.py graph|agraph-asyncio|agraph-trio|adapter DB``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)

import anyio  # noqa: E402

import loomc  # noqa: E402
from loomc import Budget, loop  # noqa: E402
from orchestration import Graph  # noqa: E402


def graph(db: str) -> Graph:
    """A graph: ``plan`` (sync, two steps, each calling the nested loop ``draft``) then ``review`` (async)."""

    @loop(budget=Budget(iterations=2), scorer=lambda s: s["n"], name="draft")
    def draft(state: dict[str, int]) -> dict[str, int]:
        loomc.charge(0.01)
        return {"n": state["n"] + 1}

    @loop(budget=Budget(iterations=2), scorer=lambda s: float(s["n"]), name="plan")
    def plan(state: dict[str, int]) -> dict[str, int]:
        result = draft.run({"n": 0})
        return {"n": state["n"] + result.state["n"]}

    @loop(budget=Budget(iterations=1), name="review")
    async def review(state: dict[str, int]) -> dict[str, int]:
        await anyio.sleep(0)
        return {"n": state["n"] * 10}

    g = Graph("report", budget=Budget(usd=1.0), checkpoint=db)
    g.add(plan)
    g.add(review, after=plan)
    return g


def adapter(db: str) -> None:
    """One wrapped Anthropic call in a loop's step, against the local fake server."""
    import anthropic

    from loomc import AnthropicAdapter
    from loomc.testing import serve

    with serve() as api:
        ad = AnthropicAdapter("claude-sonnet-4-6")
        client = ad.wrap(anthropic.Anthropic(api_key="test", base_url=api.base_url, max_retries=0))

        @loop(budget=Budget(iterations=1, usd=1.0), checkpoint=db, name="ask")
        def ask(state: dict[str, str]) -> dict[str, str]:
            msg = client.messages.create(model="claude-sonnet-4-6", max_tokens=50,
                                         messages=[{"role": "user", "content": state["q"]}])
            return {"q": state["q"], "a": msg.content[0].text}

        ask.run({"q": "hello"})
        client.close()


def main() -> None:
    scenario, db = sys.argv[1], sys.argv[2]
    if scenario == "graph":
        graph(db).run({"n": 1})
    elif scenario.startswith("agraph-"):
        anyio.run(graph(db).arun, {"n": 1}, backend=scenario.removeprefix("agraph-"))
    elif scenario == "adapter":
        adapter(db)
    else:  # pragma: no cover - a typo in the test
        raise SystemExit(f"unknown scenario {scenario!r}")
    for span in exporter.get_finished_spans():
        ctx = span.get_span_context()
        assert ctx is not None
        out: dict[str, Any] = {
            "name": span.name,
            "id": ctx.span_id,
            "parent": span.parent.span_id if span.parent is not None else None,
            "trace": ctx.trace_id,
            "kind": span.kind.name,
            "status": span.status.status_code.name,
            "attributes": dict(span.attributes or {}),
        }
        print(json.dumps(out, default=list))


if __name__ == "__main__":
    main()
