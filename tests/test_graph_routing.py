"""Graph routing: ``add(fn, after=..., when=...)``, not routed is not a failure, decisions recorded for resume."""

from __future__ import annotations

from typing import Any

import pytest

from loomc import RunStatus, SQLiteStore
from orchestration import Graph


def classify(s: dict[str, Any]) -> dict[str, Any]:
    return {"kind": s["kind"], "text": s["text"]}


def billing(s: dict[str, Any]) -> str:
    return f"billing: {s['text']}"


def tech(s: dict[str, Any]) -> str:
    return f"tech: {s['text']}"


def reply(s: dict[str, Any]) -> dict[str, Any]:
    return s


def _ticket_graph(db: str) -> Graph:
    g = Graph("tickets", checkpoint=db)
    g.add(classify)
    g.add(billing, after=classify, when=lambda s: s["kind"] == "billing")
    g.add(tech, after=classify, when=lambda s: s["kind"] == "tech")
    g.add(reply, after=[billing, tech])  # a join after the conditional split
    return g


@pytest.mark.parametrize(("kind", "taken", "left"), [("billing", "billing", "tech"), ("tech", "tech", "billing")])
def test_each_branch_runs_alone_and_the_join_gets_what_ran(db: str, kind: str, taken: str, left: str) -> None:
    """Only the routed branch runs; the other is skipped as not routed; the join runs; the graph completes."""
    result = _ticket_graph(db).run({"kind": kind, "text": "hi"})
    assert result.status is RunStatus.COMPLETED, result.stop_reason
    assert result.nodes[taken].status is RunStatus.COMPLETED
    assert result.nodes[left].status == "skipped"
    assert result.nodes[left].stop_reason == "not routed"
    assert result.nodes[left].routed_out
    assert result.nodes[left].run_id is None  # never started
    assert result.outputs["reply"] == {taken: f"{taken}: hi"}


def test_decisions_are_recorded_in_the_graph_run(db: str) -> None:
    """Each routed node's answers, per upstream, are stored in the graph run's meta."""
    result = _ticket_graph(db).run({"kind": "tech", "text": "x"})
    info = SQLiteStore(db).get_run(result.run_id)
    assert info is not None
    meta = info.meta
    assert meta["routes"] == {"billing": {"classify": False}, "tech": {"classify": True}}
    assert {n["name"]: n.get("when", False) for n in meta["nodes"]} == {
        "classify": False, "billing": True, "tech": True, "reply": False,
    }


def test_a_node_after_only_unrouted_nodes_is_not_routed_either(db: str) -> None:
    """Not routed propagates down a branch, and the graph still completes."""

    def first(s: int) -> int:
        return s

    def gated(s: int) -> int:
        return s + 1

    def below(s: int) -> int:
        return s + 2

    g = Graph("chain", checkpoint=db)
    g.add(first)
    g.add(gated, after=first, when=lambda s: s > 10)
    g.add(below, after=gated)
    result = g.run(1)
    assert result.status is RunStatus.COMPLETED
    assert result.nodes["gated"].routed_out
    assert result.nodes["below"].routed_out
    assert set(result.outputs) == {"first"}


def test_a_recorded_decision_is_reused_on_resume(db: str) -> None:
    """A resumed graph takes the branch it took, even if when would now answer otherwise (and is not asked)."""
    asked: list[Any] = []
    flags = {"prefer": "a", "fail_a": True}

    def start(s: int) -> int:
        return s

    def a(s: int) -> str:
        if flags["fail_a"]:
            raise RuntimeError("a is down")
        return "a"

    def b(s: int) -> str:
        return "b"

    def pick_a(s: int) -> bool:
        asked.append(("a", s))
        return flags["prefer"] == "a"

    def pick_b(s: int) -> bool:
        asked.append(("b", s))
        return flags["prefer"] == "b"

    g = Graph("sticky", checkpoint=db)
    g.add(start)
    g.add(a, after=start, when=pick_a)
    g.add(b, after=start, when=pick_b)
    first = g.run(7)
    assert first.status is RunStatus.FAILED
    assert first.nodes["b"].routed_out
    assert sorted(asked) == [("a", 7), ("b", 7)]

    flags.update(prefer="b", fail_a=False)  # when would now choose b
    again = g.resume(first.run_id)
    assert again.status is RunStatus.COMPLETED, again.stop_reason
    assert again.outputs["a"] == "a"
    assert again.nodes["b"].routed_out
    assert len(asked) == 2  # not asked again


def test_a_when_that_raises_fails_the_node_clearly(db: str) -> None:
    """A when that raises fails its node (the error, with a note naming it); its branch stops; graph failed."""

    def start(s: int) -> int:
        return s

    def gated(s: int) -> int:
        return s

    def after_gated(s: int) -> int:
        return s

    def broken(s: int) -> bool:
        raise KeyError("score")

    g = Graph("raises", checkpoint=db)
    g.add(start)
    g.add(gated, after=start, when=broken)
    g.add(after_gated, after=gated)
    result = g.run(1)
    assert result.status is RunStatus.FAILED
    info = result.nodes["gated"]
    assert info.status is RunStatus.FAILED
    assert isinstance(info.error, KeyError)
    assert info.stop_reason == "when: KeyError: 'score'"
    assert any("when= of node 'gated'" in n for n in info.error.__notes__)
    assert result.nodes["after_gated"].status == "skipped"
    assert not result.nodes["after_gated"].routed_out
    assert result.stop_reason == "failed: node 'gated' (when: KeyError: 'score')"


def test_when_on_a_root_node_or_not_callable_is_refused_at_add() -> None:
    """when= needs an upstream, and a callable: refused when the node is added."""

    def start(s: int) -> int:
        return s

    def other(s: int) -> int:
        return s

    g = Graph("bad", checkpoint="memory")
    with pytest.raises(ValueError, match=r"node 'start' has when= but no upstream; .* give after="):
        g.add(start, when=lambda s: True)
    g.add(start)
    with pytest.raises(TypeError, match="when=True must be a callable"):
        g.add(other, after=start, when=True)  # type: ignore[arg-type]
    assert g.nodes == ["start"]


def test_a_map_node_can_be_routed(db: str) -> None:
    """A map node takes when= like any node: not routed, its items never start."""
    from loomc import loop, predicate

    @loop(converge_on=predicate(lambda h: True))
    def item(s: int) -> int:
        raise AssertionError("not routed: must not run")

    def start(s: int) -> list[int]:
        return [1, 2]

    g = Graph("routed-map", checkpoint=db)
    g.add(start)
    g.map("m", item, over=lambda up, gi: up, after=start, when=lambda s: len(s) > 5)
    result = g.run(None)
    assert result.status is RunStatus.COMPLETED
    assert result.nodes["m"].routed_out
