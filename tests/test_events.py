"""Step events are records: produced as dicts, stored as JSON, migrated from v3 text, rendered by the CLI."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import loomc
import loomc.store.sqlite.sql
import loomc.store.sqlite.sync
from loomc import Budget, loop
from loomc._core import events as ev
from loomc._core.engine import RunRequest, StoreCall, run_protocol
from loomc._core.holds import HoldStore
from loomc._core.retry import Retry
from loomc.backtrack import BestScore
from loomc.circuit_breaker import CircuitBreaker
from loomc.convergence import score_plateau
from loomc.store.sqlite.sql import SCHEMA_VERSION
from loomc.store.sqlite.sync import CheckpointStore, SQLiteStore

FAST = Retry(attempts=3, initial=0.01, max_delay=0.01, jitter=0, on=ConnectionError)


def stored_events(db: Path, run_id: str) -> list[str | None]:
    """The raw ``steps.event`` column of a run, in step order."""
    with sqlite3.connect(db) as c:
        return [r[0] for r in c.execute("SELECT event FROM steps WHERE run_id = ? ORDER BY step_n", (run_id,))]


def close_stores() -> None:
    for s in list(loomc.store.sqlite.sync._stores.values()):
        s.close()


def scores_loop(db: Path, converge: bool = True) -> Any:
    scores = iter([0.2, 0.5, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5])

    @loop(checkpoint=str(db), budget=Budget(iterations=7), scorer=lambda s: s["score"], backtrack=BestScore(),
          converge_on=score_plateau(patience=3) if converge else None, name="scores")
    def step(state: dict[str, Any]) -> dict[str, Any]:
        return {"n": state["n"] + 1, "score": next(scores)}

    return step


def test_policy_events_are_records_stored_as_json(tmp_path: Path) -> None:
    """A backtrack and a convergence are records on the step and a JSON list in ``steps.event``."""
    db = tmp_path / "e.db"
    result = scores_loop(db).run({"n": 0, "score": 0.0})
    back = next(h for h in result.history if h.events and h.events[0]["kind"] == "backtrack")
    assert back.events == [{"kind": "backtrack", "to": 1}]
    assert back.event == "backtrack to step 1"  # the 0.3.0 text, rendered from the record
    assert result.history[-1].events[-1] == {"kind": "converged"}
    raw = stored_events(db, result.run_id)
    assert raw[back.step_n] is not None
    assert json.loads(raw[back.step_n]) == [{"kind": "backtrack", "to": 1}]
    assert json.loads(raw[-1])[-1] == {"kind": "converged"}
    assert raw[0] is None  # a step with no events stores none
    # read back from the store: the same records
    again = SQLiteStore(db).load_steps(result.run_id)
    assert [h.events for h in again] == [h.events for h in result.history]


def test_retry_and_breaker_events_are_records(tmp_path: Path) -> None:
    """Retries and breaker transitions carry their numbers as fields, not text to be parsed."""
    db = tmp_path / "r.db"
    calls = {"n": 0}

    @loop(checkpoint=str(db), budget=Budget(iterations=1), retry=FAST)
    def flaky(state: dict[str, Any]) -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("reset; try again")
        return state

    result = flaky.run({})
    (retry,) = result.history[0].events
    assert retry == {"kind": "retry", "attempt": 1, "delay_s": pytest.approx(0.01),
                     "error": "ConnectionError: reset; try again"}
    assert json.loads(stored_events(db, result.run_id)[0] or "[]") == [retry]

    def down() -> None:
        raise ValueError("down")

    tool = CircuitBreaker(down, name="tool", fail_threshold=1, cooldown=60)

    @loop(checkpoint=str(db), budget=Budget(iterations=1))
    def uses_tool(state: dict[str, Any]) -> dict[str, Any]:
        try:
            tool()
        except ValueError:
            pass
        return state

    res = uses_tool.run({})
    assert res.history[0].events == [
        {"kind": "breaker", "name": "tool", "from": "closed", "to": "open", "failures": 1, "cooldown_s": 60.0}
    ]
    assert res.history[0].event == "breaker tool: closed -> open (1 failures, cooldown 60s)"


def test_budget_stop_in_a_step_is_an_event(tmp_path: Path) -> None:
    """A charge refused by the run's cap stops the run at that step; the step says which limit."""
    @loop(checkpoint=str(tmp_path / "b.db"), budget=Budget(usd=0.5, iterations=5))
    def spend(state: int) -> int:
        if state == 0:
            loomc.charge(0.1)
        else:
            loomc.charge(0.3)
            loomc.charge(0.3)  # past the cap: refused inside the step
        return state + 1

    result = spend.run(0)
    assert result.status is loomc.RunStatus.BUDGET_EXHAUSTED
    assert len(result.history) == 2
    (stop,) = result.history[-1].events
    assert (stop["kind"], stop["limit"], stop["cap"], stop["owner"]) == ("budget", "usd", 0.5, None)
    assert result.history[-1].event == "budget: usd"


