"""A research fan-out: plan -> a researcher loop per sub-question -> merge -> fact-check or straight to the editor.

A planner splits a topic into sub-questions; ``graph.map`` runs one researcher loop per
sub-question, in parallel, under the graph's one budget; the merged draft is routed to a
fact-checker only when it leans on shaky answers, else straight to the editor. Every agent
is a loomc loop driven by a deterministic offline fake model that "charges" for its
tokens, so the example runs anywhere, costs nothing and gives the same answer every time.

Run it:        python examples/research_fanout.py [--topic tides] [--questions 6]
          or:  loomc graph run examples/research_fanout.py --input '{"topic": "tides", "questions": 6}'
Draw it:       loomc graph show examples/research_fanout.py [--mermaid]
Kill it (Ctrl-C or kill -9) mid-map, then resume: finished researchers are not run again:
               python examples/research_fanout.py --resume <run_id>
Inspect it:    loomc show <run_id> --tree [--items]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from typing import Any

import loomc
from loomc import Budget, loop, predicate
from orchestration import Graph, ProgressEvent

#: Seconds the fake model "thinks" per call (set LOOMC_EXAMPLE_DELAY=0 for instant runs).
DELAY = float(os.environ.get("LOOMC_EXAMPLE_DELAY", "0.05"))
#: The fake model's price per token.
PRICE_PER_TOKEN = 0.00002
ANGLES = ("cause", "history", "measurement", "prediction", "effects", "open problems", "myths", "numbers")
WORDS = ("moon", "sun", "gravity", "ocean", "basin", "coast", "period", "bulge", "resonance", "friction")


def fake_model(prompt: str, *, max_tokens: int = 60) -> str:
    """A deterministic stand-in for an LLM call: same prompt, same answer; charges per token."""
    digest = hashlib.sha256(prompt.encode()).hexdigest()
    words = [WORDS[int(digest[i : i + 2], 16) % len(WORDS)] for i in range(0, 12, 2)]
    tokens = len(prompt.split()) + min(max_tokens, 20 + int(digest[:2], 16) % 40)
    loomc.charge(round(tokens * PRICE_PER_TOKEN, 6))  # refused (BudgetExhausted) past any cap
    time.sleep(DELAY)
    return " ".join(words)


# -- the agents --------------------------------------------------------------------


def plan(request: dict[str, Any] | None) -> dict[str, Any]:
    """Split the topic into sub-questions (a plain function: one checkpointed step)."""
    request = request or {}  # `loomc graph run` without --input gives the graph no input
    topic, n = request.get("topic", "tides"), int(request.get("questions", 6))
    fake_model(f"split {topic} into {n} questions", max_tokens=20)
    return {"topic": topic, "questions": [f"{topic}: {ANGLES[i % len(ANGLES)]}" for i in range(n)]}


@loop(budget=Budget(usd=0.02, iterations=4), converge_on=predicate(lambda h: h[-1].state["confidence"] >= 0.8))
def researcher(state: dict[str, Any]) -> dict[str, Any]:
    """Answer one sub-question, one source per step, until confident."""
    sources = state.get("sources", 0) + 1
    answer = fake_model(f"source {sources} on {state['question']}")
    # the fake model is less sure about some angles: they need more sources
    step_gain = 0.2 if "open problems" in state["question"] or "myths" in state["question"] else 0.35
    return {**state, "sources": sources, "answer": answer, "confidence": round(min(1.0, 0.2 + step_gain * sources), 2)}


def merge(answers: list[dict[str, Any] | None]) -> dict[str, Any]:
    """One draft from every researcher's answer (a failed item would be None)."""
    found = [a for a in answers if a is not None]
    shaky = [a["question"] for a in found if a["sources"] >= 3]
    return {"draft": " / ".join(a["answer"] for a in found), "answers": len(found), "shaky": shaky}


def needs_check(draft: dict[str, Any]) -> bool:
    """Route to the fact-checker when some answer needed many sources."""
    return bool(draft["shaky"])


def looks_solid(draft: dict[str, Any]) -> bool:
    """Route straight to the editor otherwise."""
    return not draft["shaky"]


@loop(budget=Budget(usd=0.03, iterations=3), converge_on=predicate(lambda h: not h[-1].state["shaky"]))
def fact_check(draft: dict[str, Any]) -> dict[str, Any]:
    """Check one shaky answer per step."""
    question, *rest = draft["shaky"]
    fake_model(f"check {question}", max_tokens=20)
    return {**draft, "shaky": rest, "checked": [*draft.get("checked", []), question]}


async def editor(upstream: dict[str, Any]) -> dict[str, Any]:
    """Polish the draft, checked or not (async, one step)."""
    draft = upstream.get("fact_check") or upstream["merge"]
    summary = fake_model(f"edit: {draft['draft']}", max_tokens=30)
    return {"answers": draft["answers"], "checked": draft.get("checked", []), "summary": summary}


# -- the graph ---------------------------------------------------------------------

graph = Graph("research", budget=Budget(usd=0.25, wall_clock="5m"))
graph.add(plan)
graph.map(
    "research", researcher, after=plan, max_concurrency=4,
    over=lambda planned, request: [{"question": q} for q in planned["questions"]],
)
graph.add(merge, after="research")
graph.add(fact_check, after=merge, when=needs_check)
graph.add(editor, after=[merge, fact_check], inputs=lambda up, request: up, when=looks_solid)


def main() -> None:
    """Run the fan-out (or resume it) and print what each agent did."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--topic", default="tides")
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--resume", metavar="RUN_ID")
    args = parser.parse_args()
    started: list[str] = []

    def announce(event: ProgressEvent) -> None:
        if event.node is None and not started:
            started.append(event.graph_run_id)
            print(f"graph run {event.graph_run_id}: {'resuming' if args.resume else 'starting'} "
                  f"(continue with: python examples/research_fanout.py --resume {event.graph_run_id})", flush=True)
        elif event.status == "items":
            print(f"  research: {event.items_done}/{event.items_total} sub-questions answered", flush=True)

    request = {"topic": args.topic, "questions": args.questions}
    try:
        result = graph.resume(args.resume, on_progress=announce) if args.resume else graph.run(request, on_progress=announce)
    except KeyboardInterrupt:
        rid = started[0] if started else "RUN_ID"
        print(f"\ninterrupted: continue with: python examples/research_fanout.py --resume {rid}", file=sys.stderr)
        raise SystemExit(130) from None
    for name, node in result.nodes.items():
        extra = f" {node.items}" if node.items else (" (not routed)" if node.routed_out else "")
        print(f"{name:<10} {node.status:<17} steps={node.steps:<2} cost=${node.cost_usd:.4f}{extra}")
    print(f"graph run {result.run_id}: {result.status.value}, total ${result.cost_usd:.4f} of $0.25")
    if result.ok:
        final = result.outputs["editor"]
        print(f"{final['answers']} answers, fact-checked: {final['checked'] or 'none'}; summary: {final['summary']}")
    else:
        print(f"resume with: python examples/research_fanout.py --resume {result.run_id}")


if __name__ == "__main__":
    main()
