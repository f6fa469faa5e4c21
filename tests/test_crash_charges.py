"""A reservation is committed before its call is sent: a process killed mid-call still pays for it.

Real processes are SIGKILLed while a call is in flight (after ``reserve`` returned, before the
step commits), then resumed in fresh processes under a cap. Whatever was reserved for a call
that may have been billed is charged in full at the resume, so however many crashes, the
recorded spend counts every call that went out and the cap is never crossed.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import loomc
from loomc import Budget, MemoryStore, RunStatus, SQLiteStore, loop
from loomc._core.holds import HoldStore
from loomc.adapters import AnthropicAdapter
from loomc.store.sqlite.sql import SCHEMA_VERSION
from loomc.testing import FakeAPI, serve

RUN_ID = "inflightrun1"

# One step = one call that holds $0.40 while it is in flight; IN_FLIGHT makes the call hang
# (the test kills the process there). ``go`` prints ``sent`` once the call is out, ``done
# {json}`` when the run returns.
SUBJECT = textwrap.dedent(
    """
    import json, os, sys, time
    import anyio
    import loomc
    from loomc import Budget, loop

    db, flavor, resume = sys.argv[1], sys.argv[2], len(sys.argv) > 3
    HANG = float(os.environ.get("IN_FLIGHT", "0"))

    def call_sent():
        print("sent", flush=True)  # the request is out: the provider bills it
        time.sleep(HANG)

    @loop(checkpoint=db, budget=Budget(usd=1.00, iterations=20), name="in-flight")
    def sync_step(state):
        with loomc.reserve(0.40) as hold:
            call_sent()
            hold.settle(0.40)
        return {"n": state["n"] + 1}

    @loop(checkpoint=db, budget=Budget(usd=1.00, iterations=20), name="in-flight")
    async def async_step(state):
        hold = await loomc.areserve(0.40)
        print("sent", flush=True)
        await anyio.sleep(HANG)
        hold.settle(0.40)
        return {"n": state["n"] + 1}

    @loop(checkpoint=db, budget=Budget(usd=5.00, iterations=1), name="child")
    def child(state):
        with loomc.reserve(0.40) as hold:
            call_sent()
            hold.settle(0.30)
        return state

    @loop(checkpoint=db, budget=Budget(usd=1.00, iterations=1), name="in-flight")
    def parent(state):
        child.run(state)
        return {"n": state["n"] + 1}

    def go():
        if flavor == "sync":
            return sync_step.resume_run("%s") if resume else sync_step.run({"n": 0}, run_id="%s")
        if flavor == "nested":
            return parent.resume_run("%s") if resume else parent.run({"n": 0}, run_id="%s")

        async def main():
            if resume:
                return await async_step.resume_run("%s")
            return await async_step.run({"n": 0}, run_id="%s")

        return anyio.run(main, backend=flavor.split("-")[1])

    res = go()
    print("done " + json.dumps({"status": res.status.value, "cost": res.cost_usd}), flush=True)
    """
).replace('"%s"', repr(RUN_ID))


class Subject:
    """One process running (or resuming) the subject loop; its stdout lines arrive on a queue."""

    def __init__(self, script: Path, db: Path, flavor: str, resume: bool, env: dict[str, str]) -> None:
        argv = [sys.executable, str(script), str(db), flavor, *(["resume"] if resume else [])]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def outcome(self) -> str:
        """``sent`` (the call is in flight) or ``done ...`` (the run returned without sending one)."""
        while True:
            line = self.lines.get(timeout=60)
            if line is None:
                self.proc.wait(30)
                assert self.proc.stderr is not None
                raise AssertionError(f"subject died: {self.proc.stderr.read()[-3000:]}")
            if line in ("sent", "calling") or line.startswith("done "):
                return line

    def kill(self) -> None:
        """SIGKILL: the process dies with the call in flight."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.close()

    def close(self) -> None:
        """Reap the process and close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


def holds(db: Path) -> list[tuple[str, float]]:
    """(run id, usd) of every hold in the database."""
    with sqlite3.connect(db) as c:
        return c.execute("SELECT run_id, usd FROM holds").fetchall()


def run_row(db: Path, run_id: str = RUN_ID) -> tuple[str, float, dict[str, Any]]:
    """(status, cost_usd, meta) of a run as stored."""
    with sqlite3.connect(db) as c:
        status, cost, meta = c.execute("SELECT status, cost_usd, meta FROM runs WHERE id = ?", (run_id,)).fetchone()
    return status, cost, json.loads(meta) if meta else {}


def crash_and_resume(tmp_path: Path, flavor: str, crashes: int, env: dict[str, str] | None = None,
                     script_text: str = SUBJECT) -> tuple[Path, int, list[str]]:
    """Kill the subject mid-call ``crashes`` times (resuming each time), then let it finish.

    Returns the database, how many calls went out, and the ``done`` lines.
    """
    script = tmp_path / "subject.py"
    script.write_text(script_text)
    db = tmp_path / f"{flavor}.db"
    base = {**os.environ, **(env or {})}
    sent, done = 0, []
    for attempt in range(crashes + 1):
        last = attempt == crashes
        subject = Subject(script, db, flavor, attempt > 0, {**base, "IN_FLIGHT": "0" if last else "60"})
        try:
            out = subject.outcome()
            if out == "sent":
                sent += 1
                if last:
                    out = subject.outcome()
                else:
                    # the hold was committed before the call went out
                    assert holds(db), "the call was sent before its reservation was in the store"
                    subject.kill()
                    continue
            done.append(out)
            subject.proc.wait(60)
            assert subject.proc.returncode == 0
        finally:
            subject.close()
    return db, sent, done


@pytest.mark.parametrize("flavor", ["sync", "async-asyncio", "async-trio"])
def test_calls_in_flight_when_the_process_dies_are_paid_for(tmp_path: Path, flavor: str) -> None:
    """Six SIGKILLs mid-call under a $1.00 cap: every reservation in flight counts; the cap holds."""
    db, sent, done = crash_and_resume(tmp_path, flavor, crashes=6)
    status, cost, meta = run_row(db)
    # $0.40 a call, $1.00 cap: two calls fit; the third reservation is refused before it is sent
    assert sent == 2
    assert cost == pytest.approx(0.40 * sent)
    assert cost <= 1.00
    assert status == RunStatus.BUDGET_EXHAUSTED.value
    assert [rec["usd"] for rec in meta["held_charges"]] == pytest.approx([0.40, 0.40])
    assert holds(db) == []
    assert all(json.loads(d[5:])["cost"] == pytest.approx(0.80) for d in done)


def test_a_call_in_flight_in_a_nested_loop_is_charged_to_the_resumed_tree(tmp_path: Path) -> None:
    """A child loop killed mid-call: the parent's resume charges the child's hold once, in full."""
    db, sent, _ = crash_and_resume(tmp_path, "nested", crashes=1)
    assert sent == 2  # the first call (killed: $0.40 held) and the retried one (settled at $0.30)
    _, cost, meta = run_row(db)
    assert cost == pytest.approx(0.40 + 0.30)
    assert meta["held_charges"][0]["usd"] == pytest.approx(0.40)
    with sqlite3.connect(db) as c:
        (child_cost,) = c.execute("SELECT cost_usd FROM runs WHERE parent_run_id = ?", (RUN_ID,)).fetchone()
    assert child_cost == pytest.approx(0.30)  # the child's own row is not charged twice
    assert holds(db) == []
    shown = subprocess.run([sys.executable, "-m", "loomc", "show", RUN_ID, "--db", str(db)],
                           capture_output=True, text=True, check=True).stdout
    assert "$0.4000 charged, held by a call in flight when the process died" in shown


# -- the adapters, with the real SDK client against the loopback API ---------------------------

ADAPTER_SUBJECT = textwrap.dedent(
    """
    import json, os, sys
    import anthropic, anyio
    from loomc import AnthropicAdapter, Budget, loop

    db, flavor, resume = sys.argv[1], sys.argv[2], len(sys.argv) > 3
    url, cap = os.environ["API_URL"], float(os.environ["CAP"])
    adapter = AnthropicAdapter("claude-sonnet-4-6")
    ASK = dict(model="claude-sonnet-4-6", max_tokens=20000, messages=[{"role": "user", "content": "Improve it."}])

    @loop(checkpoint=db, budget=Budget(usd=cap, iterations=20), name="adapter-flight")
    def sync_step(state):
        client = adapter.wrap(anthropic.Anthropic(api_key="k", base_url=url, max_retries=0, timeout=120))
        print("calling", flush=True)  # the server holds the request open
        client.messages.create(**ASK)
        return {"n": state["n"] + 1}

    @loop(checkpoint=db, budget=Budget(usd=cap, iterations=20), name="adapter-flight")
    async def async_step(state):
        client = adapter.wrap(anthropic.AsyncAnthropic(api_key="k", base_url=url, max_retries=0, timeout=120))
        print("calling", flush=True)
        await client.messages.create(**ASK)
        return {"n": state["n"] + 1}

    async def main():
        return await (async_step.resume_run("%s") if resume else async_step.run({"n": 0}, run_id="%s"))

    if flavor == "sync":
        res = sync_step.resume_run("%s") if resume else sync_step.run({"n": 0}, run_id="%s")
    else:
        res = anyio.run(main)
    print("done " + json.dumps({"status": res.status.value, "cost": res.cost_usd}), flush=True)
    """
).replace('"%s"', repr(RUN_ID))


@pytest.fixture
def slow_api() -> Iterator[tuple[FakeAPI, threading.Event]]:
    """The loopback API, answering only once ``release`` is set (calls hang in flight until then)."""
    release = threading.Event()
    with serve() as api:
        api.reply = lambda path, request: "better" if release.wait(120) else ""
        try:
            yield api, release
        finally:
            release.set()


@pytest.mark.parametrize("flavor", ["sync", "async-asyncio"])
def test_adapter_calls_killed_in_flight_count_against_the_cap(
    tmp_path: Path, slow_api: tuple[FakeAPI, threading.Event], flavor: str
) -> None:
    """The wrapped SDK client is killed while the server holds its request: each request is paid."""
    api, release = slow_api
    adapter = AnthropicAdapter("claude-sonnet-4-6")
    ask = {"model": "claude-sonnet-4-6", "max_tokens": 20000, "messages": [{"role": "user", "content": "Improve it."}]}
    per_call = adapter.max_cost(ask, adapter.pricing)
    cap = round(per_call * 2.5, 6)  # two calls fit, a third does not
    env = {"API_URL": api.base_url, "CAP": str(cap)}
    script = tmp_path / "adapter_subject.py"
    script.write_text(ADAPTER_SUBJECT)
    db = tmp_path / "adapter.db"
    for attempt in range(3):  # killed mid-call twice, then its next call does not fit
        subject = Subject(script, db, flavor, attempt > 0, {**os.environ, **env})
        try:
            # the request reaches the provider (then the process is killed), or it is refused (the run returns)
            if subject.outcome() == "calling" and _reached(api, len(api.requests), subject):
                subject.kill()
        finally:
            subject.close()
    release.set()
    calls = len(api.requests)
    status, cost, meta = run_row(db)
    assert calls == 2
    assert cost == pytest.approx(per_call * calls)
    assert cost <= cap
    assert status == RunStatus.BUDGET_EXHAUSTED.value
    assert len(meta["held_charges"]) == 2
    assert holds(db) == []


def _reached(api: FakeAPI, before: int, subject: Subject, timeout: float = 60.0) -> bool:
    """True once a new request reached the server; False if the subject printed something first."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(api.requests) > before:
            return True
        if not subject.lines.empty():
            return False
        time.sleep(0.01)
    raise AssertionError("neither a request nor an outcome")


