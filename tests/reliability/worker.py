"""A loop driven by the reliability tests: warm start, then runs or resumes a run on command.

Protocol (stdin/stdout, one line each): the worker imports loomc, prints ``ready``, waits
for ``go <db> <run_id> <steps>``, then prints ``s<n>`` when a step starts and ``c<n>``
just before it returns (the engine then encodes and commits), and ``done <json>`` at the end.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from typing import Any

import loomc
from loomc import Budget, loop, predicate


def step_cost(n: int) -> float:
    """A deterministic cost for step ``n`` (cents, so sums are exact in binary-friendly steps)."""
    return (n % 7 + 1) / 100


def payload(n: int) -> str:
    """A deterministic, poorly compressible string; large on every fourth step."""
    size = 300_000 if n % 4 == 0 else 200
    return random.Random(n).randbytes(size // 2).hex()


def document() -> str:
    """A 20 KB text the steps edit a little each (so most large states are stored as deltas)."""
    rng = random.Random(7)
    return " ".join(rng.choice(["plan", "draft", "check", "fix", "score", "tool", "answer"]) for _ in range(3500))


def revise(doc: str, n: int) -> str:
    """Overwrite one word of ``doc``, deterministically."""
    at = random.Random(n).randrange(0, len(doc) - 10)
    return doc[:at] + f"step{n}" + doc[at + 5 :]


def digest(state: dict[str, Any]) -> str:
    """A short fingerprint of a state."""
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]


def make(db: str, target: int, jitter: float, flavor: str = "sync-power") -> Any:
    """The loop under test: ``sync-power`` (a sync loop, the default durability) or
    ``async-process`` (an async loop on the aiosqlite store, ``durability="process"``)."""
    budget = Budget(usd=1000.0, iterations=10 * target)
    converged = predicate(lambda h: h[-1].state["n"] >= target)

    def advance(state: dict[str, Any]) -> dict[str, Any]:
        n = state["n"]
        return {"n": n + 1, "acc": state["acc"] + n * n, "blob": payload(n), "trail": [*state["trail"][-20:], n],
                "doc": revise(state["doc"], n)}

    if flavor == "async-process":

        @loop(checkpoint=db, budget=budget, converge_on=converged, durability="process", name="reliability-subject")
        async def awork(state: dict[str, Any]) -> dict[str, Any]:
            import asyncio

            n = state["n"]
            print(f"s{n}", flush=True)
            loomc.charge(step_cost(n))
            await asyncio.sleep(random.uniform(0, jitter))
            new = advance(state)
            print(f"c{n}", flush=True)
            return new

        return awork

    @loop(checkpoint=db, budget=budget, converge_on=converged, name="reliability-subject")
    def work(state: dict[str, Any]) -> dict[str, Any]:
        n = state["n"]
        print(f"s{n}", flush=True)
        loomc.charge(step_cost(n))
        time.sleep(random.uniform(0, jitter))
        new = advance(state)
        print(f"c{n}", flush=True)
        return new

    return work


def main() -> None:
    """Wait for the go line, then run or resume."""
    print("ready", flush=True)
    line = sys.stdin.readline().split()
    if not line:
        return
    _, db, run_id, target = line[:4]
    jitter = float(line[4]) if len(line) > 4 else 0.004
    flavor = line[5] if len(line) > 5 else "sync-power"
    work = make(db, int(target), jitter, flavor)
    store = work.store()
    start = {"n": 0, "acc": 0, "blob": "", "trail": [], "doc": document()}
    fresh = store.get_run(run_id) is None
    if flavor == "async-process":
        import asyncio

        res = asyncio.run(work.run(start, run_id=run_id) if fresh else work.resume_run(run_id))
    else:
        res = work.run(start, run_id=run_id) if fresh else work.resume_run(run_id)
    print("done " + json.dumps({"status": res.status.value, "steps": res.steps, "cost": res.cost_usd,
                                "digest": digest(res.state)}), flush=True)


if __name__ == "__main__":
    main()
