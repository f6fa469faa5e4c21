"""Loops and graphs the Dask tests run on worker processes (importable there as ``tests.dask_subjects``).

Every step records the process it ran in (``pids``), so a test can tell which worker ran
what; every step charges a fixed price, so a run's cost says how many steps were paid.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import loomc
from loomc import Budget, loop, predicate
from orchestration import Graph, ItemCounts

__all__ = ["Budget", "ItemCounts", "fan_graph", "item", "long_graph", "long_node", "prepare"]

PRICE = 0.01


def _done(history: Any) -> bool:
    return bool(history) and history[-1].state["i"] >= history[-1].state["steps"]


@loop(budget=Budget(iterations=50), converge_on=predicate(_done), name="dask_subjects:long_node")
def long_node(state: dict[str, Any]) -> dict[str, Any]:
    """One paid step of ``delay`` seconds, ``steps`` of them."""
    loomc.charge(PRICE)
    time.sleep(state["delay"])
    return {**state, "i": state["i"] + 1, "pids": [*state["pids"], os.getpid()]}


@loop(budget=Budget(iterations=3), name="dask_subjects:item")
def item(state: dict[str, Any]) -> dict[str, Any]:
    """Three paid steps of ``delay`` seconds."""
    loomc.charge(PRICE)
    time.sleep(state["delay"])
    return {**state, "i": state["i"] + 1, "pid": os.getpid()}


def prepare(state: dict[str, Any]) -> dict[str, Any]:
    """A plain function: one step."""
    return {**state, "prepared": True}


def long_graph(checkpoint: Any, *, steps: int, delay: float, usd: float = 1.0) -> Graph:
    """prepare -> long_node (``steps`` paid steps of ``delay`` seconds)."""
    graph = Graph("dask-long", budget=Budget(usd=usd), checkpoint=checkpoint)
    graph.add(prepare)
    graph.add(long_node, after=prepare,
              inputs=lambda up, gi: {"i": 0, "steps": steps, "delay": delay, "pids": []})
    return graph


def fan_graph(checkpoint: Any, *, items: int, delay: float, usd: float) -> Graph:
    """prepare -> a map of ``items`` items (three paid steps each)."""
    graph = Graph("dask-fan", budget=Budget(usd=usd), checkpoint=checkpoint)
    graph.add(prepare)
    graph.map("fan", item, after=prepare, over=lambda up, gi: [{"i": 0, "n": n, "delay": delay} for n in range(items)])
    return graph


def drive(address: str, dsn: str, steps: int, delay: float) -> None:
    """A driver process: run ``long_graph`` on the cluster at ``address``, printing the graph run's id first."""
    from orchestration import DaskExecutor, ProgressEvent

    def hook(event: ProgressEvent) -> None:
        if event.node is None:
            print(event.graph_run_id, flush=True)

    graph = long_graph(dsn, steps=steps, delay=delay)
    result = graph.run({}, executor=DaskExecutor(address), on_progress=hook)
    print(result.status.value, flush=True)


if __name__ == "__main__":
    drive(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
