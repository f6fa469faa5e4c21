"""States come back exactly as they were stored, or loomc refuses them with a clear error.

A damaged file, a step that forgot ``return``, values JSON would change, a state class that
changed between attempts and runs kept in a memory store: each is either exact or refused.
"""

from __future__ import annotations

import datetime
import decimal
import json
import math
import os
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

import loomc
from loomc import Budget, BudgetExhausted, LastGood, MemoryStore, RunNotFound, RunStatus, SQLiteStore, loop
from loomc._core.errors import StateError, StoreError
from loomc.store.sqlite.aio import AsyncSQLiteStore

# --------------------------------------------------------------------------- helpers


def counter(checkpoint: Any, *, iterations: int = 5, big: bool = False, name: str = "counter") -> Any:
    """A loop that counts; with ``big``, its states are large enough to be stored as blobs."""

    @loop(checkpoint=checkpoint, budget=Budget(iterations=iterations), name=name)
    def work(state: dict[str, Any]) -> dict[str, Any]:
        loomc.charge(0.1)
        return {"n": state["n"] + 1, "pad": f"{state['n']}-" + "x" * (5000 if big else 10)}

    return work


def finished(work: Any, start: Any, run_id: str) -> None:
    """Run ``work`` until its iterations run out."""
    with pytest.raises(BudgetExhausted):
        work(start, run_id=run_id)


def sql(db: str, statement: str, *args: Any) -> None:
    """Damage the file the way a bad disk or a careless hand would."""
    with sqlite3.connect(db) as c:
        c.execute(statement, args)


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that imports this checkout and modules in ``cwd``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(cwd), str(Path(__file__).resolve().parent.parent)])
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
        check=False,
    )


# ------------------------------------------------------- a missing state row (damaged file)


@pytest.mark.parametrize("big", [False, True], ids=["inline-state", "blob-state"])
def test_resume_refuses_a_run_whose_last_step_row_is_gone(db: str, big: bool) -> None:
    """The last step's row deleted: resume raises StoreError naming the step, never restarts from the input."""
    work = counter(db, big=big)
    finished(work, {"n": 0, "pad": ""}, "r1")
    sql(db, "DELETE FROM steps WHERE run_id = 'r1' AND step_n = 4")
    with pytest.raises(StoreError, match=r"run r1 committed step 4, but its row is missing .* damaged"):
        work.resume("r1", budget=Budget(iterations=10))
    with sqlite3.connect(db) as c:  # nothing ran
        assert c.execute("SELECT count(*), max(step_n) FROM steps WHERE run_id = 'r1'").fetchone() == (4, 3)


def test_resume_refuses_a_run_whose_failed_last_step_row_is_gone(db: str) -> None:
    """With LastGood the last step (failed) is not the resume point; its row gone is still a StoreError."""

    @loop(checkpoint=db, budget=Budget(iterations=4), backtrack=LastGood(), name="flaky")
    def work(state: dict[str, int]) -> dict[str, int]:
        if state["n"] == 2:
            raise RuntimeError("rate limit")
        return {"n": state["n"] + 1}

    finished(work, {"n": 0}, "lg")  # steps 0, 1 good; 2, 3 failed: the next step starts from step 1
    sql(db, "DELETE FROM steps WHERE run_id = 'lg' AND step_n >= 2")
    with pytest.raises(StoreError, match=r"run lg committed step 3, but its row is missing .* damaged"):
        work.resume("lg", budget=Budget(iterations=10))


