"""The sync loop through the public API, on real SQLite files."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import loomc
from loomc import (
    BestScore,
    Budget,
    BudgetExhausted,
    Escalate,
    LastGood,
    RunStatus,
    SQLiteStore,
    StallError,
    loop,
    predicate,
    score_plateau,
)


def rows(db: str, run_id: str) -> list[tuple[Any, ...]]:
    """The steps table of a run, straight from SQLite."""
    with sqlite3.connect(db) as c:
        return c.execute(
            "SELECT step_n, cost_usd, score, error, event FROM steps WHERE run_id=? ORDER BY step_n", (run_id,)
        ).fetchall()


def run_row(db: str, run_id: str) -> tuple[Any, ...]:
    """The runs row of a run: status, steps, cost."""
    with sqlite3.connect(db) as c:
        return c.execute("SELECT status, steps, cost_usd FROM runs WHERE id=?", (run_id,)).fetchone()  # type: ignore[no-any-return]


def test_returns_final_state_on_convergence(db: str) -> None:
    """Calling the loop runs it to convergence and returns the final state."""

    @loop(checkpoint=db, converge_on=predicate(lambda h: h[-1].state["n"] >= 3))
    def count(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    assert count({"n": 0}) == {"n": 3}
    run = SQLiteStore(db).list_runs()[0]
    assert run.status is RunStatus.COMPLETED
    assert run.steps == 3
    assert run.name == f"{__name__}:test_returns_final_state_on_convergence.<locals>.count"
    assert len(run.id) == 12
    assert json.loads(rows(db, run.id)[-1][4]) == [{"kind": "converged"}]  # events: a JSON list of records


def test_iterations_budget_raises_with_details(db: str) -> None:
    """Out of iterations: BudgetExhausted names the limit and carries run id and state."""

    @loop(checkpoint=db, budget=Budget(iterations=4))
    def inc(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    with pytest.raises(BudgetExhausted, match="iterations") as info:
        inc({"n": 0})
    err = info.value
    assert (err.limit, err.used, err.cap, err.state) == ("iterations", 4, 4, {"n": 4})
    assert run_row(db, err.run_id) == ("budget_exhausted", 4, 0.0)  # type: ignore[arg-type]
    result = inc.run({"n": 0})
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert result.state == {"n": 4}
    assert result.steps == 4


def test_never_starts_a_step_it_cannot_afford(db: str) -> None:
    """With $0.30 steps and a $1.00 cap, three steps run and the fourth never starts."""
    calls = []

    @loop(checkpoint=db, budget=Budget(usd=1.0), cost_fn=lambda s: 0.30)
    def step(state: dict[str, int]) -> dict[str, int]:
        calls.append(state["n"])
        return {"n": state["n"] + 1}

    result = step.run({"n": 0})
    assert calls == [0, 1, 2]
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert result.cost_usd == pytest.approx(0.90)
    assert isinstance(result.error, BudgetExhausted)
    assert result.error.limit == "usd"


def test_charge_is_a_hard_cap_inside_the_step(db: str) -> None:
    """A charge that would cross the cap raises inside the step and is not recorded."""
    seen = []

    @loop(checkpoint=db, budget=Budget(usd=0.25))
    def spender(state: dict[str, int]) -> dict[str, int]:
        loomc.charge(0.10)
        seen.append("first")
        loomc.charge(0.10)
        seen.append("second")
        return {"n": state["n"] + 1}

    result = spender.run({"n": 0})
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert result.cost_usd <= 0.25
    assert result.cost_usd == pytest.approx(0.20)
    # step 0 spent 0.20; step 1 could not be afforded (estimate 0.20 > 0.05 left)
    assert seen == ["first", "second"]
    assert run_row(db, result.run_id)[1] == 1


def test_charge_refused_mid_step_records_the_step(db: str) -> None:
    """When the first step itself crosses the cap, it is recorded with the error and its real cost."""

    @loop(checkpoint=db, budget=Budget(usd=0.15))
    def spender(state: dict[str, int]) -> dict[str, int]:
        loomc.charge(0.10)
        loomc.charge(0.10)
        return state

    with pytest.raises(BudgetExhausted, match="usd") as info:
        spender({"n": 0})
    assert info.value.state == {"n": 0}
    (row,) = rows(db, info.value.run_id)  # type: ignore[arg-type]
    assert row[1] == pytest.approx(0.10)
    assert row[3].startswith("BudgetExhausted: Budget exhausted: usd")


def test_failed_steps_count_as_iterations(db: str) -> None:
    """Every started step counts, a failed one included; LastGood restores and continues."""
    calls = {"n": 0}

    @loop(checkpoint=db, budget=Budget(iterations=5), backtrack=LastGood(max_consecutive_errors=3))
    def flaky(state: dict[str, int]) -> dict[str, int]:
        calls["n"] += 1
        if calls["n"] % 2 == 0:
            raise RuntimeError("rate limit")
        return {"n": state["n"] + 1}

    result = flaky.run({"n": 0})
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert result.steps == 5
    assert result.state == {"n": 3}
    errors = [r[3] for r in rows(db, result.run_id)]
    assert errors == [None, "RuntimeError: rate limit", None, "RuntimeError: rate limit", None]
    assert json.loads(rows(db, result.run_id)[1][4]) == [{"kind": "backtrack", "to": 0}]


def test_step_exception_propagates_with_a_resume_note(db: str) -> None:
    """Without LastGood the step's own exception propagates, noting the run and how to resume."""

    @loop(checkpoint=db, budget=Budget(iterations=3))
    def broken(state: dict[str, int]) -> dict[str, int]:
        raise KeyError("missing")

    with pytest.raises(KeyError) as info:
        broken({"n": 0})
    notes = "\n".join(info.value.__notes__)
    run = SQLiteStore(db).list_runs()[0]
    assert run.id in notes
    assert f"broken.resume({run.id!r})" in notes
    assert run.status is RunStatus.FAILED


