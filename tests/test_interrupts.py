"""Interruptions: cancellation at any await, Ctrl-C and SIGTERM at any instant, text SQLite cannot encode."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from loomc import Budget, Retry, RunStatus, SQLiteStore, loop, predicate
from orchestration import Graph


def status_of(db: str, run_id: str) -> str | None:
    """The stored status of a run (``None``: no such run yet)."""
    with sqlite3.connect(db) as c:
        got = c.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
    return None if got is None else str(got[0])


def steps_of(db: str, run_id: str) -> list[int]:
    """The committed step numbers of a run."""
    with sqlite3.connect(db) as c:
        return [r[0] for r in c.execute("SELECT step_n FROM steps WHERE run_id = ? ORDER BY step_n", (run_id,))]


def fast_loop(db: str, steps: int) -> Any:
    """An async loop of ``steps`` near-instant steps: its time goes to awaiting the database."""

    @loop(checkpoint=db, budget=Budget(iterations=steps + 5), cost_fn=lambda s: 0.001,
          converge_on=predicate(lambda h: h[-1].state["n"] >= steps), name="fast")
    async def fast(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    return fast


def resume_elsewhere(fn: Any, run_id: str) -> Any:
    """Resume ``run_id`` from another thread with an event loop of its own; its RunResult."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(anyio.run(fn.resume_run, run_id)))
    t.start()
    t.join(60)
    return out[0]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_cancel_scope_at_any_await_records_interrupted(db: str, backend: str) -> None:
    """Cancel scopes with tiny deadlines land anywhere in the async driver (mostly while it awaits the
    store): every run is then `interrupted` or finished, never `running`, and resumes elsewhere."""
    steps = 12
    fast = fast_loop(db, steps)
    SQLiteStore(db).conn.close()
    outcomes: dict[str, str | None] = {}

    async def main() -> None:
        for i in range(40):
            run_id = f"cancel-{i}"
            with anyio.move_on_after(random.uniform(0, 0.03) if i else 0):
                await fast.run({"n": 0}, run_id=run_id)
            outcomes[run_id] = await anyio.to_thread.run_sync(status_of, db, run_id)

    anyio.run(main, backend=backend)
    assert "running" not in outcomes.values(), outcomes
    assert "interrupted" in outcomes.values(), outcomes
    for run_id, status in outcomes.items():
        if status == "interrupted":
            result = resume_elsewhere(fast, run_id)
            assert result.status is RunStatus.COMPLETED
            assert result.state == {"n": steps}
            assert steps_of(db, run_id) == list(range(steps))


def test_asyncio_task_cancel_at_any_await_records_interrupted(db: str) -> None:
    """A plain ``task.cancel()`` (asyncio's own cancellation, e.g. ``wait_for``) at any instant:
    the run is `interrupted` or finished, and a resume completes it with contiguous steps."""
    steps = 12
    fast = fast_loop(db, steps)
    SQLiteStore(db).conn.close()
    outcomes: dict[str, str | None] = {}

    async def main() -> None:
        for i in range(40):
            run_id = f"task-{i}"
            task = asyncio.ensure_future(fast.run({"n": 0}, run_id=run_id))
            await asyncio.sleep(random.uniform(0, 0.03))
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            outcomes[run_id] = await asyncio.to_thread(status_of, db, run_id)

    asyncio.run(main())
    assert "running" not in outcomes.values(), outcomes
    for run_id, status in outcomes.items():
        if status == "interrupted":
            result = resume_elsewhere(fast, run_id)
            assert result.status is RunStatus.COMPLETED
            assert steps_of(db, run_id) == list(range(steps))


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_graph_cancelled_at_any_await_records_interrupted(db: str, backend: str) -> None:
    """The graph layer too: a graph run cancelled at any instant is never left `running`."""

    @loop(checkpoint=db, budget=Budget(iterations=10), converge_on=predicate(lambda h: h[-1].state["n"] >= 4), name="gnode")
    async def gnode(state: Any) -> dict[str, int]:
        return {"n": (state.get("n", 0) if isinstance(state, dict) else 0) + 1}

    graph = Graph("cancelled", checkpoint=db)
    graph.add(gnode)
    SQLiteStore(db).conn.close()

    async def main() -> None:
        for _ in range(25):
            with anyio.move_on_after(random.uniform(0, 0.04)):
                await graph.arun({})

    anyio.run(main, backend=backend)
    with sqlite3.connect(db) as c:
        statuses = [r[0] for r in c.execute("SELECT status FROM runs")]
    assert "running" not in statuses, statuses


# -- signals ---------------------------------------------------------------------------

