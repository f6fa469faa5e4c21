"""loomc.ask: a step asks a person, the run waits, a reply and a resume carry it on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Literal

import anyio
import pydantic
import pytest

import loomc
from loomc import Budget, InvalidAnswer, LoomcError, RunStatus, WaitingForInput, ask, loop, predicate
from loomc.store.open import open_store

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


class Approval(pydantic.BaseModel):
    """The answer a reviewer gives."""

    approved: bool
    note: str = ""


#: converged after its first step: a loop of one step completes
ONCE = predicate(lambda history: True)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database, as ``checkpoint=`` and ``--db`` name it: a SQLite file, or a PostgreSQL DSN (its own schema)."""
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_dsn"))
    return str(tmp_path / "loomc.db")


def cli(*args: str, db: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``loomc ARGS --db DB`` in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "loomc", *args, "--db", db], capture_output=True, text=True, env=ENV, input=stdin, timeout=60
    )


def approval_loop(db: str, calls: list[int] | None = None) -> Any:
    """Two steps; step 1 asks for approval (charging before it asks)."""

    @loop(budget=Budget(iterations=5, usd=1.0), checkpoint=db, name="tests:approval",
          converge_on=predicate(lambda h: h[-1].state["n"] >= 3))
    def draft(state: dict[str, Any]) -> dict[str, Any]:
        loomc.charge(0.01)
        if calls is not None:
            calls.append(state["n"])
        if state["n"] == 1:
            answer = ask("send this draft?", schema=Approval)
            state = {**state, "approved": answer.approved, "note": answer.note}
        return {**state, "n": state["n"] + 1}

    return draft


def test_waiting_run_stores_question_and_discards_the_step(db: str) -> None:
    """No answer: .run() returns waiting; the step is not committed nor counted; its charge is kept."""
    draft = approval_loop(db)
    result = draft.run({"n": 0})
    assert result.status is RunStatus.WAITING
    assert isinstance(result.error, WaitingForInput)
    assert result.error.question == "send this draft?"
    info = draft.store().get_run(result.run_id)
    assert info.status is RunStatus.WAITING
    assert info.steps == 1  # step 0 only: the asking step is not counted
    assert info.cost_usd == pytest.approx(0.02)  # ... but what it charged is spent
    assert [s.step_n for s in draft.store().load_steps(result.run_id)] == [0]
    (q,) = draft.store().questions(result.run_id)
    assert (q.step_n, q.call_index, q.text, q.answer) == (1, 0, "send this draft?", None)
    assert json.loads(q.json_schema)["required"] == ["approved"]


def test_call_raises_waiting_for_input(db: str) -> None:
    """__call__ raises WaitingForInput, a LoomcError carrying the run id and the question."""
    draft = approval_loop(db)
    with pytest.raises(WaitingForInput) as caught:
        draft({"n": 0})
    assert isinstance(caught.value, LoomcError)
    assert caught.value.question == "send this draft?"
    assert draft.store().get_run(caught.value.run_id).status is RunStatus.WAITING
    assert f"loomc reply {caught.value.run_id}" in str(caught.value)


def test_reply_then_resume_returns_the_answer(db: str) -> None:
    """The reply is validated, stored; the resumed step gets it as the schema's type."""
    calls: list[int] = []
    draft = approval_loop(db, calls)
    rid = draft.run({"n": 0}).run_id
    draft.reply(rid, {"approved": True, "note": "ship it"})
    state = draft.resume(rid)
    assert state == {"n": 3, "approved": True, "note": "ship it"}
    assert calls == [0, 1, 1, 2]  # step 1 ran twice: once to ask, once with the answer
    info = draft.store().get_run(rid)
    assert info.steps == 3
    assert info.cost_usd == pytest.approx(0.04)  # the discarded attempt's charge stays spent


def test_resume_without_an_answer_does_not_run_the_step(db: str) -> None:
    """Resuming a run that still waits returns waiting at once, without running (or charging) again."""
    calls: list[int] = []
    draft = approval_loop(db, calls)
    rid = draft.run({"n": 0}).run_id
    again = draft.resume_run(rid)
    assert again.status is RunStatus.WAITING
    assert calls == [0, 1]
    assert draft.store().get_run(rid).cost_usd == pytest.approx(0.02)