def test_wall_clock_is_checked_between_sync_steps(db: str) -> None:
    """A sync loop stops at the first step boundary past its wall clock."""

    @loop(checkpoint=db, budget=Budget(wall_clock="150ms"))
    def slow(state: dict[str, int]) -> dict[str, int]:
        time.sleep(0.06)
        return {"n": state["n"] + 1}

    result = slow.run({"n": 0})
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert result.error.limit == "wall_clock"  # type: ignore[union-attr]
    assert 2 <= result.steps <= 4


def test_resume_keeps_the_budget(db: str) -> None:
    """Resume carries iterations and cost used; only budget= gives more."""
    stop_at = {"n": 3}

    @loop(checkpoint=db, budget=Budget(iterations=5, usd=1.0), cost_fn=lambda s: 0.1)
    def work(state: dict[str, int]) -> dict[str, int]:
        if state["n"] == stop_at["n"]:
            raise KeyboardInterrupt
        return {"n": state["n"] + 1}

    with pytest.raises(KeyboardInterrupt):
        work({"n": 0})
    run = SQLiteStore(db).list_runs()[0]
    assert (run.status, run.steps) == (RunStatus.INTERRUPTED, 3)
    stop_at["n"] = -1
    with pytest.raises(BudgetExhausted) as info:
        work.resume(run.id)
    assert info.value.state == {"n": 5}
    assert run_row(db, run.id) == ("budget_exhausted", 5, pytest.approx(0.5))
    with pytest.raises(BudgetExhausted) as again:
        work.resume(run.id[:6], budget=Budget(iterations=7, usd=1.0))
    assert again.value.state == {"n": 7}  # two more steps only
    assert run_row(db, run.id) == ("budget_exhausted", 7, pytest.approx(0.7))


def test_resume_returns_the_state_type(db: str) -> None:
    """A run started with a pydantic model resumes as that model."""

    class Draft(BaseModel):
        text: str
        rounds: int = 0

    @loop(checkpoint=db, budget=Budget(iterations=2))
    def improve(state: Draft) -> Draft:
        return Draft(text=state.text + "!", rounds=state.rounds + 1)

    first = improve.run(Draft(text="hi"))
    assert isinstance(first.state, Draft)
    result = improve.resume_run(first.run_id, budget=Budget(iterations=4))
    assert isinstance(result.state, Draft)
    assert result.state == Draft(text="hi!!!!", rounds=4)


