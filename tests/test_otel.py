"""OpenTelemetry: spans nested like the run tree, with loomc's and the GenAI conventions' attributes.

Each scenario runs in its own process (tests/otel_subject.py) with the SDK's in-memory
exporter: a tracer provider is process-global and must not leak into other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUBJECT = Path(__file__).with_name("otel_subject.py")


def _spans(scenario: str, tmp_path: Path) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-W", "error", str(SUBJECT), scenario, str(tmp_path / "t.db")],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def _children(spans: list[dict[str, Any]], parent: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in spans if s["parent"] == parent["id"]]


@pytest.mark.parametrize("scenario", ["graph", "agraph-asyncio", "agraph-trio"])
def test_a_graph_traces_as_its_run_tree(scenario: str, tmp_path: Path) -> None:
    """graph -> node runs -> their steps -> the nested loop's run -> its steps, one trace, with loomc's attributes."""
    spans = _spans(scenario, tmp_path)
    assert len({s["trace"] for s in spans}) == 1
    (root,) = [s for s in spans if s["parent"] is None]
    assert root["name"] == "loomc.graph report"
    assert root["attributes"]["loomc.status"] == "completed"
    assert root["attributes"]["loomc.cost_usd"] == pytest.approx(0.04)
    assert root["attributes"]["loomc.budget.usd_left"] == pytest.approx(0.96)
    nodes = {s["name"]: s for s in _children(spans, root)}
    assert set(nodes) == {"loomc.node plan", "loomc.node review"}
    plan = nodes["loomc.node plan"]
    assert plan["attributes"]["loomc.parent_run_id"] == root["attributes"]["loomc.run_id"]
    assert plan["attributes"]["loomc.steps"] == 2
    assert plan["attributes"]["loomc.status"] == "budget_exhausted"
    assert plan["status"] == "UNSET"  # a budget stop is a normal end, not an error
    plan_steps = sorted(_children(spans, plan), key=lambda s: s["attributes"]["loomc.step"])
    assert [s["name"] for s in plan_steps] == ["loomc.step plan", "loomc.step plan"]
    for step in plan_steps:
        assert step["attributes"]["loomc.cost_usd"] == pytest.approx(0.02)
        (draft,) = _children(spans, step)
        assert draft["name"] == "loomc.loop draft"
        assert draft["attributes"]["loomc.cost_usd"] == pytest.approx(0.02)
        draft_steps = _children(spans, draft)
        assert [s["attributes"]["loomc.step"] for s in draft_steps] == [0, 1]
        assert [s["attributes"]["loomc.score"] for s in draft_steps] == [1.0, 2.0]
    review = nodes["loomc.node review"]
    (review_step,) = _children(spans, review)
    assert review_step["attributes"]["loomc.step"] == 0
    assert review["attributes"]["loomc.budget.iterations_left"] == 0


def test_an_adapter_call_has_genai_attributes(tmp_path: Path) -> None:
    """A wrapped Anthropic call is a CLIENT span under its step, with gen_ai.* usage and its cost."""
    spans = _spans("adapter", tmp_path)
    (call,) = [s for s in spans if s["name"].startswith("chat ")]
    (step,) = [s for s in spans if s["id"] == call["parent"]]
    assert step["name"] == "loomc.step ask"
    a = call["attributes"]
    assert call["kind"] == "CLIENT"
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.system"] == "anthropic"
    assert a["gen_ai.request.model"] == "claude-sonnet-4-6"
    assert a["gen_ai.request.max_tokens"] == 50
    assert a["gen_ai.usage.input_tokens"] == 1000
    assert a["gen_ai.usage.output_tokens"] == 200
    assert a["gen_ai.response.finish_reasons"] == ["end_turn"]
    assert a["loomc.cost_usd"] == pytest.approx(step["attributes"]["loomc.cost_usd"])
    assert a["loomc.cost_usd"] > 0


def test_import_loomc_does_not_import_opentelemetry() -> None:
    """`import loomc` (and a run) leave OpenTelemetry unimported: it costs nothing where it is not used."""
    code = (
        "import sys, loomc\n"
        "f = loomc.loop(budget=loomc.Budget(iterations=2), checkpoint='memory')(lambda s: s)\n"
        "f.run({})\n"
        "assert not any(m.startswith('opentelemetry') for m in sys.modules), sorted(sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
