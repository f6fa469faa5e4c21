"""Graph scheduling overhead: 500 trivial nodes, wide and deep.

Each node is a plain function (one checkpointed step), so what is measured is what the
graph layer adds per node: creating the node's child run, scheduling it, committing its
one step, finishing it and wiring its output downstream. The floor is the same work done
by hand with the engine alone: 500 one-step loops run one after another, as children of
one parent step (each a child run with one committed step). Medians of several runs::

    python benchmarks/bench_graph.py            # 500 nodes, 3 repetitions
    python benchmarks/bench_graph.py --nodes 200 --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from loomc import Budget, loop, predicate
from orchestration import Graph


def identity(state: Any) -> Any:
    """A trivial node."""
    return state


def wide(n: int, db: str) -> Graph:
    """n independent nodes feeding one sink."""
    g = Graph(f"wide-{n}", checkpoint=db, budget=Budget(usd=1.0))
    names = []
    for i in range(n - 1):
        fn = _named(f"w{i}")
        g.add(fn)
        names.append(fn.__name__)
    g.add(_named("sink"), after=names, inputs=lambda up, gi: len(up))
    return g


def deep(n: int, db: str) -> Graph:
    """A chain of n nodes."""
    g = Graph(f"deep-{n}", checkpoint=db, budget=Budget(usd=1.0))
    prev = None
    for i in range(n):
        fn = _named(f"d{i}")
        g.add(fn, after=prev)
        prev = fn.__name__
    return g


def _named(name: str) -> Any:
    def node(state: Any) -> Any:
        return state

    node.__name__ = node.__qualname__ = name
    return node


def floor(n: int, db: str) -> float:
    """n one-step child loops run by hand inside one parent step."""
    child = loop(checkpoint=db, converge_on=predicate(lambda h: True), name="child")(identity)

    @loop(checkpoint=db, budget=Budget(iterations=1), name="parent")
    def parent(state: Any) -> Any:
        for _ in range(n):
            child(state)
        return state

    t = time.perf_counter()
    parent.run({"x": 1})
    return time.perf_counter() - t


def timed(build: Any, n: int, db: str) -> float:
    """Seconds for one graph run."""
    g = build(n, db)
    t = time.perf_counter()
    result = g.run({"x": 1})
    elapsed = time.perf_counter() - t
    assert result.status.value == "completed", result.status
    return elapsed


def main() -> None:
    """Print per-node overhead for wide and deep graphs against the hand-run floor."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=500)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    n = args.nodes
    with tempfile.TemporaryDirectory(prefix="loomc-graph-bench-") as d:
        results: dict[str, list[float]] = {"floor": [], "wide": [], "deep": []}
        for r in range(args.reps):
            results["floor"].append(floor(n, str(Path(d) / f"floor{r}.db")))
            results["wide"].append(timed(wide, n, str(Path(d) / f"wide{r}.db")))
            results["deep"].append(timed(deep, n, str(Path(d) / f"deep{r}.db")))
    base = statistics.median(results["floor"]) / n
    print(f"graph of {n} trivial nodes, median of {args.reps} (durability='power': one fsync per node step)")
    print(f"  floor: {n} one-step child loops by hand   {base * 1e3:7.2f} ms/node")
    for kind in ("wide", "deep"):
        per = statistics.median(results[kind]) / n
        print(f"  {kind:5s} graph                             {per * 1e3:7.2f} ms/node  "
              f"({per / base:.2f}x the floor, +{(per - base) * 1e3:.2f} ms scheduling per node)")


if __name__ == "__main__":
    main()