def test_resume_refuses_a_run_whose_last_state_blob_is_gone(db: str) -> None:
    """The blob the last step points at deleted: StoreError, on the resume point, history and export alike."""
    work = counter(db, big=True)
    finished(work, {"n": 0, "pad": ""}, "r2")
    sql(db, "DELETE FROM blobs WHERE id = (SELECT blob_id FROM steps WHERE run_id = 'r2' AND step_n = 4)")
    with pytest.raises(StoreError, match=r"step 4, but its state is missing .* damaged"):
        work.resume("r2", budget=Budget(iterations=10))
    store = SQLiteStore(db)
    with pytest.raises(StoreError, match="step 4"):
        store.load_steps("r2")
    with pytest.raises(StoreError, match="step 4"):
        store.load_state("r2", 4)
    proc = subprocess.run(
        [sys.executable, "-m", "loomc", "export", "r2", "--json", "--db", db], capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert proc.returncode != 0
    assert "step 4" in proc.stderr
    assert "damaged" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_backtrack_to_a_step_whose_state_is_gone_is_refused(db: str) -> None:
    """A backtrack reads back an earlier state that is gone: StoreError naming it, not some other state."""
    scores = {0: 1.0, 1: 1.0, 2: 0.5}

    @loop(checkpoint=db, budget=Budget(iterations=2), backtrack=loomc.BestScore(), scorer=lambda s: s["score"],
          name="backtracker")
    def work(state: dict[str, Any]) -> dict[str, Any]:
        return {"n": state["n"] + 1, "score": scores[state["n"]]}

    finished(work, {"n": 0, "score": 0.0}, "bt")
    sql(db, "UPDATE steps SET state_blob = NULL WHERE run_id = 'bt' AND step_n = 0")
    # step 2 scores lower than step 0, the best: the resumed run backtracks to step 0
    with pytest.raises(StoreError, match=r"run bt committed step 0, but its state is missing"):
        work.resume("bt", budget=Budget(iterations=5))


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_async_resume_refuses_a_damaged_run(db: str, anyio_backend: str) -> None:
    """The async stores (aiosqlite and threaded) refuse the missing last state as the sync one does."""

    @loop(checkpoint=db, budget=Budget(iterations=4), name="async-counter")
    async def work(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    with pytest.raises(BudgetExhausted):
        await work({"n": 0}, run_id="a1")
    await anyio.to_thread.run_sync(sql, db, "DELETE FROM steps WHERE run_id = 'a1' AND step_n = 3")
    with pytest.raises(StoreError, match=r"step 3, but its row is missing"):
        await work.resume("a1", budget=Budget(iterations=10))
    if anyio_backend == "asyncio":
        async with AsyncSQLiteStore(db) as store:
            with pytest.raises(StoreError, match="step 3"):
                await store.resume_point("a1")
            await anyio.to_thread.run_sync(
                sql, db, "UPDATE steps SET state_blob = NULL WHERE run_id = 'a1' AND step_n = 2"
            )
            with pytest.raises(StoreError, match=r"step 2, but its state is missing"):
                await store.load_steps("a1")


def test_memory_store_refuses_a_damaged_run() -> None:
    """The memory store says which state is missing instead of a KeyError or the input."""
    store = MemoryStore()
    work = counter(store)
    finished(work, {"n": 0, "pad": ""}, "m1")
    del store._steps["m1"][4]  # what a bug in a custom copy of the store could leave behind
    with pytest.raises(StoreError, match=r"step 4, but its row is missing in the memory store"):
        work.resume("m1", budget=Budget(iterations=10))
    with pytest.raises(StoreError, match="step 4"):
        store.load_state("m1", 4)


# ------------------------------------------------------------------------- the -wal file


def test_the_wal_deleted_between_two_writes_of_a_store_is_caught(db: str) -> None:
    """A store whose -wal file vanished refuses the next write and keeps every committed row."""
    work = counter(db, iterations=3)
    finished(work, {"n": 0, "pad": ""}, "w1")
    store = work.store()
    Path(f"{db}-wal").unlink()
    store._next_check = 0.0  # the next write checks now, not up to 0.1 s later
    with pytest.raises(StoreError, match=r"write-ahead log .* none is lost"):
        store.update_run_status("w1", RunStatus.COMPLETED)
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT count(*) FROM steps WHERE run_id = 'w1'").fetchone() == (3,)
    store.update_run_status("w1", RunStatus.COMPLETED)  # reopened: a new log, writes go on
    assert store.get_run("w1").status is RunStatus.COMPLETED  # type: ignore[union-attr]


# ------------------------------------------------------------------- a step returning None


def test_a_step_returning_none_fails_that_step_and_stores_no_null(db: str) -> None:
    """A forgotten `return`: the step fails with a clear StateError; the resume starts from the last good state."""
    calls: list[Any] = []

    @loop(checkpoint=db, budget=Budget(iterations=10), name="forgets-return")
    def work(state: dict[str, int]) -> dict[str, int] | None:
        calls.append(state)
        if state["n"] == 2 and len(calls) == 3:
            return None  # forgot `return`
        return {"n": state["n"] + 1}

    result = work.run({"n": 0}, run_id="none1")
    assert result.status is RunStatus.FAILED
    assert isinstance(result.error, StateError)
    assert "the step returned None; return the new state" in str(result.error)
    assert result.state == {"n": 2}
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT step_n, state_blob, error FROM steps WHERE run_id = 'none1' ORDER BY step_n").fetchall()
    assert rows[-1][0] == 2
    assert rows[-1][1] == '{"n":2}'  # the state the step started from, not null
    assert "returned None" in rows[-1][2]
    with pytest.raises(BudgetExhausted) as caught:
        work.resume("none1")
    assert caught.value.state == {"n": 9}
    assert None not in calls


def test_none_return_with_last_good_continues_and_none_start_state_is_allowed(db: str) -> None:
    """LastGood skips a None-returning step; a run may still *start* from None."""

    @loop(checkpoint=db, budget=Budget(iterations=4), backtrack=LastGood(), name="sometimes-none")
    def work(state: int | None) -> int | None:
        if state is None:
            return 1
        return None if state == 2 else state + 1

    result = work.run(None, run_id="none2")
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert [r.error is not None for r in result.history] == [False, False, True, True]
    assert result.state == 2


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_an_async_step_returning_none_fails_that_step(db: str, anyio_backend: str) -> None:
    """The async driver refuses a None return the same way."""

    @loop(checkpoint=db, budget=Budget(iterations=5), name="async-forgets-return")
    async def work(state: dict[str, int]) -> None:
        await anyio.sleep(0)

    with pytest.raises(StateError, match="the step returned None"):
        await work({"n": 0})


def test_a_graph_plain_function_may_return_none_but_a_loop_node_may_not(db: str) -> None:
    """A plain function's None is its output (a sink); a @loop node returning None fails its step."""
    from orchestration import Graph

    sent: list[Any] = []

    def publish(report: dict[str, int]) -> None:
        sent.append(report)

    @loop(budget=Budget(iterations=3), name="drafting")
    def draft(state: dict[str, int]) -> dict[str, int] | None:
        return None if state["n"] == 1 else {"n": state["n"] + 1}

    ok = Graph("sink", checkpoint=db)
    ok.add(publish)
    result = ok.run({"n": 7})
    assert result.status is RunStatus.COMPLETED
    assert sent == [{"n": 7}]
    assert result.outputs == {"publish": None}

    bad = Graph("forgets", checkpoint=db)
    bad.add(draft)
    failed = bad.run({"n": 0})
    assert failed.status is RunStatus.FAILED
    assert "the step returned None" in str(failed.nodes["draft"].error)


# -------------------------------------------------------------- values JSON would change

CHANGED: list[tuple[Any, str, str]] = [
    ({"items": [1, 2, 3, (4, 5)]}, r"state\['items'\]\[3\]: tuple", "use a list"),
    ({"tags": {"a", "b"}}, r"state\['tags'\]: set", "list"),
    ({"tags": frozenset({"a"})}, r"state\['tags'\]: frozenset", "list"),
    ({"at": datetime.datetime(2026, 1, 2, 3, 4, 5)}, r"state\['at'\]: datetime", "isoformat"),
    ({"on": datetime.date(2026, 1, 2)}, r"state\['on'\]: date", "isoformat"),
    ({"raw": b"\x00\x01"}, r"state\['raw'\]: bytes", "base64"),
    ({"price": decimal.Decimal("1.10")}, r"state\['price'\]: Decimal", "str"),
    ({"id": uuid.UUID(int=7)}, r"state\['id'\]: UUID", "str"),
    ({1: "a", "1": "b"}, r"state\[1\]: the int key 1 would come back as the string '1', overwriting", "string keys"),
    ({"m": [{"k": {2.5: "x"}}]}, r"state\['m'\]\[0\]\['k'\]\[2.5\]: the float key", "string keys"),
    ({"flags": {True: 1}}, r"state\['flags'\]\[True\]: the bool key", "string keys"),
    ((1, 2), r"state: tuple", "use a list"),
]


@pytest.mark.parametrize(("state", "where", "hint"), CHANGED)
def test_a_start_state_that_json_would_change_is_refused_before_anything_is_written(
    db: str, state: Any, where: str, hint: str
) -> None:
    """Refused up front with StateError naming the field; the database holds no run."""
    work = counter(db)
    with pytest.raises(StateError, match=where) as caught:
        work.run(state, run_id="never")
    assert hint in str(caught.value)
    assert "nothing was written" in str(caught.value)
    assert SQLiteStore(db).get_run("never") is None


@pytest.mark.parametrize(("bad", "where", "hint"), CHANGED[:-1])
def test_a_new_state_that_json_would_change_fails_its_step_and_is_not_stored(db: str, bad: Any, where: str, hint: str) -> None:
    """A step returning such a state fails with the field named; the last good state is what a resume gets."""

    @loop(checkpoint=db, budget=Budget(iterations=6), name="returns-a-tuple")
    def work(state: dict[str, Any]) -> Any:
        return bad if state.get("n") == 2 else {"n": state.get("n", 0) + 1}

    result = work.run({"n": 0}, run_id="bad")
    assert result.status is RunStatus.FAILED
    assert isinstance(result.error, StateError)
    assert hint in str(result.error)
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT max(step_n) FROM steps WHERE run_id = 'bad'").fetchone() == (1,)
    assert SQLiteStore(db).load_state("bad", 1) == {"n": 2}


def test_plain_json_states_round_trip_exactly_through_a_resume(db: str) -> None:
    """Nested lists, dicts, big ints, floats, NaN, unicode and None come back equal and of the same types."""
    start = {
        "n": 0, "nested": [[1, 2.5, None, True], {"k": ["v", {"deep": -0.0}]}], "big": 10**30,
        "nan": math.nan, "inf": -math.inf, "text": "é\u2603\n", "": [],
    }

    @loop(checkpoint=db, budget=Budget(iterations=3), name="exact")
    def work(state: dict[str, Any]) -> dict[str, Any]:
        return {**state, "n": state["n"] + 1}

    finished(work, start, "exact")
    back = SQLiteStore(db).load_state("exact", 2)
    assert math.isnan(back.pop("nan"))
    expected = {k: v for k, v in start.items() if k != "nan"}
    assert back == {**expected, "n": 3}
    assert type(back["big"]) is int
    assert type(back["nested"][0]) is list


class Shaped(BaseModel):
    """A model that declares the types JSON would otherwise lose."""

    n: int
    pair: tuple[int, int]
    tags: set[str]
    at: datetime.datetime


def test_a_pydantic_state_keeps_its_declared_types_on_resume(db: str) -> None:
    """Tuples, sets and datetimes declared by a model come back as themselves."""

    @loop(checkpoint=db, budget=Budget(iterations=2), name="shaped")
    def work(state: Shaped) -> Shaped:
        return state.model_copy(update={"n": state.n + 1})

    start = Shaped(n=0, pair=(1, 2), tags={"a"}, at=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC))
    finished(work, start, "shaped")
    back = work.resume_run("shaped", budget=Budget(iterations=2)).state
    assert back == start.model_copy(update={"n": 2})
    assert isinstance(back.pair, tuple)
    assert isinstance(back.tags, set)


# ------------------------------------------------------------- a state class that changed

V1 = """
from pydantic import BaseModel
from loomc import Budget, loop

class Draft(BaseModel):
    n: int = 0

@loop(checkpoint="{db}", budget=Budget(iterations=2), name="drafts")
def work(state: Draft) -> Draft:
    return Draft(n=state.n + 1)
"""

REQUIRED_FIELD = """
from pydantic import BaseModel
from loomc import Budget, loop

class Draft(BaseModel):
    n: int = 0
    reviewer: str

@loop(checkpoint="{db}", budget=Budget(iterations=2), name="drafts")
def work(state: Draft) -> Draft:
    return Draft(n=state.n + 1, reviewer=state.reviewer)
"""

RENAMED = """
from pydantic import BaseModel
from loomc import Budget, loop

class Revision(BaseModel):
    n: int = 0

@loop(checkpoint="{db}", budget=Budget(iterations=2), name="drafts")
def work(state: Revision) -> Revision:
    return Revision(n=state.n + 1)
"""

RESUME = """
import loomc, drafts
try:
    print(repr(drafts.work.resume_run("d1", budget=loomc.Budget(iterations=4)).state))
except loomc.StateError as exc:
    print("StateError:", exc)
"""


def _first_attempt(tmp_path: Path, db: str) -> None:
    (tmp_path / "drafts.py").write_text(V1.format(db=db))
    proc = run_python("import drafts, loomc\ntry: drafts.work(drafts.Draft(), run_id='d1')\nexcept loomc.BudgetExhausted: pass",
                      tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_a_state_model_that_gained_a_required_field_is_a_clear_state_error(tmp_path: Path, db: str) -> None:
    """Resume after a required field was added: StateError naming the class and the field, not a raw ValidationError."""
    _first_attempt(tmp_path, db)
    (tmp_path / "drafts.py").write_text(REQUIRED_FIELD.format(db=db))
    proc = run_python(RESUME, tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("StateError:"), out
    assert "drafts:Draft" in out
    assert "reviewer" in out
    assert "give the new field a default" in out
    # the fix the message names works: a default, then resume
    (tmp_path / "drafts.py").write_text(REQUIRED_FIELD.replace("reviewer: str", "reviewer: str = 'ann'").format(db=db))
    proc = run_python(RESUME, tmp_path)
    assert proc.stdout.strip() == "Draft(n=4, reviewer='ann')", proc.stdout + proc.stderr


def test_a_renamed_state_class_is_a_clear_state_error_not_a_dict(tmp_path: Path, db: str) -> None:
    """Resume after the class was renamed: StateError naming the stored class and what to do."""
    _first_attempt(tmp_path, db)
    (tmp_path / "drafts.py").write_text(RENAMED.format(db=db))
    proc = run_python(RESUME, tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("StateError:"), out
    assert "drafts:Draft" in out
    assert "module drafts has no Draft" in out
    assert "Draft = NewName" in out
    # the fix the message names works: an alias under the old name
    (tmp_path / "drafts.py").write_text(RENAMED.format(db=db) + "\nDraft = Revision\n")
    proc = run_python(RESUME, tmp_path)
    assert proc.stdout.strip() == "Revision(n=4)", proc.stdout + proc.stderr


# --------------------------------------------------------------------------- memory store


def test_a_memory_run_resumes_in_the_same_process() -> None:
    """checkpoint="memory": a stopped run resumes from where it stopped, with its budget used."""
    work = counter("memory", iterations=3)
    with pytest.raises(BudgetExhausted) as caught:
        work({"n": 0, "pad": ""})
    run_id = caught.value.run_id
    assert run_id is not None
    result = work.resume_run(run_id, budget=Budget(iterations=5))
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert result.state["n"] == 5
    assert [r.step_n for r in result.history] == [0, 1, 2, 3, 4]
    assert result.cost_usd == pytest.approx(0.5)


def test_a_run_not_in_this_memory_store_says_why() -> None:
    """Another loop's memory store (or a later process) has no such run: RunNotFound says where runs live."""
    first, other = counter("memory", iterations=2, name="first"), counter("memory", iterations=2, name="other")
    with pytest.raises(BudgetExhausted) as caught:
        first({"n": 0, "pad": ""})
    assert caught.value.run_id is not None
    with pytest.raises(RunNotFound, match="live only in the process") as missing:
        other.resume(caught.value.run_id)
    assert 'use checkpoint="sqlite"' in str(missing.value)
    assert "loomc runs" not in str(missing.value)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_an_async_memory_run_resumes_in_the_same_process(anyio_backend: str) -> None:
    """The async driver reuses the loop's memory store too."""

    @loop(checkpoint="memory", budget=Budget(iterations=2), name="async-memory")
    async def work(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    first = await work.run({"n": 0})
    assert first.status is RunStatus.BUDGET_EXHAUSTED
    again = await work.resume_run(first.run_id, budget=Budget(iterations=4))
    assert again.state == {"n": 4}
    assert json.dumps(again.state) == '{"n": 4}'
