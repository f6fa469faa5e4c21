"""One conformance suite for every synchronous checkpoint store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loomc import AmbiguousRunId, MemoryStore, RunNotFound, RunStatus, SQLiteStore, StepRecord
from loomc.store.codec import encode
from loomc.store.lease import owner_token
from loomc.store.sqlite.sql import StepRow, now_iso
from loomc.store.sqlite.sync import CheckpointStore, NewRun


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """Each store implementation, fresh."""
    s: Any = SQLiteStore(tmp_path / "conf.db") if request.param == "sqlite" else MemoryStore()
    yield s
    s.close()


def row(n: int, state: Any, cost: float, total: float, status: str = "running", next_from: int | None = None) -> StepRow:
    """A committed step row with its run totals."""
    return StepRow(
        n, encode(state), cost, None, now_iso(), None, None, n if next_from is None else next_from, 0.01,
        total, n + 1, 0.1 * (n + 1), cost, status, None,
    )


def test_is_a_checkpoint_store(store: Any) -> None:
    """Both implementations satisfy the protocol."""
    assert isinstance(store, CheckpointStore)


def test_0_3_0_api(store: Any) -> None:
    """create_run / get_run / update_run_status / save_step / load_steps / list_runs."""
    rid = store.create_run("abc123")
    assert len(rid) == 12
    info = store.get_run(rid)
    assert (info.spec_hash, info.status) == ("abc123", RunStatus.RUNNING)
    store.update_run_status(rid, RunStatus.COMPLETED)
    assert store.get_run(rid).status is RunStatus.COMPLETED
    for i in range(3):
        store.save_step(rid, StepRecord(step_n=i, state={"i": i}, cost_usd=0.01, score=i / 10))
    steps = store.load_steps(rid)
    assert [(s.step_n, s.state, s.score) for s in steps] == [(0, {"i": 0}, 0.0), (1, {"i": 1}, 0.1), (2, {"i": 2}, 0.2)]
    assert store.get_run(rid).cost_usd == pytest.approx(0.03)
    assert store.get_run("nonexistent") is None
    assert [r.id for r in store.list_runs()] == [rid]


def test_commit_step_updates_totals_and_resume_point(store: Any) -> None:
    """A committed step moves the run's totals; the resume point starts from next_from."""
    rid = store.begin_run(NewRun(spec_hash="h", name="m:f", input_blob=encode({"n": 0}), owner=owner_token()))
    store.commit_step(rid, row(0, {"n": 1}, 0.1, 0.1))
    store.commit_step(rid, row(1, {"n": 2}, 0.2, 0.3, next_from=0))
    info = store.get_run(rid)
    assert (info.steps, info.cost_usd, info.max_step_cost) == (2, pytest.approx(0.3), 0.2)
    rp = store.resume_point(rid)
    assert rp.next_from == 0
    assert rp.start_blob == encode({"n": 1})
    # the history holds the last step, or all of them; the rest is read when needed
    assert [h.step_n for h in rp.history] == ([1] if rp.partial else [0, 1])
    earlier = store.step_history(rid, rp.history[0].step_n)
    assert [h.step_n for h in earlier + rp.history] == [0, 1]
    assert rp.history[-1].state == {"n": 2}  # loaded lazily
    assert earlier[0].state == {"n": 1} if rp.partial else earlier == []
    assert store.load_state(rid, -1) == {"n": 0}


def test_prefix_resolution(store: Any) -> None:
    """A unique prefix resolves; an ambiguous one and an unknown one raise."""
    a = store.begin_run(NewRun(spec_hash="h", run_id="aaaa11112222"))
    store.begin_run(NewRun(spec_hash="h", run_id="aaaa33334444"))
    assert store.resolve("aaaa1") == a
    assert store.resolve(a) == a
    with pytest.raises(AmbiguousRunId):
        store.resolve("aaaa")
    with pytest.raises(RunNotFound, match="nearest"):
        store.resolve("aaab")


def test_children_and_find_child(store: Any) -> None:
    """Child runs are found by (parent, parent step, call index) and listed in call order."""
    parent = store.begin_run(NewRun(spec_hash="p"))
    c1 = store.begin_run(NewRun(spec_hash="c", parent_run_id=parent, parent_step=0, call_index=1))
    c0 = store.begin_run(NewRun(spec_hash="c", parent_run_id=parent, parent_step=0, call_index=0))
    assert store.find_child(parent, 0, 1).id == c1
    assert store.find_child(parent, 1, 0) is None
    assert [c.id for c in store.children(parent)] == [c0, c1]
    assert [r.id for r in store.list_runs(roots_only=True)] == [parent]
    assert len(store.list_runs()) == 3


def test_list_runs_filters(store: Any) -> None:
    """Newest first, with status and limit filters."""
    ids = [store.begin_run(NewRun(spec_hash="h")) for _ in range(4)]
    store.finish_run(ids[1], RunStatus.COMPLETED, "converged", 1.0)
    assert [r.id for r in store.list_runs()] == ids[::-1]
    assert [r.id for r in store.list_runs(status="completed")] == [ids[1]]
    assert len(store.list_runs(limit=2)) == 2
    assert store.get_run(ids[1]).stop_reason == "converged"


def test_meta_and_cost(store: Any) -> None:
    """Free-form metadata and out-of-step cost additions persist."""
    rid = store.begin_run(NewRun(spec_hash="h"))
    store.set_meta(rid, {"breakers": {"search": "open"}})
    store.add_cost(rid, 0.5)
    info = store.get_run(rid)
    assert info.meta == {"breakers": {"search": "open"}}
    assert info.cost_usd == 0.5


def test_large_states_live_in_blobs_and_round_trip(tmp_path: Path) -> None:
    """A compressed state goes to the blobs table; small ones stay inline as JSON; both load back."""
    import sqlite3

    store = SQLiteStore(tmp_path / "blobs.db")
    rid = store.begin_run(NewRun(spec_hash="h", input_blob=encode({"doc": ""})))
    big = {"doc": "tide " * 5000}
    store.commit_step(rid, row(0, {"doc": "small"}, 0.1, 0.1))
    store.commit_step(rid, row(1, big, 0.1, 0.2))
    assert store.load_state(rid, 0) == {"doc": "small"}
    assert store.load_state(rid, 1) == big
    assert [s.state for s in store.load_steps(rid)] == [{"doc": "small"}, big]
    with sqlite3.connect(tmp_path / "blobs.db") as c:
        inline, ref = c.execute("SELECT state_blob, blob_id FROM steps WHERE step_n = 0").fetchone()
        assert (inline, ref) == ('{"doc":"small"}', None)
        inline, ref = c.execute("SELECT state_blob, blob_id FROM steps WHERE step_n = 1").fetchone()
        assert inline is None
        (data,) = c.execute("SELECT data FROM blobs WHERE id = ?", (ref,)).fetchone()
        assert data[:1] == b"Z"
        assert len(data) < len("tide " * 5000) / 10
