"""orchestration: multi-agent pipelines where each agent is a loomc loop.

A :class:`Graph` composes ``@loop`` functions into a networkx DAG with one budget over
the whole pipeline, a checkpoint per node and a resume that picks the whole graph up
where it stopped. ``Graph.map`` fans a loop out over a list of items; ``add(..., when=)``
routes. An executor (:class:`DaskExecutor`) runs the nodes and items on a cluster.
"""

from __future__ import annotations

from orchestration._dask import DaskExecutor
from orchestration._executor import Executor, RemoteRunError, Unit, UnitOutcome, run_unit
from orchestration._graph import Graph, GraphResult, NodeInfo, ProgressEvent, ProgressHook
from orchestration._map import ItemCounts

__all__ = [
    "DaskExecutor", "Executor", "Graph", "GraphResult", "ItemCounts", "NodeInfo", "ProgressEvent", "ProgressHook",
    "RemoteRunError", "Unit", "UnitOutcome", "run_unit",
]