def test_held_charge_at_resume_is_an_event(tmp_path: Path) -> None:
    """Holds an earlier attempt left are charged at the resume, and the first step says so."""
    db = tmp_path / "h.db"

    @loop(checkpoint=str(db), budget=Budget(usd=5.0, iterations=2), name="held")
    def step(state: int) -> int:
        return state + 1

    first = step.run(0)
    store = SQLiteStore(db)
    assert isinstance(store, HoldStore)
    store.put_hold(first.run_id, 7, 0.4)  # a call in flight when the process died
    resumed = step.resume_run(first.run_id, budget=Budget(iterations=3))
    assert resumed.history[-1].events == [{"kind": "held_charge", "usd": pytest.approx(0.4)}]
    assert resumed.cost_usd == pytest.approx(0.4)


def _v3_database(tmp_path: Path) -> tuple[Path, str]:
    """A database as loomc wrote it at schema v3: events as "; "-joined text."""
    db = tmp_path / "v3.db"
    run_id = scores_loop(db, converge=False).run({"n": 0, "score": 0.0}).run_id
    close_stores()
    legacy = [
        None,
        "retry 1 in 0.50s after RateLimitError: slow; down",
        "backtrack to step 1",
        "breaker flaky: closed -> open (2 failures, cooldown 60s); backtrack to input",
        "retry skipped after ConnectionError: x: the budget has $0.1000 left, an attempt costs about $0.2500",
        "OPEN",
        "backtrack to step 1; converged",
    ]
    with sqlite3.connect(db) as c:
        for n, text in enumerate(legacy):
            c.execute("UPDATE steps SET event = ? WHERE run_id = ? AND step_n = ?", (text, run_id, n))
        c.execute("PRAGMA user_version=3")
    return db, run_id


def test_a_v3_database_migrates_its_events_to_records(tmp_path: Path) -> None:
    """Opening a v3 file for writing parses each old event line into records (unknown text: a note)."""
    db, run_id = _v3_database(tmp_path)
    store = SQLiteStore(db)
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    raw = stored_events(db, run_id)
    assert raw[0] is None
    assert json.loads(raw[1] or "") == [
        {"kind": "retry", "attempt": 1, "delay_s": 0.5, "error": "RateLimitError: slow; down"}
    ]
    assert json.loads(raw[3] or "") == [
        {"kind": "breaker", "name": "flaky", "from": "closed", "to": "open", "failures": 2, "cooldown_s": 60.0},
        {"kind": "backtrack", "to": -1},
    ]
    assert json.loads(raw[4] or "")[0]["reason"] == "budget"
    assert json.loads(raw[5] or "") == [{"kind": "note", "text": "OPEN"}]
    assert json.loads(raw[6] or "") == [{"kind": "backtrack", "to": 1}, {"kind": "converged"}]
    steps = store.load_steps(run_id)
    # the 0.3.0 text reads as it was written
    assert [s.event for s in steps][1:5] == [
        "retry 1 in 0.50s after RateLimitError: slow; down",
        "backtrack to step 1",
        "breaker flaky: closed -> open (2 failures, cooldown 60s); backtrack to input",
        "retry skipped after ConnectionError: x: the budget has $0.1000 left, an attempt costs about $0.2500",
    ]


def test_a_v3_reader_refuses_a_v4_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loomc that reads up to v3 refuses a v4 file with SchemaTooNew and leaves it untouched."""
    db = tmp_path / "v4.db"
    SQLiteStore(db).list_runs()
    close_stores()
    before = db.read_bytes()
    monkeypatch.setattr(loomc.store.sqlite.sql, "SCHEMA_VERSION", 3)
    with pytest.raises(loomc.SchemaTooNew, match=f"schema v{SCHEMA_VERSION}"):
        SQLiteStore(db).list_runs()
    assert db.read_bytes() == before


def _loomc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loomc", *args], capture_output=True, text=True, timeout=60)


def test_cli_renders_from_records(tmp_path: Path) -> None:
    """``show`` markers, ``show --json`` and ``export`` carry the records (and their text)."""
    db = tmp_path / "c.db"
    result = scores_loop(db).run({"n": 0, "score": 0.0})
    close_stores()
    shown = _loomc("show", result.run_id, "--db", str(db))
    assert shown.returncode == 0, shown.stderr
    assert "<- backtrack to step 1" in shown.stdout
    assert "<- converged" in shown.stdout
    data = json.loads(_loomc("show", result.run_id, "--db", str(db), "--json").stdout)
    last = data["history"][-1]
    assert last["event_records"][-1] == {"kind": "converged"}
    assert last["events"][-1] == "converged"
    exported = json.loads(_loomc("export", result.run_id, "--db", str(db)).stdout)
    assert exported["run"]["history"][-1]["event_records"] == last["event_records"]


def test_a_reader_shows_an_unmigrated_v3_file_from_parsed_records(tmp_path: Path) -> None:
    """The CLI never migrates: an old file's event lines are parsed when shown."""
    db, run_id = _v3_database(tmp_path)
    data = json.loads(_loomc("show", run_id, "--db", str(db), "--json").stdout)
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == 3  # still v3
    assert data["history"][5]["event_records"] == [{"kind": "note", "text": "OPEN"}]
    assert data["history"][1]["events"] == ["retry 1 in 0.50s after RateLimitError: slow; down"]


