"""``@loop`` and its two thin drivers, :class:`LoopRunner` and :class:`AsyncLoopRunner`.

Both drivers only move data between the run protocol (``_engine``), the store and the
user's function; every decision is made once, in the protocol and the policy core.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import os
import signal
import threading
import time
import warnings
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any, Generic, TypeVar, overload

from loomc._core.budget import Budget
from loomc._core.context import _current_ledger
from loomc._core.engine import CallOp, RunRequest, RunSpec, SleepOp, StoreCall, WallClockExceeded, run_protocol
from loomc._core.errors import BudgetExhausted, StallError, UnboundedLoopWarning, WaitingForInput
from loomc._core.human import AskPending
from loomc._core.observe import RunEvent
from loomc._core.policy import Policy
from loomc._core.retry import Retry, as_retry
from loomc._core.types import RunResult, RunStatus
from loomc.store.sqlite.sync import MemoryStore, open_store

__all__ = ["AsyncLoopRunner", "LoopRunner", "loop"]

_memory_lock = threading.Lock()  # two threads' first runs of a memory loop share one store

S = TypeVar("S")

_UNSET: Any = object()  # ``fork(state=...)`` not given (``None`` may be a state)


def _spec(
    fn: Callable[..., Any], policy: Policy, scorer: Any, cost_fn: Any, checkpoint: Any, durability: Any, name: str | None,
    retry: Retry | None = None,
) -> RunSpec:
    qualname = name or f"{fn.__module__}:{fn.__qualname__}"
    meta: dict[str, Any] = {}
    code = getattr(fn, "__code__", None)
    if code is not None:
        meta["file"] = code.co_filename
    return RunSpec(
        name=qualname,
        spec_hash=hashlib.sha256(qualname.encode(errors="backslashreplace")).hexdigest()[:12],
        policy=policy,
        scorer=scorer,
        cost_fn=cost_fn,
        checkpoint=checkpoint,
        durability=durability,
        meta=meta,
        retry=retry,
    )


class _BaseRunner(Generic[S]):
    """What both drivers share: the declaration and turning results into returns/raises."""

    def __init__(self, fn: Callable[..., Any], spec: RunSpec) -> None:
        self._fn = fn
        self.spec = spec
        self._resolved: dict[str, Any] = {}  # absolute database path -> its store
        self._memory: MemoryStore | None = None  # checkpoint="memory": this loop's runs, for resume
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    @property
    def name(self) -> str:
        """The run name stored for this loop (``module:qualname``)."""
        return self.spec.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec.name}>"

    def store(self) -> Any:
        """The checkpoint store this loop writes to (opened on first use).

        With ``checkpoint="memory"`` it is one :class:`MemoryStore` per loop, kept for the
        life of the process, so that a run of the loop can be resumed in the same process.
        """
        if isinstance(self.spec.checkpoint, str) and self.spec.checkpoint == "memory":
            if self._memory is None:
                with _memory_lock:
                    if self._memory is None:
                        self._memory = MemoryStore()
            return self._memory
        return open_store(self.spec.checkpoint, self.spec.durability)  # type: ignore[arg-type]

    def _fixed_path(self) -> str | None:
        """The database path when it cannot change between runs (absolute), else ``None``."""
        cp = self.spec.checkpoint
        if cp is None or cp == "sqlite":
            cp = os.environ.get("LOOMC_DB")
        if isinstance(cp, (str, os.PathLike)) and cp != "memory" and os.path.isabs(cp):
            return os.fspath(cp)
        return None

    def _request(self, state: Any, run_id: str | None, resume: bool, budget: Budget | None, force: bool) -> RunRequest:
        if budget is not None and not isinstance(budget, Budget):
            raise TypeError(f"budget={budget!r}: expected loomc.Budget(...)")
        return RunRequest(state=state, run_id=run_id, resume=resume, budget=budget, force=force)

    def reply(self, run_id: str, answer: Any) -> None:
        """Answer the question run ``run_id`` waits on (``loomc.ask``); resume the run to continue.

        Args:
            run_id: the waiting run's id (or a unique prefix), or the id of a run above it.
            answer: the answer, checked against the question's ``schema`` (a model
                instance, or its fields as a dict; any JSON value without a schema).

        Raises:
            InvalidAnswer: the answer does not fit the schema (nothing is stored).
            LoomcError: the run waits for no answer.
        """
        from loomc._core.life import reply_to

        reply_to(self.store(), run_id, answer)

    def fork(self, run_id: str, *, at_step: int, state: Any = _UNSET, budget: Budget | None = None) -> str:
        """A new run whose history is run ``run_id``'s steps 0..``at_step``; its id (resume it to continue).

        The original is not changed; the fork shares its stored states (nothing large is
        copied). It continues from where the original stood after step ``at_step``.

        Args:
            run_id: the run to fork (id or unique prefix): a top-level loop run.
            at_step: the last step the fork keeps (0 .. the original's last step).
            state: the state to continue from instead (checked like any state).
            budget: limits that replace the original's (what it had used at ``at_step`` carries over).

        Raises:
            ValueError: ``at_step`` is not one of the run's steps.
            LoomcError: a nested run or a graph run (see ``docs/fork-and-prune.md``).
        """
        from loomc._core.life import fork_run

        return fork_run(self.store(), run_id, at_step=at_step, state=None if state is _UNSET else state,
                        state_given=state is not _UNSET, budget=budget)

    def _child_protocol(
        self, state: Any, call_index: int, kind: str, meta: dict[str, Any] | None, budget: Budget | None = None
    ) -> Generator[Any, Any, RunResult]:
        """The run protocol of this loop as the child at ``call_index`` of the current parent step.

        ``budget`` replaces the limits of a child that resumes (a graph resumed with new limits).
        """
        parent = _current_ledger.get()
        assert parent is not None
        assert parent.context is not None
        assert parent.context.in_step
        spec = dataclasses.replace(self.spec, kind=kind, meta={**self.spec.meta, **(meta or {})})
        return run_protocol(spec, RunRequest(state=state, call_index=call_index, budget=budget), parent, None)

    def _unwrap(self, result: RunResult) -> Any:
        """The final state, or the exception the outcome calls for."""
        st = result.status
        if st is RunStatus.COMPLETED:
            return result.state
        err = result.error
        if st is RunStatus.BUDGET_EXHAUSTED:
            if isinstance(err, BudgetExhausted):
                if err.run_id is None or err.run_id == result.run_id:
                    err.run_id = result.run_id
                    err.state = result.state
                    raise err
                raise err
            raise BudgetExhausted("usd", result.cost_usd, result.cost_usd, run_id=result.run_id, state=result.state)
        if st is RunStatus.WAITING and isinstance(err, WaitingForInput):
            raise err
        if st is RunStatus.STALLED:
            after = self.spec.policy.on_stall.after if self.spec.policy.on_stall else 0
            raise StallError(after, run_id=result.run_id, state=result.state, best_state=result.best_state)
        if err is not None:
            if not any(str(n).startswith("loomc:") for n in getattr(err, "__notes__", [])):
                err.add_note(
                    f"loomc: run {result.run_id} ({self.spec.name}) failed at step {result.steps - 1}; "
                    f"fix the cause, then resume it with {self._fn.__name__}.resume({result.run_id!r}) "
                    f"or `loomc resume {result.run_id}`"
                )
            raise err
        raise RuntimeError(f"run {result.run_id} ended {st.value}")  # pragma: no cover


class _SigTerm:
    """Turn SIGTERM and SIGINT (Ctrl-C) into KeyboardInterrupt where the run can record it.

    Active while a root run is driven on the main thread, for each signal whose handler is
    Python's default (a handler the application installed is left alone).
    """

    def __init__(self) -> None:
        self.prev: dict[int, Any] = {}

    # While the main thread is inside a store call, a signal is held (so a commit is never
    # cut short) and delivered where the run can record it: instead of the next step.
    defer = False
    pending: int | None = None  # the signal held, if any

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            try:
                for signum, default in ((signal.SIGTERM, (signal.SIG_DFL, None)), (signal.SIGINT, (signal.default_int_handler,))):
                    if signal.getsignal(signum) in default:
                        self.prev[signum] = signal.signal(signum, _raise_interrupt)
                if self.prev:
                    _SigTerm.pending = None
            except ValueError:  # pragma: no cover - not the main interpreter
                pass

    def __exit__(self, *exc: Any) -> None:
        for signum, prev in self.prev.items():
            signal.signal(signum, prev)
        if self.prev and _SigTerm.pending is not None:  # held while the run ended with an error: deliver it now
            raise _interrupt(_take_pending())


def _interrupt(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else KeyboardInterrupt(signal.Signals(signum).name)


def _take_pending() -> int:
    signum = _SigTerm.pending
    _SigTerm.pending = None
    assert signum is not None
    return signum


def _raise_interrupt(signum: int, frame: Any) -> None:
    if _SigTerm.defer:
        _SigTerm.pending = signum
        return
    raise _interrupt(signum)


class LoopRunner(_BaseRunner[S]):
    """A sync ``@loop``: call it to run the loop, ``.run`` for a result, ``.resume`` to continue."""

    def __call__(self, state: S, *, run_id: str | None = None) -> S:
        """Run the loop from ``state`` and return the final state.

        Raises:
            BudgetExhausted: a limit stopped the run (its state is kept).
            StallError: ``on_stall`` stopped the run.
            Exception: the step's own exception, with a note naming the run.
        """
        return self._unwrap(self.run(state, run_id=run_id))  # type: ignore[no-any-return]

    def run(self, state: S, *, run_id: str | None = None) -> RunResult:
        """Run the loop and return a :class:`RunResult` (never raises for budget, stall or step errors)."""
        return self._drive(self._request(state, run_id, False, None, False))

    def resume(self, run_id: str, *, budget: Budget | None = None, force: bool = False) -> S:
        """Continue a stopped or crashed run from its last checkpoint; returns the final state.

        Args:
            run_id: the run's id or a unique prefix of it.
            budget: new limits (the only way to get more): the limits it names replace the
                run's own, those it leaves as ``None`` are kept, ``math.inf`` removes one.
                What the run already used is carried over either way.
            force: continue a run started by a different function.
        """
        return self._unwrap(self.resume_run(run_id, budget=budget, force=force))  # type: ignore[no-any-return]

    def resume_run(self, run_id: str, *, budget: Budget | None = None, force: bool = False) -> RunResult:
        """Like :meth:`resume`, returning the :class:`RunResult`."""
        return self._drive(self._request(None, run_id, True, budget, force))

    def stream(self, state: S, *, run_id: str | None = None) -> Generator[RunEvent, None, RunResult]:
        """Run the loop, yielding its events: :class:`RunStarted`, a :class:`StepCommitted` per step
        (with its :class:`StepRecord`), :class:`RunFinished`; those of nested runs in between.

        The loop runs in this thread while you iterate (between two events); events of runs
        nested in a step come when that step returns. Stop iterating early (``break``, or
        ``close()`` on the generator, which ``contextlib.closing`` does for you) and the run
        stops, recorded ``interrupted``: resume it later. The generator's return value
        (``StopIteration.value``, or ``result = yield from fn.stream(...)``) is the
        :class:`RunResult`.
        """
        return self._stream(self._request(state, run_id, False, None, False))

    def stream_resume(
        self, run_id: str, *, budget: Budget | None = None, force: bool = False
    ) -> Generator[RunEvent, None, RunResult]:
        """Like :meth:`stream`, for the resume of a run (see :meth:`resume`)."""
        return self._stream(self._request(None, run_id, True, budget, force))

    def _stream(self, req: RunRequest) -> Generator[RunEvent, None, RunResult]:
        events: list[RunEvent] = []
        req = dataclasses.replace(req, observers=(*req.observers, events.append))
        nested, gen = self._protocol(req)
        with _SigTerm() if not nested else _nullctx():
            result = yield from _driver(gen, self._fn, events)
        if nested:
            _wait_with_parent(result)
        return result

    def _protocol(self, req: RunRequest) -> tuple[bool, Generator[Any, Any, RunResult]]:
        """The run protocol for ``req``, and whether it runs nested in the current step."""
        parent = _current_ledger.get()
        nested = parent is not None and parent.context is not None and parent.context.in_step
        store = None if nested else self.store()
        return nested, run_protocol(self.spec, req, parent, store)

    def _drive(self, req: RunRequest) -> RunResult:
        nested, gen = self._protocol(req)
        with _SigTerm() if not nested else _nullctx():
            result = _drive_sync(gen, self._fn)
        if nested:
            _wait_with_parent(result)
        return result

    def _run_child(
        self, state: Any, *, call_index: int, kind: str = "node", meta: dict[str, Any] | None = None,
        budget: Budget | None = None,
    ) -> RunResult:
        """Run (or resume) as the child at ``call_index`` of the current parent step (graph nodes)."""
        return _drive_sync(self._child_protocol(state, call_index, kind, meta, budget), self._fn)


def _wait_with_parent(result: RunResult) -> None:
    """A loop nested in a step stopped to wait for an answer: the step stops too, and its run waits.

    (A graph's node returns its result instead: the graph's other branches go on.)
    """
    if result.status is RunStatus.WAITING and isinstance(result.error, WaitingForInput):
        pending = result.error.pending
        if pending is not None:
            raise AskPending(pending)


class _nullctx:  # noqa: N801
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _drive_sync(gen: Generator[Any, Any, RunResult], fn: Callable[[Any], Any]) -> RunResult:
    """Drive the run protocol ``gen`` to its end in this thread; returns its result."""
    try:
        next(_driver(gen, fn, None))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    raise AssertionError("a driver with no events to hand out never yields")  # pragma: no cover


def _driver(
    gen: Generator[Any, Any, RunResult], fn: Callable[[Any], Any], events: list[RunEvent] | None
) -> Generator[RunEvent, None, RunResult]:
    """The sync driver: fulfils the protocol's requests; with ``events``, yields them as they come.

    Without ``events`` it never yields (``_drive_sync`` runs it with one ``next``). With them
    (``stream``) it hands out, before each request, the events the run told so far; closed
    there (the consumer stopped iterating), it interrupts the run and records it so.
    """
    send: Any = None
    throw: BaseException | None = None
    held: BaseException | None = None  # a signal held past a store call, delivered here
    main = threading.current_thread() is threading.main_thread()
    outer = _SigTerm.defer
    if main:
        _SigTerm.defer = True  # outside the user's step a SIGTERM waits for the next step
    try:
        while True:
            try:
                op = gen.throw(throw) if throw is not None else gen.send(send)
            except StopIteration as stop:
                if events:
                    yield from _hand_out(events, main, outer)
                if main and _SigTerm.pending is not None and not outer:
                    raise _interrupt(_take_pending()) from None
                return stop.value  # type: ignore[no-any-return]
            except StreamClosed:  # the run is recorded interrupted; close() ends quietly
                return None  # type: ignore[return-value]
            except KeyboardInterrupt as exc:
                if exc is held:  # it was raised here, not in anyone's code: show no loomc internals
                    raise exc.with_traceback(None) from None
                raise
            send, throw = None, None
            if events:
                try:
                    yield from _hand_out(events, main, outer)
                except GeneratorExit:  # the consumer stopped iterating: interrupt the run, record it
                    events = None
                    throw = StreamClosed()
                    continue
            if type(op) is StoreCall:
                try:
                    send = op.fn(*op.args)
                except BaseException as exc:  # noqa: BLE001 - raised inside the protocol, so its cleanup runs now
                    throw = exc
            elif main and _SigTerm.pending is not None:
                throw = held = _interrupt(_take_pending())  # held outside the step: it interrupts this one
            elif type(op) is SleepOp:
                if main:
                    _SigTerm.defer = False  # a backoff, like the step, may be cut short at once
                try:
                    time.sleep(op.seconds)
                except BaseException as exc:  # noqa: BLE001 - an interrupted backoff ends the run like an interrupted step
                    throw = exc
                finally:
                    if main:
                        _SigTerm.defer = True
            else:
                assert type(op) is CallOp
                token = _current_ledger.set(op.ledger)
                if main:
                    _SigTerm.defer = False
                try:
                    send = fn(op.state)
                except BaseException as exc:  # noqa: BLE001 - handed to the protocol, which decides
                    throw = exc
                finally:
                    if main:
                        _SigTerm.defer = True
                    _current_ledger.reset(token)
    finally:
        if main:
            _SigTerm.defer = outer


class StreamClosed(BaseException):
    """Thrown into a run whose stream was closed before the run ended: it is recorded ``interrupted``."""


def _hand_out(events: list[RunEvent], main: bool, outer: bool) -> Generator[RunEvent, None, None]:
    """Yield the events told so far (while the consumer handles one, signals act as outside a run)."""
    while events:
        event = events.pop(0)
        if main:
            _SigTerm.defer = outer
        try:
            yield event
        finally:
            if main:
                _SigTerm.defer = True


class AsyncLoopRunner(_BaseRunner[S]):
    """An async ``@loop``: ``await fn(state)``, ``await fn.run(state)``, ``await fn.resume(id)``.

    Runs on anyio (asyncio or trio); the async step is cancelled at its wall-clock deadline.
    """

    async def __call__(self, state: S, *, run_id: str | None = None) -> S:
        """Run the loop from ``state`` and return the final state (raises as ``LoopRunner`` does)."""
        return self._unwrap(await self.run(state, run_id=run_id))  # type: ignore[no-any-return]

    async def run(self, state: S, *, run_id: str | None = None) -> RunResult:
        """Run the loop and return a :class:`RunResult`."""
        return await self._drive(self._request(state, run_id, False, None, False))

    async def resume(self, run_id: str, *, budget: Budget | None = None, force: bool = False) -> S:
        """Continue a stopped or crashed run; returns the final state."""
        return self._unwrap(await self.resume_run(run_id, budget=budget, force=force))  # type: ignore[no-any-return]

    async def resume_run(self, run_id: str, *, budget: Budget | None = None, force: bool = False) -> RunResult:
        """Like :meth:`resume`, returning the :class:`RunResult`."""
        return await self._drive(self._request(None, run_id, True, budget, force))

    def astream(self, state: S, *, run_id: str | None = None) -> AsyncGenerator[RunEvent, None]:
        """Run the loop, yielding its events (``async for event in fn.astream(state)``); see ``LoopRunner.stream``.

        Leaving the loop early (``break``), or cancelling the task iterating it, stops the run,
        recorded ``interrupted`` (resumable). After a ``break`` the generator is closed when it
        is collected; ``async with contextlib.aclosing(fn.astream(state)) as events:`` closes it
        at once. The last event, :class:`RunFinished`, carries the run's status.
        """
        return self._astream(self._request(state, run_id, False, None, False))

    def astream_resume(self, run_id: str, *, budget: Budget | None = None, force: bool = False) -> AsyncGenerator[RunEvent, None]:
        """Like :meth:`astream`, for the resume of a run (see :meth:`resume`)."""
        return self._astream(self._request(None, run_id, True, budget, force))

    async def _astream(self, req: RunRequest) -> AsyncGenerator[RunEvent, None]:
        events: list[RunEvent] = []
        req = dataclasses.replace(req, observers=(*req.observers, events.append))
        gen, twin = await self._protocol(req)
        inner = _adriver(gen, self._fn, twin, events, [])
        try:
            async for event in inner:
                yield event
        finally:
            await inner.aclose()  # closed early: the run is interrupted and recorded so

    async def _drive(self, req: RunRequest) -> RunResult:
        parent = _current_ledger.get()
        nested = parent is not None and parent.context is not None and parent.context.in_step
        gen, twin = await self._protocol(req)
        result = await _drive_async(gen, self._fn, twin)
        if nested:
            _wait_with_parent(result)
        return result

    async def _protocol(self, req: RunRequest) -> tuple[Generator[Any, Any, RunResult], Callable[[Any], Any]]:
        import anyio.to_thread

        from loomc.store.sqlite.aio import AsyncSQLiteStore, async_twin

        parent = _current_ledger.get()
        nested = parent is not None and parent.context is not None and parent.context.in_step
        store = None
        if not nested:
            # resolving the database path touches the file system: not on the event loop,
            # and for a fixed absolute path, once
            key = self._fixed_path()
            store = self._resolved.get(key) if key is not None else None
            if store is None:
                store = await anyio.to_thread.run_sync(self.store)
                if key is not None:
                    self._resolved[key] = store
        if isinstance(store, AsyncSQLiteStore):
            store = store.sync  # the protocol names sync stores; the driver picks their async twin
        return run_protocol(self.spec, req, parent, store), async_twin

    async def areply(self, run_id: str, answer: Any) -> None:
        """:meth:`reply` in a worker thread (the event loop is not blocked)."""
        import anyio.to_thread

        await anyio.to_thread.run_sync(lambda: self.reply(run_id, answer))

    async def afork(self, run_id: str, *, at_step: int, state: Any = _UNSET, budget: Budget | None = None) -> str:
        """:meth:`fork` in a worker thread (the event loop is not blocked)."""
        import anyio.to_thread

        return await anyio.to_thread.run_sync(lambda: self.fork(run_id, at_step=at_step, state=state, budget=budget))

    async def _run_child(
        self, state: Any, *, call_index: int, kind: str = "node", meta: dict[str, Any] | None = None,
        budget: Budget | None = None,
    ) -> RunResult:
        """Run (or resume) as the child at ``call_index`` of the current parent step (graph nodes)."""
        from loomc.store.sqlite.aio import async_twin

        gen = self._child_protocol(state, call_index, kind, meta, budget)
        return await _drive_async(gen, self._fn, async_twin)


async def _drive_async(gen: Generator[Any, Any, RunResult], fn: Callable[[Any], Any], twin: Callable[[Any], Any]) -> RunResult:
    """Drive the run protocol ``gen`` to its end on this event loop; returns its result."""
    out: list[RunResult] = []
    async for _ in _adriver(gen, fn, twin, None, out):  # pragma: no cover - never yields without events
        pass
    return out[0]


async def _adriver(
    gen: Generator[Any, Any, RunResult], fn: Callable[[Any], Any], twin: Callable[[Any], Any],
    events: list[RunEvent] | None, out: list[RunResult],
) -> AsyncGenerator[RunEvent, None]:
    """The async driver (``_driver`` with ``await``); the result is put in ``out``."""
    import contextlib

    import anyio

    send: Any = None
    throw: BaseException | None = None
    # The async face of every store this run touches, entered for the length of the run
    # (an aiosqlite connection stays open while some run of this event loop uses it).
    opened: dict[int, Any] = {}
    async with contextlib.AsyncExitStack() as stores:
        while True:
            try:
                op = gen.throw(throw) if throw is not None else gen.send(send)
            except StopIteration as stop:
                out.append(stop.value)
                while events:
                    yield events.pop(0)
                return
            except StreamClosed:  # the run is recorded interrupted; aclose() ends quietly
                return
            send, throw = None, None
            if events:
                try:
                    while events:
                        yield events.pop(0)
                except GeneratorExit:  # the consumer stopped iterating: interrupt the run, record it
                    events = None
                    throw = StreamClosed()
                    continue
            if type(op) is StoreCall:
                try:
                    # the same protocol method, on the async twin of the store it is bound to
                    store = op.fn.__self__  # type: ignore[attr-defined]
                    astore = opened.get(id(store))
                    if astore is not None and not op.shield:  # the common case: no scope to enter
                        send = await getattr(astore, op.fn.__name__)(*op.args)
                    else:
                        with anyio.CancelScope(shield=op.shield):
                            if astore is None:
                                astore = opened[id(store)] = await stores.enter_async_context(twin(store))
                            send = await getattr(astore, op.fn.__name__)(*op.args)
                except BaseException as exc:  # noqa: BLE001 - raised inside the protocol, so its cleanup runs now
                    throw = exc
            elif type(op) is SleepOp:
                try:
                    await anyio.sleep(op.seconds)
                except BaseException as exc:  # noqa: BLE001 - a cancelled backoff ends the run like a cancelled step
                    throw = exc
            else:
                assert type(op) is CallOp
                token = _current_ledger.set(op.ledger)
                try:
                    if op.deadline is None:
                        send = await fn(op.state)
                    else:
                        # the deadline is on time.monotonic(); anyio's clock may differ (trio offsets it)
                        deadline = anyio.current_time() + (op.deadline - time.monotonic())
                        with anyio.CancelScope(deadline=deadline) as scope:
                            send = await fn(op.state)
                        if scope.cancelled_caught:
                            throw = WallClockExceeded()
                except BaseException as exc:  # noqa: BLE001 - handed to the protocol, which decides
                    throw = exc
                finally:
                    _current_ledger.reset(token)


@overload
def loop(fn: Callable[..., Any], /) -> Any: ...
@overload
def loop(
    *,
    budget: Budget | None = ...,
    checkpoint: Any = ...,
    converge_on: Any = ...,
    backtrack: Any = ...,
    scorer: Callable[[Any], float | None] | None = ...,
    cost_fn: Callable[[Any], float] | None = ...,
    on_stall: Any = ...,
    durability: str | None = ...,
    name: str | None = ...,
    retry: Retry | int | bool | None = ...,
    on_step: Callable[[RunEvent], Any] | None = ...,
) -> Callable[[Callable[..., Any]], Any]: ...


def loop(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    budget: Budget | None = None,
    checkpoint: Any = "sqlite",
    converge_on: Any = None,
    backtrack: Any = None,
    scorer: Callable[[Any], float | None] | None = None,
    cost_fn: Callable[[Any], float] | None = None,
    on_stall: Any = None,
    durability: str | None = None,
    name: str | None = None,
    retry: Retry | int | bool | None = None,
    on_step: Callable[[RunEvent], Any] | None = None,
) -> Any:
    """Turn a function doing ONE iteration (``state -> state``, sync or async) into a durable loop.

    Args:
        budget: hard limits (``Budget(usd=, iterations=, wall_clock=)``); checked before
            every step, and ``loomc.charge`` enforces ``usd`` inside a step.
        checkpoint: ``"sqlite"`` (default: ``$LOOMC_DB`` or ``.loomc/checkpoints.db``),
            a database path, ``"memory"`` or a store object.
        converge_on: a detector (``score_plateau()``, ``predicate()``, ``judge()`` ...,
            combined with ``|``/``&``) or a callable ``history -> bool``.
        backtrack: ``BestScore()``, ``LastGood()`` or a list of both.
        scorer: ``state -> float | None``, recorded with each step.
        cost_fn: ``state -> USD`` spent by the step that produced ``state``.
        on_stall: ``Escalate(after=n)``.
        durability: ``"power"`` (default) or ``"process"``; see ``SQLiteStore``.
        name: the stored run name (default ``module:qualname``).
        retry: retry transient errors inside a step (SDK rate limits, overload, timeouts):
            ``True``, a number of attempts, or ``Retry(...)``; off by default.
        on_step: ``callback(event)``, called in the run's thread as each run of this loop
            (and each run nested in it) starts, commits a step and finishes: a
            :class:`RunStarted`, :class:`StepCommitted` or :class:`RunFinished`. An exception
            it raises is reported once per run (:class:`EventCallbackWarning`) and the run goes on.

    Returns:
        A :class:`LoopRunner`, or an :class:`AsyncLoopRunner` for an ``async def``.

    Raises:
        ValueError: a bad argument, or ``score_plateau``, ``BestScore`` or ``Escalate``
            without a ``scorer`` (they would never act).

    Warns:
        UnboundedLoopWarning: no budget limit and no ``converge_on``.
    """
    if durability is not None and durability not in ("power", "process"):
        raise ValueError(f"durability={durability!r}: use 'power' or 'process'")
    if scorer is not None and not callable(scorer):
        raise TypeError(f"scorer={scorer!r}: expected a callable state -> float")
    if cost_fn is not None and not callable(cost_fn):
        raise TypeError(f"cost_fn={cost_fn!r}: expected a callable state -> float")
    if on_step is not None and not callable(on_step):
        raise TypeError(f"on_step={on_step!r}: expected a callable event -> None")
    policy = Policy.build(budget, converge_on, backtrack, on_stall)
    if scorer is None and policy.scored_parts:
        raise ValueError(
            f"@loop({', '.join(policy.scored_parts)}) decides from step scores, but no scorer= is given, "
            "so no step has a score and it would never act: pass scorer=lambda state: ... (a float per state)"
        )
    retry_policy = as_retry(retry)

    def decorate(func: Callable[..., Any], stacklevel: int = 2) -> Any:
        if not callable(func):
            raise TypeError(f"@loop expects a function, got {func!r}")
        if policy.unbounded:
            warnings.warn(
                f"@loop {getattr(func, '__qualname__', func)} has no budget limit and no converge_on: only an error "
                "will stop it. Bound it with budget=Budget(iterations=..., usd=..., wall_clock=...) "
                "or converge_on=... (or filter UnboundedLoopWarning if that is meant)",
                UnboundedLoopWarning,
                stacklevel=stacklevel,
            )
        spec = _spec(func, policy, scorer, cost_fn, checkpoint, durability, name, retry_policy)
        if on_step is not None:
            spec = dataclasses.replace(spec, on_step=on_step)
        if inspect.iscoroutinefunction(func):
            return AsyncLoopRunner(func, spec)
        return LoopRunner(func, spec)

    return decorate(fn, stacklevel=3) if fn is not None else decorate


