"""A multi-agent report pipeline: research -> draft -> critique -> final, fact-check beside draft.

Every agent is a loomc loop (or a plain function, run as one checkpointed step), driven
by a deterministic offline fake model that "charges" for its tokens, so the example runs
anywhere, costs nothing and gives the same answer every time.

Run it:        python examples/pipeline.py
          or:  loomc graph run examples/pipeline.py --input '{"topic": "tides"}'
Draw it:       loomc graph show examples/pipeline.py [--mermaid]
Kill it (Ctrl-C or kill -9) mid-run, then pick the whole graph up where it stopped:
               loomc graph run examples/pipeline.py --resume <run_id>
Inspect it:    loomc show <run_id> --tree

The graph's budget ($0.50) caps the sum of every agent's cost; each agent also has its own.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from typing import Any

import loomc
from loomc import BestScore, Budget, judge, loop, predicate, score_plateau
from orchestration import Graph, ProgressEvent

#: Seconds the fake model "thinks" per call (set LOOMC_EXAMPLE_DELAY=0 for instant runs).
DELAY = float(os.environ.get("LOOMC_EXAMPLE_DELAY", "0.15"))
#: The words the fake model knows.
VOCABULARY = (
    "the", "moon", "pulls", "ocean", "water", "toward", "it", "while", "earth", "turns", "beneath",
    "two", "bulges", "so", "most", "coasts", "see", "high", "and", "low", "tide", "twice", "each",
    "day", "with", "spring", "tides", "at", "new", "and", "full", "moon", "and", "neap", "tides",
    "between",
)
#: The fake model's price per token.
PRICE_PER_TOKEN = 0.00002


def fake_model(prompt: str, *, max_tokens: int = 120) -> str:
    """A deterministic stand-in for an LLM call: same prompt, same answer; charges per token."""
    digest = hashlib.sha256(prompt.encode()).hexdigest()
    words = [VOCABULARY[int(digest[i : i + 2], 16) % len(VOCABULARY)] for i in range(0, 16, 2)]
    tokens = len(prompt.split()) + min(max_tokens, 40 + int(digest[:2], 16) % 40)
    loomc.charge(round(tokens * PRICE_PER_TOKEN, 6))  # refused (BudgetExhausted) past any cap
    time.sleep(DELAY)
    return " ".join(words)


# -- the agents --------------------------------------------------------------------


@loop(budget=Budget(usd=0.10, iterations=5), converge_on=predicate(lambda h: len(h[-1].state["notes"]) >= 3))
def research(state: dict[str, Any]) -> dict[str, Any]:
    """Collect one note about the topic per step, until there are three."""
    n = len(state["notes"])
    note = fake_model(f"research note {n + 1} about {state['topic']}")
    return {**state, "notes": [*state["notes"], note]}


@loop(
    budget=Budget(usd=0.15, iterations=6),
    scorer=lambda s: s["score"],
    converge_on=judge(lambda s: s["score"] >= 0.9) | score_plateau(patience=2),
    backtrack=BestScore(),
)
def draft(state: dict[str, Any]) -> dict[str, Any]:
    """Rewrite the draft; each revision scores a little better (the fake model's taste)."""
    revision = state.get("revision", 0) + 1
    text = fake_model(f"draft {revision} on {state['topic']} from {len(state['notes'])} notes")
    return {**state, "revision": revision, "text": text, "score": min(1.0, 0.55 + 0.12 * revision)}


def fact_check(state: dict[str, Any]) -> dict[str, Any]:
    """Check every research note once (a plain function: one checkpointed step)."""
    verdicts = {note: fake_model(f"is this true: {note}", max_tokens=10).split()[0] for note in state["notes"]}
    # the fake model "doubts" a note when its first word is one of these
    return {
        "checked": len(verdicts),
        "flags": sorted(n for n, v in verdicts.items() if v in {"low", "neap", "between"}),
    }


@loop(budget=Budget(usd=0.10, iterations=3), converge_on=predicate(lambda h: h[-1].state["approved"]))
def critique(state: dict[str, Any]) -> dict[str, Any]:
    """Critique the draft until a round approves it."""
    rounds = state.get("rounds", 0) + 1
    comment = fake_model(f"critique round {rounds} of: {state['text']}")
    return {**state, "rounds": rounds, "comments": [*state.get("comments", []), comment], "approved": rounds >= 2}


async def final(state: dict[str, Any]) -> dict[str, Any]:
    """Assemble the report from the critiqued draft and the fact check (async, one step)."""
    summary = fake_model(f"final report: {state['critique']['text']}")
    return {
        "topic": state["critique"]["topic"],
        "report": state["critique"]["text"],
        "summary": summary,
        "review_rounds": state["critique"]["rounds"],
        "facts_checked": state["fact_check"]["checked"],
        "flags": state["fact_check"]["flags"],
    }


# -- the graph ---------------------------------------------------------------------

graph = Graph("report", budget=Budget(usd=0.50, wall_clock="5m"), max_concurrency=4)
graph.add(research, inputs=lambda up, graph_input: {"topic": (graph_input or {}).get("topic", "tides"), "notes": []})
graph.add(draft, after=research)
graph.add(fact_check, after=research)
graph.add(critique, after=draft)
graph.add(final, after=[critique, fact_check])


def main() -> None:
    """Run the pipeline (or resume it) and print what each agent did."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--topic", default="tides")
    parser.add_argument("--resume", metavar="RUN_ID")
    args = parser.parse_args()
    started: list[str] = []

    def announce(event: ProgressEvent) -> None:
        # The graph's first event carries its run id: print it before any node runs.
        if event.node is None and not started:
            started.append(event.graph_run_id)
            print(f"graph run {event.graph_run_id}: {'resuming' if args.resume else 'starting'} "
                  f"(continue with: python examples/pipeline.py --resume {event.graph_run_id})", flush=True)

    try:
        result = (
            graph.resume(args.resume, on_progress=announce)
            if args.resume
            else graph.run({"topic": args.topic}, on_progress=announce)
        )
    except KeyboardInterrupt:
        rid = started[0] if started else "RUN_ID"
        print(f"\ninterrupted: continue with: python examples/pipeline.py --resume {rid}", file=sys.stderr)
        raise SystemExit(130) from None
    for name, node in result.nodes.items():
        print(f"{name:<11} {node.status:<17} steps={node.steps:<2} cost=${node.cost_usd:.4f}")
    print(f"graph run {result.run_id}: {result.status.value}, total ${result.cost_usd:.4f} of $0.50")
    if result.ok:
        print(f"report on {result.outputs['final']['topic']!r}: {result.outputs['final']['summary']}")
    else:
        print(f"resume with: python examples/pipeline.py --resume {result.run_id}")


if __name__ == "__main__":
    main()