# -- in one process: what a step leaves behind when it is interrupted ---------------------------


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_a_hold_of_an_interrupted_step_is_charged_when_the_run_resumes(tmp_path: Path, kind: str) -> None:
    """A step interrupted mid-call never commits; resuming the run (same process) charges its hold."""
    store: Any = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "i.db")
    interrupt = [True]

    @loop(checkpoint=store, budget=Budget(usd=1.0, iterations=2), name="interrupted")
    def step(state: dict[str, int]) -> dict[str, int]:
        with loomc.reserve(0.25) as hold:
            if interrupt[0]:
                interrupt[0] = False
                raise KeyboardInterrupt  # the user stops it while the call is in flight
            hold.settle(0.10)
        return {"n": state["n"] + 1}

    with pytest.raises(KeyboardInterrupt):
        step.run({"n": 0}, run_id="r1")
    assert store.get_run("r1").status is RunStatus.INTERRUPTED
    result = step.resume_run("r1")
    assert result.cost_usd == pytest.approx(0.25 + 0.10 + 0.10)
    info = store.get_run("r1")
    assert info.cost_usd == pytest.approx(0.45)
    assert info.meta["held_charges"][0]["usd"] == pytest.approx(0.25)
    assert [s.cost_usd for s in store.load_steps("r1")] == pytest.approx([0.10, 0.10])


