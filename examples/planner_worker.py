"""A planner loop that hands each task to a worker loop: nested runs and cost roll-up, offline.

Run it:      python examples/planner_worker.py            (add --db PATH to choose the database)
Inspect it:  loomc show <run_id> --tree

The planner (async) takes one task per step and runs a worker loop on it. Each worker
step calls a fake, deterministic "model": it reserves the most the call can cost before
the call and settles the real cost after, so the planner's $0.20 cap holds even while
calls are in flight. Every worker run is a child of the planner's step that started it;
its cost rolls up into that step, into the planner's total, at once.
"""

from __future__ import annotations

import argparse
import functools
import os
import secrets
import sys
from typing import Any

import anyio

import loomc
from loomc import Budget, SQLiteStore, loop, predicate

PRICE_PER_TOKEN = 0.00001  # invented: $10 per million tokens
MAX_TOKENS = 400

TASKS = ["outline the report", "draft the introduction", "summarise the findings", "write the conclusion"]


def fake_model(task: str, draft: str) -> tuple[str, int]:
    """A deterministic stand-in for a model call: a longer draft, and the tokens it "used"."""
    addition = f"[{task}: part {draft.count('[') + 1}]"
    return draft + addition, 120 + 10 * len(task) + 5 * draft.count("[")


def quality(draft: str) -> float:
    """The worker's score: three parts make a finished piece."""
    return min(1.0, draft.count("[") / 3)


@loop(
    checkpoint="sqlite",
    budget=Budget(usd=0.05, iterations=6),
    converge_on=predicate(lambda h: h[-1].state["score"] >= 1.0),
    scorer=lambda s: s["score"],
    name="worker",
)
async def worker(state: dict[str, Any]) -> dict[str, Any]:
    """One revision of one task's draft."""
    with loomc.reserve(MAX_TOKENS * PRICE_PER_TOKEN) as hold:  # the most this call can cost
        draft, tokens = fake_model(state["task"], state["draft"])
        await anyio.sleep(0.01)  # the call in flight
        hold.settle(tokens * PRICE_PER_TOKEN)  # what it cost
    return {"task": state["task"], "draft": draft, "score": quality(draft)}


@loop(
    checkpoint="sqlite",
    budget=Budget(usd=0.20, iterations=10),
    converge_on=predicate(lambda h: not h[-1].state["todo"]),
    name="planner",
)
async def planner(state: dict[str, Any]) -> dict[str, Any]:
    """One planning step: run a worker loop on the next task and keep its result."""
    task, *rest = state["todo"]
    result = await worker({"task": task, "draft": "", "score": 0.0})
    view = loomc.current_run()
    assert view is not None
    print(f"  step {view.step}: {task!r} done, planner spent ${view.usd_spent:.4f}, ${view.usd_remaining:.4f} left")
    return {"todo": rest, "done": {**state["done"], task: result["draft"]}}


def show_tree(db: str | None, run_id: str) -> None:
    """Print the planner run and its worker runs with their own and total costs."""
    store = SQLiteStore(db, create=False)
    root = store.get_run(run_id)
    assert root is not None
    print(f"planner {root.id}  {root.status.value}  steps={root.steps}  total=${root.cost_usd:.4f}")
    kids = store.children(run_id)
    for kid in kids:
        print(f"  └─ worker {kid.id} (planner step {kid.parent_step})  {kid.status.value}  "
              f"steps={kid.steps}  cost=${kid.cost_usd:.4f}")
    print(f"sum of workers ${sum(k.cost_usd for k in kids):.4f} == planner total ${root.cost_usd:.4f}")
    store.close()


def main() -> None:
    """Run the planner on the tasks and print the run tree."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="database path (default: $LOOMC_DB or .loomc/checkpoints.db)")
    args = parser.parse_args()
    if args.db:
        os.environ["LOOMC_DB"] = args.db  # checkpoint="sqlite" is resolved when a run starts
    run_id = secrets.token_hex(6)  # chosen up front, so it is on screen before the first step
    print(f"run {run_id}: starting (inspect it any time: loomc show {run_id} --tree)", flush=True)
    try:
        result = anyio.run(functools.partial(planner.run, {"todo": TASKS, "done": {}}, run_id=run_id))
    except KeyboardInterrupt:
        print(f"\ninterrupted: run {run_id} keeps every committed step; resume it with planner.resume({run_id!r})",
              file=sys.stderr)
        raise SystemExit(130) from None
    print(f"run {result.run_id}: {result.status.value}, ${result.cost_usd:.4f} of the $0.20 cap")
    show_tree(args.db, result.run_id)


if __name__ == "__main__":
    main()