def test_unserialisable_state_names_the_field_and_writes_nothing(db: str) -> None:
    """A state that cannot be stored fails with StateError naming the field; no step row is written."""

    @loop(checkpoint=db, budget=Budget(iterations=3))
    def bad(state: dict[str, Any]) -> dict[str, Any]:
        return {"ok": 1, "tools": [1, object()]}

    with pytest.raises(loomc.StateError, match=r"state\['tools'\]\[1\] is a object"):
        bad({"ok": 0})
    run = SQLiteStore(db).list_runs()[0]
    assert rows(db, run.id) == []
    assert run.status is RunStatus.FAILED


def test_backtrack_and_converge_markers(db: str) -> None:
    """BestScore goes back to the best step; the returned state is the best one."""
    scores = [0.3, 0.8, 0.5, 0.6, 0.7]

    @loop(
        checkpoint=db,
        budget=Budget(iterations=10),
        scorer=lambda s: s["score"],
        backtrack=BestScore(),
        converge_on=score_plateau(patience=3),
    )
    def refine(state: dict[str, Any]) -> dict[str, Any]:
        run = loomc.current_run()
        assert run is not None
        return {"from": state.get("step"), "step": run.step, "score": scores[run.step]}

    final = refine({"score": 0.0})
    assert final["step"] == 1
    run_id = SQLiteStore(db).list_runs()[0].id
    events = [r[4] for r in rows(db, run_id)]
    back = {"kind": "backtrack", "to": 1}
    assert [json.loads(e) if e else None for e in events] == [None, None, [back], [back], [back, {"kind": "converged"}]]
    assert [s.event for s in SQLiteStore(db).load_steps(run_id)] == [
        None, None, "backtrack to step 1", "backtrack to step 1", "backtrack to step 1; converged"
    ]


def test_stall_raises_with_states(db: str) -> None:
    """Escalate raises StallError with the run id, state and best state; resume continues."""

    @loop(checkpoint=db, budget=Budget(iterations=20), scorer=lambda s: s["score"], on_stall=Escalate(after=3))
    def stuck(state: dict[str, Any]) -> dict[str, Any]:
        return {"score": 0.5, "n": state["n"] + 1}

    with pytest.raises(StallError) as info:
        stuck({"score": 0.0, "n": 0})
    err = info.value
    assert err.state == {"score": 0.5, "n": 4}
    assert err.best_state == {"score": 0.5, "n": 1}
    assert run_row(db, err.run_id)[:2] == ("stalled", 4)  # type: ignore[arg-type]
    with pytest.raises(StallError):
        stuck.resume(err.run_id)  # type: ignore[arg-type]
    assert run_row(db, err.run_id)[1] == 7  # type: ignore[arg-type]


def test_resume_of_completed_run_runs_nothing(db: str) -> None:
    """Resuming a completed run returns its final state without running a step."""
    calls = []

    @loop(checkpoint=db, converge_on=predicate(lambda h: len(h) == 2))
    def two(state: dict[str, int]) -> dict[str, int]:
        calls.append(1)
        return {"n": state["n"] + 1}

    result = two.run({"n": 0})
    assert two.resume(result.run_id) == {"n": 2}
    assert len(calls) == 2