def test_a_committed_step_leaves_no_hold_and_a_loop_that_never_reserves_writes_none(tmp_path: Path) -> None:
    """The hold is in the store while the call is out, and gone with the step's commit."""
    db = tmp_path / "h.db"
    seen: list[list[tuple[str, float]]] = []

    @loop(checkpoint=str(db), budget=Budget(usd=1.0, iterations=2), name="holder")
    def step(state: dict[str, int]) -> dict[str, int]:
        with loomc.reserve(0.3) as hold:
            seen.append(holds(db))  # another connection sees it: committed before the call
            hold.settle(0.2)
        return {"n": state["n"] + 1}

    result = step.run({"n": 0}, run_id="h1")
    assert seen == [[("h1", 0.3)], [("h1", 0.3)]]
    assert holds(db) == []
    assert result.cost_usd == pytest.approx(0.4)
    assert "held_charges" not in SQLiteStore(db).get_run("h1").meta


@pytest.mark.anyio
@pytest.mark.usefixtures("no_blocking")
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_areserve_commits_the_hold_without_blocking_the_event_loop(tmp_path: Path, anyio_backend: str) -> None:
    """``await loomc.areserve`` writes the hold off the event loop; the commit removes it."""
    db = tmp_path / "a.db"
    seen: list[int] = []

    def count() -> int:
        with sqlite3.connect(db) as c:
            return int(c.execute("SELECT count(*) FROM holds").fetchone()[0])

    @loop(checkpoint=str(db), budget=Budget(usd=1.0, iterations=2), name="areserver")
    async def step(state: dict[str, int]) -> dict[str, int]:
        hold = await loomc.areserve(0.3)
        seen.append(await anyio.to_thread.run_sync(count))
        hold.settle(0.1)
        return {"n": state["n"] + 1}

    result = await step.run({"n": 0})
    assert seen == [1, 1]
    assert await anyio.to_thread.run_sync(count) == 0
    assert result.cost_usd == pytest.approx(0.2)