def test_parse_text_round_trips_every_kind() -> None:
    """Each kind's text parses back to the record (what the migration relies on)."""
    records: list[ev.Event] = [
        ev.backtrack(3), ev.backtrack(-1), {"kind": "converged"},
        {"kind": "retry", "attempt": 2, "delay_s": 1.25, "error": "E: a; b"},
        {"kind": "retry_skipped", "reason": "wall_clock", "error": "E: x", "delay_s": 3.5},
        ev.breaker("b", "open", "half_open"), ev.breaker("b", "closed", "open", 3, 2.5),
        {"kind": "budget", "limit": "usd", "used": None, "cap": None, "owner": "abc"},
    ]
    line = "; ".join(ev.text(r) for r in records)
    assert ev.parse_text(line) == records
    assert ev.decode(ev.encode(records)) == records
    assert ev.parse_text("something else") == [{"kind": "note", "text": "something else"}]


# -- the engine's store requests are typed calls of protocol methods ------------------------------

PROTOCOL_METHODS = {
    name for proto in (CheckpointStore, HoldStore) for name in vars(proto) if not name.startswith("_")
} | {"step_history"}


def _drive_recording(gen: Any, fn: Any, calls: list[StoreCall]) -> Any:
    """A minimal sync driver that records every store request."""
    send: Any = None
    while True:
        try:
            op = gen.send(send)
        except StopIteration as stop:
            return stop.value
        if isinstance(op, StoreCall):
            calls.append(op)
            send = op.fn(*op.args)
        else:
            send = fn(op.state)


def test_store_requests_are_bound_protocol_methods(tmp_path: Path) -> None:
    """Every store request the protocol yields is a method of the store protocols, bound to the run's store."""
    db = tmp_path / "p.db"
    step = scores_loop(db)
    store = step.store()
    calls: list[StoreCall] = []

    def fn(state: Any) -> Any:
        return step._fn(state)

    result = _drive_recording(run_protocol(step.spec, RunRequest(state={"n": 0, "score": 0.0}), None, store), fn, calls)
    assert result.status is loomc.RunStatus.COMPLETED
    assert calls
    for call in calls:
        assert call.fn.__self__ is store  # type: ignore[attr-defined]
        assert call.fn.__name__ in PROTOCOL_METHODS
    assert {c.fn.__name__ for c in calls} >= {"begin_run", "commit_step"}
    assert [c.shield for c in calls if c.fn.__name__ == "commit_step"][-1] is True  # the run's last commit


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_events_are_records(tmp_path: Path, backend: str) -> None:
    """The async driver records the same events (it awaits the same typed requests)."""
    db = tmp_path / f"a-{backend}.db"
    calls = {"n": 0}

    @loop(checkpoint=str(db), budget=Budget(iterations=2), retry=FAST)
    async def step(state: int) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("reset")
        return state + 1

    async def main() -> Any:
        return await step.run(0)

    result = anyio.run(main, backend=backend)
    assert result.history[0].events[0]["kind"] == "retry"
    assert json.loads(stored_events(db, result.run_id)[0] or "[]")[0]["attempt"] == 1


def test_decoding_the_same_stored_events_gives_independent_records() -> None:
    """Stored forms decoded before come back equal, as new lists and dicts: changing one changes no other."""
    stored = ev.encode([ev.backtrack(2), {"kind": "converged"}])
    first, second = ev.decode(stored), ev.decode(stored)
    assert first == second == [{"kind": "backtrack", "to": 2}, {"kind": "converged"}]
    first[0]["to"] = 7
    first.append({"kind": "stalled", "after": 3})
    assert ev.decode(stored) == second == [{"kind": "backtrack", "to": 2}, {"kind": "converged"}]
    # a record holding a list is decoded afresh each time: nothing inside it is shared either
    nested = ev.encode([{"kind": "note", "text": "x", "tags": ["a"]}])
    one = ev.decode(nested)
    one[0]["tags"].append("b")
    assert ev.decode(nested) == [{"kind": "note", "text": "x", "tags": ["a"]}]
    # the old one-line form still decodes, repeatedly
    assert ev.decode("backtrack to step 1; converged") == ev.decode("backtrack to step 1; converged") == [
        {"kind": "backtrack", "to": 1}, {"kind": "converged"},
    ]