def test_resume_by_another_function_is_refused(db: str) -> None:
    """A different function may not continue a run unless force=True."""

    @loop(checkpoint=db, budget=Budget(iterations=1))
    def one(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    @loop(checkpoint=db, budget=Budget(iterations=2))
    def other(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 10}

    rid = one.run({"n": 0}).run_id
    with pytest.raises(loomc.SpecMismatch, match="force=True"):
        other.resume(rid)
    assert other.resume_run(rid, force=True, budget=Budget(iterations=2)).state == {"n": 11}


def test_run_id_given_by_caller_makes_the_call_idempotent(db: str) -> None:
    """Calling with an existing run_id continues that run instead of starting another."""

    @loop(checkpoint=db, converge_on=predicate(lambda h: h[-1].state["n"] >= 2))
    def job(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    assert job({"n": 0}, run_id="nightly-2026-11-25") == {"n": 2}
    assert job({"n": 0}, run_id="nightly-2026-11-25") == {"n": 2}
    assert [r.id for r in SQLiteStore(db).list_runs()] == ["nightly-2026-11-25"]


def test_database_is_created_at_first_run_not_at_decoration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decorating creates nothing; the first run creates .loomc/checkpoints.db under the cwd."""
    monkeypatch.delenv("LOOMC_DB")
    monkeypatch.chdir(tmp_path)

    @loop(budget=Budget(iterations=1))
    def once(state: dict[str, int]) -> dict[str, int]:
        return state

    assert not (tmp_path / ".loomc").exists()
    once.run({"n": 0})
    assert (tmp_path / ".loomc" / "checkpoints.db").is_file()


@pytest.mark.parametrize(("durability", "expected"), [("power", 2), ("process", 1)])
def test_durability_sets_synchronous(db: str, durability: str, expected: int) -> None:
    """durability="power" is synchronous=FULL (2), "process" is NORMAL (1)."""
    store = SQLiteStore(db, durability=durability)  # type: ignore[arg-type]
    assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == expected
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_memory_checkpoint(tmp_path: Path) -> None:
    """checkpoint="memory" runs with no file at all."""

    @loop(checkpoint="memory", budget=Budget(iterations=3))
    def inc(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    assert inc.run({"n": 0}).state == {"n": 3}
    assert list(tmp_path.iterdir()) == []


# -- resume equivalence: an interrupted-and-resumed run equals an uninterrupted one -------


def _make_runner(db: str, scores: list[float], errors: set[int], interrupt_at: list[int], policy: bool = True) -> Any:
    # without a policy, nothing reads a resumed run's earlier steps until its result is built
    @loop(
        checkpoint=db,
        budget=Budget(iterations=len(scores), usd=100.0),
        scorer=lambda s: s["score"],
        backtrack=[BestScore(), LastGood(max_consecutive_errors=len(scores) + 1)] if policy else None,
        converge_on=score_plateau(patience=4, min_delta=0.001) if policy else None,
        name="equivalence",
    )
    def step(state: dict[str, Any]) -> dict[str, Any]:
        run = loomc.current_run()
        assert run is not None
        n = run.step
        if interrupt_at and n == interrupt_at[0]:
            interrupt_at.pop()
            raise KeyboardInterrupt
        loomc.charge(0.01 * (n % 3 + 1))
        if n in errors:
            raise RuntimeError(f"boom at {n}")
        return {"trail": [*state["trail"], n], "score": scores[n]}

    return step


@given(
    scores=st.lists(st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9]), min_size=2, max_size=12),
    errors=st.sets(st.integers(min_value=0, max_value=11), max_size=3),
    k=st.integers(min_value=0, max_value=11),
    policy=st.booleans(),
)
@settings(max_examples=40, deadline=None)
def test_resume_after_any_step_equals_uninterrupted(
    tmp_path_factory: pytest.TempPathFactory, scores: list[float], errors: set[int], k: int, policy: bool
) -> None:
    """Interrupt after any step k, resume: same step history, same final state, same cost,
    same best step (the resumed run's earlier steps are read from the store when needed)."""
    d = tmp_path_factory.mktemp("eq")
    whole = _make_runner(str(d / "a.db"), scores, errors, [], policy).run({"trail": [], "score": 0.0})
    k = k % whole.steps  # interrupt before a step the whole run did start
    runner = _make_runner(str(d / "b.db"), scores, errors, [k], policy)
    with pytest.raises(KeyboardInterrupt):
        runner.run({"trail": [], "score": 0.0})
    rid = SQLiteStore(d / "b.db").list_runs()[0].id
    resumed = runner.resume_run(rid)
    assert resumed.state == whole.state
    assert resumed.status == whole.status
    assert resumed.cost_usd == pytest.approx(whole.cost_usd)
    assert rows(str(d / "b.db"), rid) == rows(str(d / "a.db"), whole.run_id)
    assert [(h.step_n, h.score, h.error) for h in resumed.history] == [(h.step_n, h.score, h.error) for h in whole.history]
    assert (resumed.best_score, resumed.best_state) == (whole.best_score, whole.best_state)