def test_wrong_answer_is_refused_and_nothing_stored(db: str) -> None:
    """An answer the schema refuses raises InvalidAnswer (a ValueError) and stores nothing."""
    draft = approval_loop(db)
    rid = draft.run({"n": 0}).run_id
    with pytest.raises(InvalidAnswer) as caught:
        draft.reply(rid, {"approved": "perhaps"})
    assert isinstance(caught.value, ValueError)
    assert "nothing was stored" in str(caught.value)
    (q,) = draft.store().questions(rid)
    assert q.answer is None
    assert draft.store().get_run(rid).status is RunStatus.WAITING


def test_reply_to_a_run_that_does_not_wait(db: str) -> None:
    """A reply to a run with no open question is a clear error; a second reply too."""

    @loop(budget=Budget(iterations=1), converge_on=ONCE, checkpoint=db)
    def plain(state: int) -> int:
        return state + 1

    rid = plain.run(0).run_id
    with pytest.raises(LoomcError, match="waits for no answer"):
        plain.reply(rid, 1)
    draft = approval_loop(db)
    waiting = draft.run({"n": 0}).run_id
    draft.reply(waiting, {"approved": False})
    with pytest.raises(LoomcError, match="waits for no answer"):
        draft.reply(waiting, {"approved": True})


def test_two_asks_in_one_step(db: str) -> None:
    """Each ask of a step has its own answer, by call order; the second waits after the first is answered."""

    @loop(budget=Budget(iterations=1), converge_on=ONCE, checkpoint=db)
    def pick(state: dict[str, Any]) -> dict[str, Any]:
        colour = ask("which colour?", schema=Literal["red", "blue"])
        size = ask("how many?", schema=int)
        return {"colour": colour, "size": size}

    rid = pick.run({}).run_id
    pick.reply(rid, "blue")
    second = pick.resume_run(rid)
    assert second.status is RunStatus.WAITING
    assert second.error.question == "how many?"
    with pytest.raises(InvalidAnswer):
        pick.reply(rid, "three")
    pick.reply(rid, 3)
    assert pick.resume(rid) == {"colour": "blue", "size": 3}
    asked = pick.store().questions(rid)
    assert [(q.step_n, q.call_index, json.loads(q.answer)) for q in asked] == [(0, 0, "blue"), (0, 1, 3)]


def test_ask_survives_except_exception_in_the_step(db: str) -> None:
    """A step's own `except Exception` does not swallow the wait."""

    @loop(budget=Budget(iterations=1), converge_on=ONCE, checkpoint=db)
    def careful(state: int) -> int:
        try:
            return int(ask("a number?", schema=int))
        except Exception:
            return -1

    result = careful.run(0)
    assert result.status is RunStatus.WAITING
    careful.reply(result.run_id, 7)
    assert careful.resume(result.run_id) == 7


def test_ask_outside_a_step_and_bad_arguments() -> None:
    """Outside a step, an empty question or a schema pydantic cannot describe: clear errors."""
    with pytest.raises(LoomcError, match="outside a step"):
        ask("anyone?")

    @loop(budget=Budget(iterations=1), converge_on=ONCE, checkpoint="memory")
    def bad(state: int) -> int:
        ask("", schema=int)
        return state

    with pytest.raises(ValueError, match="non-empty"):
        bad(0)

    @loop(budget=Budget(iterations=1), converge_on=ONCE, checkpoint="memory")
    def odd(state: int) -> int:
        ask("what?", schema=object())
        return state

    with pytest.raises(ValueError, match="JSON schema"):
        odd(0)


def test_memory_store_asks_too() -> None:
    """The memory store keeps questions and answers for the life of the process."""

    @loop(budget=Budget(iterations=1), converge_on=ONCE, checkpoint="memory")
    def yes(state: int) -> bool:
        return bool(ask("yes?", schema=bool))

    rid = yes.run(0).run_id
    yes.reply(rid, True)
    assert yes.resume(rid) is True