class PlainStore:
    """A store of the user's own: the CheckpointStore methods only, no holds."""

    def __init__(self) -> None:
        self._inner = MemoryStore()
        self.db_path = ":memory:"
        self.path = None

    def __getattr__(self, name: str) -> Any:
        if name in ("put_hold", "charge_holds"):
            raise AttributeError(name)
        return getattr(self._inner, name)


def test_a_store_without_holds_keeps_reservations_in_memory() -> None:
    """A store that lacks the hold methods runs reserving loops as before (nothing is written)."""
    store = PlainStore()
    assert not isinstance(store, HoldStore)

    @loop(checkpoint=store, budget=Budget(usd=1.0, iterations=3), name="plain")
    def step(state: dict[str, int]) -> dict[str, int]:
        with loomc.reserve(0.3) as hold:
            hold.settle(0.2)
        return {"n": state["n"] + 1}

    result = step.run({"n": 0})
    assert result.cost_usd == pytest.approx(0.6)
    assert result.status is RunStatus.BUDGET_EXHAUSTED


# -- the schema -----------------------------------------------------------------------------


def test_a_v2_database_migrates_to_v3_and_its_runs_resume(tmp_path: Path) -> None:
    """A file written before holds existed gains the table; its runs keep their steps and spend."""
    db = tmp_path / "v2.db"

    @loop(checkpoint=str(db), budget=Budget(usd=1.0, iterations=3), name="old")
    def step(state: dict[str, int]) -> dict[str, int]:
        loomc.charge(0.1)
        return {"n": state["n"] + 1}

    step.run({"n": 0}, run_id="old1")
    for s in list(loomc.store.sqlite.sync._stores.values()):
        s.close()
    with sqlite3.connect(db) as c:  # what loomc 0.5.0 left: schema v2, no holds table
        c.execute("DROP TABLE holds")
        c.execute("UPDATE runs SET status = 'interrupted', steps = 2, cost_usd = 0.2, next_from = 1 WHERE id = 'old1'")
        c.execute("DELETE FROM steps WHERE step_n = 2")
        c.execute("PRAGMA user_version=2")
    store = SQLiteStore(db)
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.conn.execute("SELECT count(*) FROM holds").fetchone()[0] == 0
    store.close()
    result = step.resume_run("old1")
    assert (result.steps, result.cost_usd, result.state) == (3, pytest.approx(0.3), {"n": 3})


