"""The command line on graphs that fan out and route: graph show, graph run progress, show --tree."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PIPELINE = textwrap.dedent(
    """
    import loomc
    from loomc import Budget, loop, predicate
    from orchestration import Graph

    @loop(converge_on=predicate(lambda h: True))
    def research(q):
        if q == 3:
            raise ValueError("no source for question 3")
        loomc.charge(0.01)
        return {"q": q, "answer": q * 2}

    def plan(n):
        return list(range(n))

    def merge(answers):
        return [a for a in answers if a is not None]

    def needs_check(draft):
        return len(draft) > 100

    def fact_check(draft):
        return draft

    def after_check(draft):
        return draft

    def edit(up):
        return up

    graph = Graph("fanout", budget=Budget(usd=1.0))
    graph.add(plan)
    graph.map("research", research, over=lambda up, gi: up, after=plan, max_concurrency=4, on_item_error="skip")
    graph.add(merge, after="research")
    graph.add(fact_check, after=merge, when=needs_check)
    graph.add(after_check, after=fact_check)
    graph.add(edit, after=[merge, fact_check])
    """
)


def _loomc(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loomc", *args], cwd=cwd, env=dict(os.environ), capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def pipeline(tmp_path: Path) -> Path:
    """The fan-out pipeline file."""
    path = tmp_path / "fanout.py"
    path.write_text(PIPELINE)
    return path


def test_graph_show_draws_map_nodes_and_conditional_edges(pipeline: Path) -> None:
    """graph show names the map's item loop and bound; --mermaid draws a stack and dotted when-edges."""
    text = _loomc("graph", "show", str(pipeline), cwd=pipeline.parent)
    assert text.returncode == 0, text.stderr
    assert "research     <- plan    [map over items: fanout:research, max 4 at once, on_item_error=skip]" in text.stdout
    assert "fact_check   <- merge  when needs_check" in text.stdout
    mermaid = _loomc("graph", "show", str(pipeline), "--mermaid", cwd=pipeline.parent)
    assert mermaid.returncode == 0, mermaid.stderr
    assert 'n1[["research (map)"]]' in mermaid.stdout
    assert "n2 -. when .-> n3" in mermaid.stdout
    assert "n0 --> n1" in mermaid.stdout


def test_graph_run_counts_items_and_show_tree_folds_them(pipeline: Path, tmp_path: Path) -> None:
    """graph run reports items as they finish; show --tree folds 30 items to a count, --items lists all."""
    db = str(tmp_path / "cli.db")
    run = _loomc("graph", "run", str(pipeline), "--input", "30", "--db", db, cwd=pipeline.parent)
    assert run.returncode == 0, run.stderr
    assert "research: 30/30 items" in run.stdout
    assert "completed 29/30 items, 1 failed" in run.stdout
    assert "skipped (not routed)" in run.stdout
    run_id = next(line.split()[-1] for line in run.stdout.splitlines() if line.startswith("run id:"))

    tree = _loomc("show", run_id, "--tree", "--db", db, cwd=pipeline.parent)
    assert tree.returncode == 0, tree.stderr
    lines = tree.stdout.splitlines()
    assert any("30 items: 29 completed, 1 failed" in line and "--tree --items" in line for line in lines)
    assert sum(" item " in line for line in lines) == 1  # only the failed item is listed
    assert any(" item 3 " in line and "failed" in line for line in lines)
    assert any("node edit" in line and "completed" in line and "routed" not in line for line in lines)
    assert "node fact_check  skipped  not routed (merge: false)" in tree.stdout
    assert "node after_check  skipped  not routed (no upstream ran)" in tree.stdout

    every = _loomc("show", run_id, "--tree", "--items", "--db", db, cwd=pipeline.parent)
    assert every.returncode == 0, every.stderr
    assert sum(" item " in line for line in every.stdout.splitlines()) == 30

    map_id = next(line.split()[1] for line in lines if "node research" in line)
    node = _loomc("show", map_id, "--db", db, cwd=pipeline.parent)
    assert node.returncode == 0, node.stderr
    assert f"30 items: 29 completed, 1 failed (loomc show {map_id} --items lists every item)" in node.stdout
    assert "nested runs: 1 " in node.stdout  # only the failed item
    every_item = _loomc("show", map_id, "--items", "--db", db, cwd=pipeline.parent)
    assert "nested runs: 30 " in every_item.stdout

    table = _loomc("show", run_id, "--db", db, cwd=pipeline.parent)
    assert table.returncode == 0, table.stderr
    assert any(line.startswith("fact_check") and "skipped (not routed)" in line for line in table.stdout.splitlines())
