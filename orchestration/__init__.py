"""orchestration: multi-agent pipelines where each agent is a loomc loop.

A :class:`Graph` composes ``@loop`` functions into a networkx DAG with one budget over
the whole pipeline, a checkpoint per node and a resume that picks the whole graph up
where it stopped.
"""

from __future__ import annotations

from orchestration._graph import Graph, GraphResult, NodeInfo, ProgressEvent, ProgressHook

__all__ = ["Graph", "GraphResult", "NodeInfo", "ProgressEvent", "ProgressHook"]