def test_a_v3_database_is_refused_by_a_loomc_that_reads_v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An older loomc (schema v2) refuses a v3 file with SchemaTooNew and leaves it untouched."""
    db = tmp_path / "v3.db"
    SQLiteStore(db).list_runs()
    before = db.read_bytes()
    monkeypatch.setattr(loomc.store.sqlite.sql, "SCHEMA_VERSION", 2)
    with pytest.raises(loomc.SchemaTooNew, match=f"schema v{SCHEMA_VERSION}"):
        SQLiteStore(db).list_runs()
    assert db.read_bytes() == before


GRAPH_SUBJECT = textwrap.dedent(
    """
    import json, os, sqlite3, sys, time
    import loomc
    from loomc import Budget, loop
    from orchestration import Graph

    db = sys.argv[1]

    @loop(budget=Budget(usd=5.00, iterations=1), name="writer")
    def writer(state):
        with loomc.reserve(0.40) as hold:
            print("sent", flush=True)
            time.sleep(float(os.environ["IN_FLIGHT"]))
            hold.settle(0.30)
        return {"text": "done"}

    graph = Graph("flight", budget=Budget(usd=1.00), checkpoint=db)
    graph.add(writer)
    if len(sys.argv) > 3:
        with sqlite3.connect(db) as c:
            (run_id,) = c.execute("SELECT id FROM runs WHERE kind = 'graph'").fetchone()
        res = graph.resume(run_id)
    else:
        res = graph.run({"topic": "x"})
    print("done " + json.dumps({"status": res.status.value, "cost": res.cost_usd}), flush=True)
    """
)


def test_a_call_in_flight_in_a_graph_node_is_charged_to_the_graph(tmp_path: Path) -> None:
    """A graph killed while a node's call is in flight: its resume charges the hold to the graph once."""
    db, sent, done = crash_and_resume(tmp_path, "graph", crashes=1, script_text=GRAPH_SUBJECT)
    assert sent == 2
    with sqlite3.connect(db) as c:
        (graph_id,) = c.execute("SELECT id FROM runs WHERE kind = 'graph'").fetchone()
        (node_cost,) = c.execute("SELECT cost_usd FROM runs WHERE parent_run_id = ?", (graph_id,)).fetchone()
    status, cost, meta = run_row(db, graph_id)
    assert (status, cost, node_cost) == ("completed", pytest.approx(0.70), pytest.approx(0.30))
    assert json.loads(done[-1][5:])["cost"] == pytest.approx(0.70)
    assert meta["held_charges"][0]["usd"] == pytest.approx(0.40)
    assert holds(db) == []


def test_a_graph_that_records_an_uncommitted_node_step_drops_its_holds(tmp_path: Path) -> None:
    """A node step that paid for a call but never committed: the graph's total takes its cost once.

    The graph stores what its nodes spent when it ends; the holds that spending covers go
    with it, so resuming the graph does not charge the same call a second time.
    """
    from orchestration import Graph

    db = tmp_path / "g.db"
    broken = [True]

    @loop(budget=Budget(usd=5.0, iterations=1), name="unsaved")
    def unsaved(state: dict[str, Any]) -> dict[str, Any]:
        with loomc.reserve(0.40) as hold:
            hold.settle(0.30)
        return {"bad": object()} if broken[0] else {"ok": True}  # cannot be stored: the step never commits

    graph = Graph("unsaved-graph", budget=Budget(usd=1.0), checkpoint=str(db))
    graph.add(unsaved)
    first = graph.run({"x": 1})
    assert first.status is RunStatus.FAILED
    assert holds(db) == []
    assert run_row(db, first.run_id)[1] == pytest.approx(0.30)
    broken[0] = False
    again = graph.resume(first.run_id)
    assert again.status is RunStatus.COMPLETED
    assert run_row(db, first.run_id)[1] == pytest.approx(0.60)
    assert "held_charges" not in run_row(db, first.run_id)[2]