def test_waiting_time_is_not_wall_clock(db: str) -> None:
    """A run waiting longer than its wall-clock limit is not exhausted by the wait."""

    @loop(budget=Budget(iterations=2, wall_clock="1s"), checkpoint=db)
    def quick(state: int) -> int:
        if state == 1:
            return int(ask("go on?", schema=int))
        return state + 1

    rid = quick.run(0).run_id
    time.sleep(1.2)  # longer than the whole budget
    quick.reply(rid, 5)
    result = quick.resume_run(rid)
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert result.stop_reason == "budget: iterations"
    assert result.state == 5


def test_ask_inside_a_nested_loop(db: str) -> None:
    """A nested loop's question makes its parent wait; replying to the root answers it; resume goes on."""

    @loop(budget=Budget(iterations=1), converge_on=ONCE, checkpoint=db, name="tests:inner")
    def inner(state: int) -> int:
        return state + int(ask("add how much?", schema=int))

    @loop(budget=Budget(iterations=2), checkpoint=db, name="tests:outer", converge_on=predicate(lambda h: len(h) >= 2))
    def outer(state: int) -> int:
        return int(inner(state))

    result = outer.run(1)
    assert result.status is RunStatus.WAITING
    store = outer.store()
    (child,) = store.children(result.run_id)
    assert child.status is RunStatus.WAITING
    assert result.error.asking_run_id == child.id
    with pytest.raises(WaitingForInput):
        outer.resume(result.run_id)  # still unanswered: nothing runs
    outer.reply(result.run_id, 10)  # the root's id finds the one open question below it
    second = outer.resume_run(result.run_id)
    assert second.status is RunStatus.WAITING  # step 1 starts a new inner run, which asks again
    outer.reply(result.run_id, 100)
    assert outer.resume(result.run_id) == 111


def test_ask_inside_a_graph_node_other_branches_finish(db: str) -> None:
    """A waiting node makes the graph wait; the other branch completes; resume runs the rest."""
    from orchestration import Graph

    ran: list[str] = []

    @loop(budget=Budget(iterations=1), converge_on=ONCE, checkpoint=db, name="tests:gate")
    def gate(state: dict[str, Any]) -> dict[str, Any]:
        ran.append("gate")
        return {"go": ask("publish?", schema=bool)}

    @loop(budget=Budget(iterations=1), converge_on=ONCE, checkpoint=db, name="tests:side")
    def side(state: dict[str, Any]) -> dict[str, Any]:
        ran.append("side")
        return {"side": True}

    @loop(budget=Budget(iterations=1), converge_on=ONCE, checkpoint=db, name="tests:publish")
    def publish(state: dict[str, Any]) -> dict[str, Any]:
        ran.append("publish")
        return {"published": state["go"]}

    graph = Graph("tests-approval", checkpoint=db)
    graph.add(gate)
    graph.add(side)
    graph.add(publish, after=gate)
    first = graph.run({})
    assert first.status is RunStatus.WAITING
    assert first.nodes["side"].status is RunStatus.COMPLETED
    assert first.nodes["gate"].status is RunStatus.WAITING
    assert first.nodes["publish"].status == "pending"
    assert sorted(ran) == ["gate", "side"]
    gate.reply(first.run_id, True)
    done = graph.resume(first.run_id)
    assert done.status is RunStatus.COMPLETED
    assert done.outputs["publish"] == {"published": True}
    assert sorted(ran) == ["gate", "gate", "publish", "side"]  # the finished branch did not run again


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
def test_async_ask(db: str, anyio_backend: str) -> None:
    """An async step asks the same way, on asyncio and on trio; areply works from async code."""

    @loop(budget=Budget(iterations=1), converge_on=ONCE, checkpoint=db)
    async def confirm(state: int) -> int:
        await anyio.sleep(0)
        return state + int(ask("how many more?", schema=int))

    async def main() -> tuple[Any, int]:
        first = await confirm.run(1)
        with pytest.raises(WaitingForInput):
            await confirm.resume(first.run_id)
        await confirm.areply(first.run_id, 41)
        return first, await confirm.resume(first.run_id)

    first, final = anyio.run(main, backend=anyio_backend)
    assert first.status is RunStatus.WAITING
    assert final == 42


