"""Asking a person from inside a step: ``loomc.ask``, and checking the reply against its schema.

``ask`` never touches the store. A run's answers are read when the run (re)starts and
kept in its :class:`~loomc._core.engine.RunContext`; a question without an answer stops
the step with :class:`AskPending`, which the run protocol turns into the run's
``waiting`` status, with the question stored (``CheckpointStore.wait_for_input``).
"""

from __future__ import annotations

import json
from typing import Any

from loomc._core.context import current_ledger
from loomc._core.errors import InvalidAnswer, LoomcError
from loomc.store.protocol import Question

__all__ = ["AskPending", "ask", "describe_schema", "pending_in", "validate_answer"]

#: Schemas met by ``ask`` in this process, by ``module:qualname`` (a reply in the same
#: process is checked by the very class, custom validators included).
_schemas: dict[str, Any] = {}


class AskPending(BaseException):
    """A step asked a question that has no answer yet: the step stops, the run waits.

    A ``BaseException`` so that a step's own ``except Exception`` does not swallow it (as
    with ``KeyboardInterrupt``). ``question.run_id`` is the run that asked; a parent whose
    step ran that run sees the same signal and waits too.
    """

    def __init__(self, question: Question) -> None:
        super().__init__(question.text)
        self.question = question


def describe_schema(schema: Any) -> tuple[str | None, str | None]:
    """``(class reference, JSON schema text)`` of an answer schema (``None, None``: any JSON).

    Raises:
        ValueError: pydantic cannot describe ``schema`` as a JSON schema.
    """
    if schema is None:
        return None, None
    from pydantic import TypeAdapter

    try:
        json_schema = json.dumps(TypeAdapter(schema).json_schema(), sort_keys=True)
    except Exception as exc:
        raise ValueError(
            f"schema={schema!r}: pydantic cannot describe it as a JSON schema ({exc}); pass a pydantic model "
            "or a type such as bool, int, list[str] or Literal['yes', 'no']"
        ) from exc
    ref = None
    if isinstance(schema, type) and schema.__module__ != "builtins":
        ref = f"{schema.__module__}:{schema.__qualname__}"
        _schemas[ref] = schema
    return ref, json_schema


def ask(question: str, *, schema: Any = None) -> Any:
    """Ask a person ``question`` from inside a step; returns their answer once given.

    The first time the step runs, there is no answer: the step stops here (it is not
    counted as an iteration; what it already charged stays spent), the run's status
    becomes ``waiting`` with the question stored, ``fn.run()`` returns that status and
    ``fn(state)`` raises :class:`~loomc.WaitingForInput`. ``fn.reply(run_id, answer)``
    (or ``loomc reply RUN_ID 'JSON'``) stores an answer; resuming the run runs the step
    again, and this call returns the answer. Answers are kept per step and call order,
    so a step may ask several questions. Works the same in ``async def`` steps (no await).

    Args:
        question: what to ask (shown by ``loomc show`` and ``loomc runs --status waiting``).
        schema: the answer's type — a pydantic model, or any type pydantic validates
            (``bool``, ``list[str]``, ``Literal["yes", "no"]``...). The reply is checked
            against it, and the answer comes back as that type. ``None``: any JSON value.

    Raises:
        LoomcError: called outside a loop's step, or the store keeps no questions.
        ValueError: ``question`` is empty, or ``schema`` is not a type pydantic describes.
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question={question!r}: ask a non-empty string")
    ledger = current_ledger()
    ctx = ledger.context if ledger is not None else None
    if ctx is None or not ctx.in_step or getattr(ctx, "answers", None) is None:
        raise LoomcError(
            "loomc.ask() was called outside a step: call it inside the function decorated with @loop "
            "(in the thread or task that runs the step)"
        )
    ref, json_schema = describe_schema(schema)
    index = ctx.next_ask_index()
    stored = ctx.answers.get((ctx.step_n, index))
    if stored is not None:
        return _decoded(stored, schema, ctx.run_id, ctx.step_n)
    if not callable(getattr(ctx.store, "wait_for_input", None)):
        raise LoomcError(
            f"the checkpoint store {ctx.store!r} keeps no questions (it has no wait_for_input): use the SQLite "
            "store (the default), MemoryStore, or add the methods of loomc.store.protocol.RunLifeStore"
        )
    raise AskPending(Question(ctx.run_id, ctx.step_n, index, question, ref, json_schema, ""))


def _decoded(text: str, schema: Any, run_id: str, step_n: int) -> Any:
    value = json.loads(text)
    if schema is None:
        return value
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(schema).validate_python(value)
    except ValidationError as exc:
        raise LoomcError(
            f"the stored answer to run {run_id}'s question at step {step_n} does not fit the schema the step "
            f"asks with now ({exc.error_count()} error(s): {exc.errors()[0]['msg']}); the schema changed since "
            "the answer was given: accept the stored form in the step, or fork the run before that step"
        ) from exc


def validate_answer(question: Question, answer: Any) -> str:
    """The answer as stored (JSON text), checked against the question's schema.

    The schema's class is used when this process knows it (the run's own process, or an
    importable module); otherwise the JSON schema stored with the question.

    Raises:
        InvalidAnswer: the answer does not fit (nothing is stored).
    """
    from pydantic import TypeAdapter, ValidationError
    from pydantic_core import to_jsonable_python

    cls = _schema_class(question.schema_ref)
    if cls is not None:
        adapter: TypeAdapter[Any] = TypeAdapter(cls)
        try:
            value = adapter.validate_python(answer)
        except ValidationError as exc:
            raise InvalidAnswer(_refused(question, "; ".join(_messages(exc)))) from exc
        return adapter.dump_json(value).decode()
    try:
        plain = to_jsonable_python(answer)
        text = json.dumps(plain, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidAnswer(_refused(question, f"it is not JSON ({exc})")) from exc
    if question.json_schema:
        import jsonschema

        errors = sorted(
            jsonschema.Draft202012Validator(json.loads(question.json_schema)).iter_errors(plain), key=lambda e: list(e.path)
        )
        if errors:
            raise InvalidAnswer(_refused(question, "; ".join(
                f"{'/'.join(map(str, e.path)) or 'answer'}: {e.message}" for e in errors[:5]
            )))
    return text


def _messages(exc: Any) -> list[str]:
    return [f"{'.'.join(map(str, e['loc'])) or 'answer'}: {e['msg']}" for e in exc.errors()[:5]]


def _refused(question: Question, why: str) -> str:
    return (
        f"the answer does not fit the schema of run {question.run_id}'s question {question.text!r}: {why}; "
        "nothing was stored — reply again with an answer that fits"
        + (f" (JSON schema: {question.json_schema})" if question.json_schema else "")
    )


def _schema_class(ref: str | None) -> Any:
    """The class named by ``ref``: known to this process, or imported (never ``__main__``'s)."""
    if ref is None:
        return None
    if ref in _schemas:
        return _schemas[ref]
    module, _, qualname = ref.partition(":")
    if module == "__main__":
        return None
    import importlib

    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):  # the JSON schema stored with the question decides
        return None
    return obj if isinstance(obj, type) else None


def pending_in(questions: list[Question]) -> list[Question]:
    """The questions not answered yet."""
    return [q for q in questions if q.answer is None]