FAST_SCRIPT = textwrap.dedent(
    """
    import sys
    from loomc import Budget, loop

    @loop(checkpoint=sys.argv[1], budget=Budget(iterations=int(sys.argv[3])), durability="process", name="spin")
    def spin(state):
        if state["n"] == 0:
            print("started", flush=True)
        return {"n": state["n"] + 1}

    if sys.argv[2] == "start":
        spin.run({"n": 0}, run_id="spin-run")
    else:
        result = spin.resume_run("spin-run", budget=Budget(iterations=int(sys.argv[3])))
        print(result.status.value, result.steps, result.state["n"])
    """
)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_at_a_random_instant_records_interrupted_with_the_resume_hint(tmp_path: Path, signum: signal.Signals) -> None:
    """Ctrl-C (SIGINT) on a fast loop behaves like SIGTERM: held past the commit, the run recorded
    `interrupted`, the resume hint printed, no traceback from inside the store; the resume completes."""
    script = tmp_path / "spin.py"
    script.write_text(FAST_SCRIPT)
    for attempt in range(6):
        db = str(tmp_path / f"spin-{attempt}.db")
        proc = subprocess.Popen(
            [sys.executable, str(script), db, "start", "1000000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        time.sleep(0.2 + random.uniform(0, 0.3))
        os.kill(proc.pid, signum)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0, err
        assert status_of(db, "spin-run") == "interrupted", (attempt, err)
        assert "KeyboardInterrupt" in err
        assert "loomc: run spin-run (spin) was interrupted" in err
        assert "resume(" in err
        assert "spin-run" in err
        for inside in ("_store.py", "sqlite3", "COMMIT", "_tx"):
            assert inside not in err, (inside, err)
        steps = len(steps_of(db, "spin-run"))
        assert steps > 0
        done = subprocess.run(
            [sys.executable, str(script), db, "resume", str(steps + 3)], capture_output=True, text=True, timeout=60, check=True
        )
        assert done.stdout.split() == ["budget_exhausted", str(steps + 3), str(steps + 3)]
        assert steps_of(db, "spin-run") == list(range(steps + 3))


def test_ctrl_c_during_a_backoff_is_not_held(tmp_path: Path) -> None:
    """Only store calls hold a signal: Ctrl-C while waiting to retry ends the wait at once."""
    db = str(tmp_path / "b.db")

    @loop(budget=Budget(iterations=3), checkpoint=db, retry=Retry(attempts=3, initial=5.0, jitter=0))
    def step(state: dict[str, Any]) -> dict[str, Any]:
        raise ConnectionError("reset by peer")

    main = threading.get_ident()
    timer = threading.Timer(0.3, lambda: signal.pthread_kill(main, signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt) as info:
        step.run({})
    timer.join()
    assert time.monotonic() - started < 4.0
    assert any("was interrupted" in n for n in getattr(info.value, "__notes__", []))


# -- text SQLite cannot encode ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "asyncio", "trio"])
def test_an_error_with_a_lone_surrogate_fails_the_run_with_the_error(db: str, kind: str) -> None:
    """``ValueError("\\udcff")`` from a step: the run records `failed` with the error (escaped),
    ``.run()`` returns it; a run name with a lone surrogate is stored too."""
    name = "odd-\udcff-name"
    if kind == "sync":

        @loop(checkpoint=db, budget=Budget(iterations=3), name=name)
        def bad(state: dict[str, int]) -> dict[str, int]:
            raise ValueError("bad \udcff byte")

        result = bad.run({"n": 0})
    else:

        @loop(checkpoint=db, budget=Budget(iterations=3), name=name)
        async def abad(state: dict[str, int]) -> dict[str, int]:
            raise ValueError("bad \udcff byte")

        result = anyio.run(abad.run, {"n": 0}, backend=kind)
    assert result.status is RunStatus.FAILED
    assert isinstance(result.error, ValueError)
    with sqlite3.connect(db) as c:
        status, stored_name, reason = c.execute("SELECT status, name, stop_reason FROM runs").fetchone()
        (error,) = c.execute("SELECT error FROM steps").fetchone()
    assert status == "failed"
    assert stored_name == "odd-\\udcff-name"
    assert error == "ValueError: bad \\udcff byte"
    assert reason == "error: ValueError: bad \\udcff byte"


def test_retry_notes_and_graph_node_errors_with_lone_surrogates_are_stored(db: str) -> None:
    """The siblings: a retry's event text and a graph node's error carry the surrogate escaped."""
    calls = {"n": 0}

    @loop(checkpoint=db, budget=Budget(iterations=2), retry=Retry(attempts=2, initial=0.001, jitter=0), name="flaky")
    def flaky(state: Any) -> dict[str, int]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("reset \udcff")
        raise ValueError("broken \udcff")

    graph = Graph("surrogates", checkpoint=db)
    graph.add(flaky)
    result = graph.run({})
    assert result.status is RunStatus.FAILED
    with sqlite3.connect(db) as c:
        statuses = dict(c.execute("SELECT name, status FROM runs").fetchall())
        (error, event) = c.execute("SELECT error, event FROM steps").fetchone()
    assert statuses == {"surrogates": "failed", "flaky": "failed"}
    assert error == "ValueError: broken \\udcff"
    assert event is not None
    assert "\\udcff" in event