SUBJECT = textwrap.dedent(
    """
    import sys, time
    import loomc
    from loomc import Budget, loop, ask

    @loop(budget=Budget(iterations=2), checkpoint=sys.argv[1], name="tests:killed",
          converge_on=loomc.predicate(lambda h: h[-1].state["n"] >= 2))
    def work(state):
        loomc.charge(0.5)
        if state["n"] == 1:
            state = {**state, "answer": ask("continue?", schema=str)}
        return {**state, "n": state["n"] + 1}

    if len(sys.argv) > 2:
        print(work.resume(sys.argv[2]))
    else:
        result = work.run({"n": 0})
        print(result.run_id, result.status.value, flush=True)
        time.sleep(60)  # still alive while waiting: killed by the test
    """
)


@pytest.mark.parametrize("answer_first", [True, False])
def test_answer_survives_sigkill_of_the_waiting_process(tmp_path: Path, db: str, answer_first: bool) -> None:
    """Kill -9 the process that waits (the answer given before or after); a new process resumes with it."""
    script = tmp_path / "subject.py"
    script.write_text(SUBJECT)
    proc = subprocess.Popen([sys.executable, str(script), db], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout is not None
    run_id, status = proc.stdout.readline().split()
    assert status == "waiting"
    if answer_first:
        assert cli("reply", run_id, '"yes"', db=db).returncode == 0
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    if not answer_first:
        listed = cli("runs", "--status", "waiting", db=db)
        assert run_id in listed.stdout
        assert cli("reply", run_id[:6], '"yes"', db=db).returncode == 0
    out = subprocess.run([sys.executable, str(script), db, run_id], capture_output=True, text=True, env=ENV, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "{'n': 2, 'answer': 'yes'}"
    info = open_store(db).get_run(run_id)
    assert (info.status, info.cost_usd) == (RunStatus.COMPLETED, 1.5)


def test_cli_reply_show_and_runs(db: str, tmp_path: Path) -> None:
    """`loomc runs --status waiting`, `show` (question escaped), `reply` with JSON or --file, refusals."""

    @loop(budget=Budget(iterations=1), converge_on=ONCE, checkpoint=db, name="tests:cli")
    def review(state: dict[str, Any]) -> dict[str, Any]:
        return {"verdict": ask("ok?\x1b[2J really", schema=Approval).approved}

    rid = review.run({}).run_id
    listed = cli("runs", "--status", "waiting", db=db)
    assert rid in listed.stdout
    shown = cli("show", rid, db=db)
    assert "ok?\\x1b[2J really" in shown.stdout
    assert "\x1b[2J" not in shown.stdout
    assert f"loomc reply {rid}" in shown.stdout
    data = json.loads(cli("show", rid, "--json", db=db).stdout)
    assert data["questions"][0]["question"] == "ok?\x1b[2J really"
    wrong = cli("reply", rid, '{"approved": "x"}', db=db)
    assert wrong.returncode != 0
    assert wrong.stderr.count("\n") == 1
    assert "Traceback" not in wrong.stderr
    assert "nothing was stored" in wrong.stderr
    bad_json = cli("reply", rid, "{nope", db=db)
    assert bad_json.returncode != 0
    assert "not valid JSON" in bad_json.stderr
    answer = tmp_path / "answer.json"
    answer.write_text('{"approved": true}')
    ok = cli("reply", rid, "--file", str(answer), db=db)
    assert ok.returncode == 0, ok.stderr
    assert f"loomc resume {rid} --run" in ok.stdout
    again = cli("reply", rid, '{"approved": true}', db=db)
    assert again.returncode != 0
    assert "waits for no answer" in again.stderr
    assert review.resume(rid) == {"verdict": True}
    assert open_store(db).get_run(rid).status is RunStatus.COMPLETED
