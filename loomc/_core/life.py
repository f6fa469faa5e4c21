"""Replying to a waiting run and forking a run: what ``fn.reply``/``fn.fork`` and the CLI share.

Both work on any store with the optional :class:`~loomc.store.protocol.RunLifeStore`
methods (loomc's SQLite and memory stores have them).
"""

from __future__ import annotations

from typing import Any

from loomc._core.budget import Budget
from loomc._core.errors import LoomcError, StateError
from loomc._core.human import pending_in, validate_answer
from loomc.store import codec
from loomc.store.protocol import Question, new_run_id

__all__ = ["fork_run", "reply_to"]


def _life(store: Any, method: str, what: str) -> Any:
    fn = getattr(store, method, None)
    if not callable(fn):
        raise LoomcError(
            f"the checkpoint store {store!r} cannot {what} (it has no {method}()): use the SQLite store, "
            "MemoryStore, or add the methods of loomc.store.protocol.RunLifeStore"
        )
    return fn


def reply_to(store: Any, run_id: str, answer: Any) -> Question:
    """Answer the question the run (or a run below it) waits on; the question answered.

    Raises:
        RunNotFound: no such run.
        LoomcError: the run waits for no answer, or several runs below it do (reply to one of them).
        InvalidAnswer: the answer does not fit the question's schema (nothing is stored).
    """
    questions = _life(store, "questions", "keep questions")
    full = store.resolve(run_id)
    pending = pending_in(questions(full, True))
    if not pending:
        info = store.get_run(full)
        status = info.status.value if info is not None else "unknown"
        raise LoomcError(
            f"run {full} waits for no answer (status {status}); `loomc runs --status waiting` lists the runs that do"
        )
    if len(pending) > 1:
        listed = "; ".join(f"run {q.run_id} step {q.step_n}: {q.text!r}" for q in pending[:10])
        raise LoomcError(
            f"{len(pending)} runs under run {full} wait for an answer ({listed}); reply to each by its own run id"
        )
    q = pending[0]
    text = validate_answer(q, answer)
    _life(store, "answer", "store answers")(q, text)
    return q


def edited_state(store: Any, run_id: str, state: Any) -> str | bytes:
    """``state`` as run ``run_id`` stores its states, checked against the run's state type.

    Raises:
        StateError: the state does not fit the run's state type, or cannot be serialised.
    """
    stored = store.stored_input(run_id)
    ref = stored.state_type if stored is not None else "json"
    cls = codec.require_type(ref, run_id)
    if cls is not None and not isinstance(state, cls):
        try:
            state = codec.decode(codec.encode(state), ref)
        except StateError as exc:
            raise StateError(f"the edited state does not fit run {run_id}'s state type {ref}: {exc}") from exc
    return codec.encode(state)


def fork_run(
    store: Any, run_id: str, *, at_step: int, state: Any = None, state_given: bool = False,
    budget: Budget | None = None,
) -> str:
    """Fork run ``run_id`` at step ``at_step`` (an edited ``state`` when ``state_given``); the new run's id."""
    fork = _life(store, "fork", "fork runs")
    if budget is not None and not isinstance(budget, Budget):
        raise TypeError(f"budget={budget!r}: expected loomc.Budget(...)")
    full = store.resolve(run_id)
    blob = edited_state(store, full, state) if state_given else None
    limits = None
    if budget is not None:
        info = store.get_run(full)
        limits = Budget.merged(info.budget if info is not None else None, budget).to_dict()
    return fork(full, at_step, new_run_id=new_run_id(), state_blob=blob, budget=limits)  # type: ignore[no-any-return]
