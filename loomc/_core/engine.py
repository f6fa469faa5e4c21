"""One run, written once: the sans-I/O run protocol shared by the sync and async drivers.

:func:`run_protocol` is a generator. It decides what to do with the pure policy core
and *yields* every piece of I/O it needs — a store call (:class:`StoreCall`, made by the
typed :class:`StoreRequests`), the user's step (:class:`CallOp`) or a backoff
(:class:`SleepOp`) — and receives the result. The sync driver fulfils those requests
with plain calls, the async driver with ``await``: the loop logic exists once.

A run goes through four phases, each a method of :class:`_Run` (which holds the run's
live state): *open* (find the run to resume, or create it; nested or top-level),
*restore* (its ledger, context and where it starts), *step* (one iteration, repeated)
and *finish* (the result).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

from loomc._core import events as _events
from loomc._core.budget import Budget
from loomc._core.context import RunView, _current_ledger, steps_in_flight
from loomc._core.errors import (
    BudgetExhausted,
    LeaseLost,
    LoomcError,
    SpecMismatch,
    StateError,
    StoreError,
    WaitingForInput,
)
from loomc._core.events import Event
from loomc._core.holds import HeldCharge, HoldStore, charge_record, supports_holds
from loomc._core.human import AskPending
from loomc._core.ledger import RunLedger, ledger_factory
from loomc._core.money import check_usd
from loomc._core.observe import RunWatch, watch_run
from loomc._core.policy import Policy, RunUsage, Stop, Verdict, after_step, best_step, check_budget
from loomc._core.types import RunHistory, RunInfo, RunResult, RunStatus, StepRecord
from loomc.store import codec as _codec
from loomc.store.lease import Claim, claim, owner_token
from loomc.store.protocol import Question, RunLifeStore, WaitRow
from loomc.store.sqlite.sql import StepRow, now_iso
from loomc.store.sqlite.sync import CheckpointStore, NewRun, ResumePoint, StateLoader, new_run_id

__all__ = [
    "CallOp", "RunContext", "RunRequest", "RunSpec", "SleepOp", "StoreCall", "StoreRequests", "WallClockExceeded",
    "nested_resume_error", "run_protocol",
]

T = TypeVar("T")


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~0.6 us more, per step
class StoreCall:
    """Call ``fn(*args)``, a method of the run's store (``shield``: even while being cancelled).

    ``fn`` is bound to the store the protocol was given. The sync driver calls it; the async
    driver awaits the method of the same name on that store's async twin, which implements
    the same protocol with coroutines.
    """

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    shield: bool = False


class EngineStore(CheckpointStore, Protocol):
    """What the run protocol asks of a store: the :class:`CheckpointStore` methods, and the
    earlier steps of a resumed run whose ``ResumePoint`` was ``partial``."""

    def step_history(self, run_id: str, before: int) -> list[StepRecord]: ...


class StoreRequests:
    """The run protocol's store requests, typed: each yields one :class:`StoreCall` and returns its result.

    ``result = yield from requests.get_run(run_id)`` — mypy checks the arguments against the
    store protocol and the result's type; the drivers only execute the call.
    """

    __slots__ = ("store",)

    def __init__(self, store: EngineStore) -> None:
        self.store = store

    def resolve(self, run_id: str) -> Generator[StoreCall, Any, str]:
        """The full id of the run named by ``run_id`` or a unique prefix of it."""
        return cast(str, (yield StoreCall(self.store.resolve, (run_id,))))

    def get_run(self, run_id: str) -> Generator[StoreCall, Any, RunInfo | None]:
        """The run, or ``None``."""
        return cast("RunInfo | None", (yield StoreCall(self.store.get_run, (run_id,))))

    def find_child(self, parent_run_id: str, parent_step: int, call_index: int) -> Generator[StoreCall, Any, RunInfo | None]:
        """The nested run started at ``call_index`` by step ``parent_step`` of the parent, or ``None``."""
        return cast("RunInfo | None", (yield StoreCall(self.store.find_child, (parent_run_id, parent_step, call_index))))

    def resume_point(self, run_id: str) -> Generator[StoreCall, Any, ResumePoint]:
        """Where the run picks up."""
        return cast(ResumePoint, (yield StoreCall(self.store.resume_point, (run_id,))))

    def step_history(self, run_id: str, before: int) -> Generator[StoreCall, Any, list[StepRecord]]:
        """The run's steps numbered below ``before``."""
        return cast("list[StepRecord]", (yield StoreCall(self.store.step_history, (run_id, before))))

    def load_state(self, run_id: str, step_n: int) -> Generator[StoreCall, Any, Any]:
        """The state step ``step_n`` committed."""
        return (yield StoreCall(self.store.load_state, (run_id, step_n)))

    def begin_run(self, new: NewRun) -> Generator[StoreCall, Any, str]:
        """Create the run (shielded); returns its id."""
        return cast(str, (yield StoreCall(self.store.begin_run, (new,), True)))

    def acquire(self, run_id: str, owner: str, budget: dict[str, Any] | None) -> Generator[StoreCall, Any, None]:
        """Take a found run for this attempt (shielded), with new limits if any."""
        yield StoreCall(self.store.acquire, (run_id, owner, budget), True)

    def charge_holds(self, run_id: str) -> Generator[StoreCall, Any, HeldCharge | None]:
        """Charge the holds an earlier attempt left (shielded; only for a store that keeps holds)."""
        return cast("HeldCharge | None", (yield StoreCall(cast(HoldStore, self.store).charge_holds, (run_id,), True)))

    def commit_step(self, run_id: str, row: StepRow, shield: bool) -> StoreCall:
        """Commit one step and the run's totals (``shield``: it is the run's last).

        The request itself, to be yielded (``yield io.commit_step(...)``): a generator
        around it would cost two more frame switches on every step.
        """
        return StoreCall(self.store.commit_step, (run_id, row), shield)

    def questions(self, run_id: str, tree: bool) -> Generator[StoreCall, Any, list[Question]]:
        """The run's questions (``tree``: and its descendants'); only for a store that keeps them."""
        return cast("list[Question]", (yield StoreCall(cast(RunLifeStore, self.store).questions, (run_id, tree))))

    def wait_for_input(self, run_id: str, row: WaitRow) -> Generator[StoreCall, Any, None]:
        """Stop the run to wait for an answer (shielded: it must land even while being cancelled)."""
        yield StoreCall(cast(RunLifeStore, self.store).wait_for_input, (run_id, row), True)

    def set_meta(self, run_id: str, meta: dict[str, Any]) -> Generator[StoreCall, Any, None]:
        """Replace the run's ``meta``."""
        yield StoreCall(self.store.set_meta, (run_id, meta))

    def finish_run(self, run_id: str, status: RunStatus, reason: str | None, wall_s: float) -> Generator[StoreCall, Any, None]:
        """Record the run's outcome (shielded: it must land even while being cancelled)."""
        yield StoreCall(self.store.finish_run, (run_id, status, reason, wall_s), True)


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~0.6 us more, per step
class CallOp:
    """Run the user's step on ``state`` with ``ledger`` as the current run (until ``deadline``)."""

    state: Any
    ledger: RunLedger
    deadline: float | None


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~0.6 us more, per step
class SleepOp:
    """Wait ``seconds`` before the step's next attempt (a retry's backoff)."""

    seconds: float


class WallClockExceeded(Exception):
    """Thrown into the protocol when an async step is cancelled at its deadline."""


@dataclass(frozen=True)
class RunSpec:
    """A loop as declared by ``@loop``."""

    name: str
    spec_hash: str
    policy: Policy
    scorer: Callable[[Any], float | None] | None
    cost_fn: Callable[[Any], float] | None
    checkpoint: Any
    durability: str | None
    kind: str = "loop"
    meta: dict[str, Any] = field(default_factory=dict)
    retry: Any = None  # loomc._core.retry.Retry | None
    none_ok: bool = False  # a step may return None (a graph's plain-function node: its output)
    on_step: Callable[[Any], Any] | None = None  # the loop's event callback (loomc._core.observe.RunEvent)


@dataclass(frozen=True)
class RunRequest:
    """What the caller asked for: a new run from ``state`` or the resume of ``run_id``."""

    state: Any = None
    run_id: str | None = None
    resume: bool = False
    budget: Budget | None = None
    force: bool = False
    call_index: int | None = None  # a child's fixed place under its parent step (graph nodes)
    observers: tuple[Callable[[Any], Any], ...] = ()  # the caller's event callbacks (a stream)


class RunContext:
    """The live run behind ``loomc.current_run()`` and nested-loop bookkeeping."""

    def __init__(
        self, run_id: str, name: str, store: Any, parent_run_id: str | None, budget: Budget,
        root_run_id: str | None = None,
    ) -> None:
        self.run_id = run_id
        self.name = name
        self.store = store
        self.parent_run_id = parent_run_id
        self.budget = budget
        self.root_run_id = root_run_id or run_id  # the top of the tree this run belongs to
        self.step_n = -1
        self.in_step = False
        self._calls = 0
        # What each child run of the current step has already put into this run's ledger in
        # this process: a child found again (a retried attempt) carries only the rest.
        self.children_paid: dict[str, float] = {}
        self.iterations = 0
        self.ledger: RunLedger | None = None
        self.meta: dict[str, Any] = {}
        self.meta_dirty = False  # set by components (circuit breakers) that changed ``meta``
        self.events: list[Event] = []  # retries, breaker transitions during the current step
        self.watch: RunWatch | None = None  # who watches this run (and, through it, its nested runs)
        #: answers given to this run's questions, by (step, call order) (``loomc.ask``)
        self.answers: dict[tuple[int, int], str] = {}
        self._asks = 0

    def begin_step(self, step_n: int) -> None:
        """A step (or another attempt of it) starts: nested loops it starts are numbered from 0 again."""
        if step_n != self.step_n and self.children_paid:
            self.children_paid = {}
        self.step_n = step_n
        self._calls = 0
        self._asks = 0
        self.in_step = True

    def enter_step(self, step_n: int) -> None:
        """The run's step ``step_n`` starts executing (counted until :meth:`leave_step`)."""
        steps_in_flight.append(None)
        self.begin_step(step_n)
        if self.watch is not None:
            self.watch.step_entered(step_n)

    def leave_step(self) -> None:
        """The step's call, ``cost_fn`` and ``scorer`` are over (idempotent)."""
        if self.in_step:
            self.in_step = False
            steps_in_flight.pop()
            if self.watch is not None:
                self.watch.step_left()

    def carry(self, child_id: str, child_cost: float) -> float:
        """What of a found child's stored cost is not yet in this run's ledger (in this process)."""
        from loomc._core.ledger import _lock

        with _lock:
            return max(0.0, round(child_cost - self.children_paid.get(child_id, 0.0), 12))

    def child_paid(self, child_id: str, child_cost: float) -> None:
        """A child run of the current step ends with ``child_cost`` in this run's ledger."""
        from loomc._core.ledger import _lock

        with _lock:
            self.children_paid[child_id] = child_cost

    def next_call_index(self) -> int:
        """The call order of the next nested loop started by the current step."""
        from loomc._core.ledger import _lock

        with _lock:
            i = self._calls
            self._calls += 1
            return i

    def next_ask_index(self) -> int:
        """The call order of the next ``loomc.ask`` of the current step."""
        i = self._asks
        self._asks += 1
        return i

    def view(self) -> RunView:
        """A snapshot for user code."""
        led = self.ledger
        assert led is not None
        now = time.monotonic()
        room = led.headroom(now, include_self=True)
        iters = None if self.budget.iterations is None else max(0, int(self.budget.iterations) - self.iterations)
        return RunView(
            run_id=self.run_id, name=self.name, step=self.step_n, parent_run_id=self.parent_run_id,
            usd_spent=led.spent, usd_remaining=led.available(), iterations_remaining=iters,
            wall_clock_remaining=room.wall_s,
        )


_COST_FN_HINT = "return the USD the step spent (0.0 if it spent nothing)"


def _refused(exc: BudgetExhausted, ledger: RunLedger) -> Stop | None:
    """The stop a refused charge calls for: when the cap is this run's or an ancestor's."""
    if exc.owner not in ledger.lineage():  # (runs driven in other processes included)
        return None  # a cap of a nested run (inside the step) only: a plain step error
    outer = exc.owner if exc.owner != ledger.run_id else None
    return Stop(RunStatus.BUDGET_EXHAUSTED, f"budget: {exc.limit}" + (f" (enclosing run {outer})" if outer else ""),
                exc.limit, exc.used, exc.cap, outer)


def _budget_error(stop: Stop, run_id: str, state: Any) -> BudgetExhausted:
    return BudgetExhausted(stop.limit or "usd", stop.used, stop.cap, run_id=run_id, owner=stop.owner or run_id, state=state)


_RUNNING = RunStatus.RUNNING.value


_RETURNED_NONE = (
    "the step returned None; return the new state (a step is state -> new state: did it forget `return state`?)"
)


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def nested_resume_error(info: RunInfo, root: RunInfo) -> LoomcError:
    """The error for resuming ``info``, a nested run, on its own; ``root`` is the top of its tree.

    A nested run resumed alone would run as a top-level run, outside its ancestors' caps;
    resuming the root resumes it in place, within every ancestor's budget.
    """
    how = (
        f"graph.resume({root.id!r}) or `loomc graph run PIPELINE.py --resume {root.id}`" if root.kind == "graph"
        else f"fn.resume({root.id!r}) on {root.name or 'its function'} or `loomc resume {root.id}`"
    )
    return LoomcError(
        f"run {info.id} is nested in run {info.parent_run_id}; resume the root run {root.id} instead (it resumes "
        f"its nested runs in place, within every ancestor's budget): {how}"
    )


def run_protocol(
    spec: RunSpec, req: RunRequest, parent: RunLedger | None, store: Any
) -> Generator[StoreCall | CallOp | SleepOp, Any, RunResult]:
    """Drive one run to its end; yields :class:`StoreCall`/:class:`CallOp`/:class:`SleepOp`, returns the result.

    The run is claimed in this process before its row is read (:func:`loomc.store.lease.claim`:
    a second thread or task resuming it gets ``RunLocked``) and let go when this ends.
    """
    run = _Run(spec, req, parent, store)
    try:
        done = yield from run.open()
        if done is not None:
            run.watch_found(done)
            return done
        run.restore()
        watch = run.watch = run.ctx.watch = watch_run(
            run.ctx, spec.kind, run.rp is not None, run.step_n, run.parent_ctx if run.nested else None, spec.on_step,
            req.observers,
        )
        if watch is None:  # nobody watches: the steps as they are
            return (yield from run.steps())
        watch.started(run.step_n)
        try:
            result = yield from run.steps()
        except BaseException as exc:
            status, reason = _ended_by(exc)
            watch.finished(status, reason, run.iterations, run.ledger.spent, exc)
            raise
        watch.finished(result.status, result.stop_reason, result.steps, result.cost_usd, result.error,
                       best_score=result.best_score)
        return result
    finally:
        for held in run.claims:
            held.release()


def _ended_by(exc: BaseException) -> tuple[RunStatus, str]:
    """The status and reason an exception escaping the steps records (see ``_Run._failed``)."""
    if isinstance(exc, Exception):
        return RunStatus.FAILED, f"error: {_error_text(exc)}"
    return RunStatus.INTERRUPTED, f"interrupted: {type(exc).__name__}"


class _BestStep:
    """The best step of a run (highest score, the earliest on ties), and its state while in memory."""

    __slots__ = ("record", "state", "state_known")

    def __init__(self, history: RunHistory) -> None:
        self.record = best_step(history)  # of the steps in memory (a resumed run's earlier ones are read later)
        self.state: Any = None
        self.state_known = False

    def offer(self, record: StepRecord, state: Any) -> None:
        """A new step: it becomes the best if its score beats the best so far."""
        score = record.score
        if record.error is None and score is not None and (self.record is None or score > self.record.score):  # type: ignore[operator]
            self.record, self.state, self.state_known = record, state, True

    def state_of(self, step_n: int) -> tuple[bool, Any]:
        """``(True, state)`` when step ``step_n`` is the best and its state is in memory."""
        if self.state_known and self.record is not None and self.record.step_n == step_n:
            return True, self.state
        return False, None

    def of(self, history: RunHistory) -> tuple[Any, float | None]:
        """The best state and score of the whole ``history``."""
        b = best_step(history)
        if b is None:
            return None, None
        return (self.state if self.state_known and b is self.record else b.state), b.score


class _Run:
    """One run's live state, and the phases of the protocol: open or resume, restore, steps, finish."""

    def __init__(self, spec: RunSpec, req: RunRequest, parent: RunLedger | None, store: Any) -> None:
        self.spec, self.req, self.parent = spec, req, parent
        self.claims: list[Claim] = []
        self.owner = owner_token()
        self.parent_ctx: RunContext | None = parent.context if parent is not None else None
        self.nested = self.parent_ctx is not None and self.parent_ctx.in_step
        if self.nested:
            assert self.parent_ctx is not None
            store = self.parent_ctx.store
        self.store = store
        self.io = StoreRequests(store)
        self.budget = req.budget if req.budget is not None else spec.policy.budget
        self.run_id = ""
        self.rp: ResumePoint | None = None
        self.answers: dict[tuple[int, int], str] = {}  # the run's answered questions (``loomc.ask``)
        self.held = 0.0  # holds left in the store by an earlier attempt, charged when this one took over
        self.meta_after: dict[str, Any] | None = None  # the run's meta once held charges were noted in it
        self.carried = 0.0  # cost already spent by a resumed child, to roll up into its parent
        self.first_events: list[Event] = []  # events of this attempt's first step (a held charge)
        self.recorded = False  # the run's outcome is written: an interruption after it changes nothing
        self.watch: RunWatch | None = None  # who watches the run (None: nobody)

    # -- phase 1: open (a new run) or find the run to resume --------------------------------

    def open(self) -> Generator[StoreCall, Any, RunResult | None]:
        """Take the run: find it (to resume) or create it. Returns a finished child's result."""
        if self.nested:
            yield from self._open_child()
        else:
            yield from self._open_top()
        if self.rp is None:
            return None
        return (yield from self._take_over(self.rp))

    def _open_child(self) -> Generator[StoreCall, Any, None]:
        """A nested run: the child at its call index under the parent's current step, found or new."""
        pctx = self.parent_ctx
        assert pctx is not None
        idx = self.req.call_index if self.req.call_index is not None else pctx.next_call_index()
        existing = yield from self.io.find_child(pctx.run_id, pctx.step_n, idx)
        if existing is None:
            yield from self._begin(new_run_id(), pctx, idx)
            return
        self.claims.append(claim(self.store, existing.id, self.owner))
        rp = self.rp = yield from self.io.resume_point(existing.id)
        # What it had committed (its own re-found children carry the rest). After a crash
        # that is not in the parent's ledger yet; after an earlier attempt of the same step
        # in this process, it (or part of it) is.
        self.carried = pctx.carry(existing.id, round(existing.cost_usd - rp.in_flight_usd, 12))

    def _open_top(self) -> Generator[StoreCall, Any, None]:
        """A top-level run: resume ``req.run_id``, continue it if it exists, or start it."""
        req = self.req
        target = req.run_id
        if target is not None:
            if req.resume:
                target = yield from self.io.resolve(target)
            # claimed before the row is read: what it says cannot change under this attempt
            self.claims.append(claim(self.store, target, self.owner))
            if req.resume or (yield from self.io.get_run(target)) is not None:
                self.rp = yield from self.io.resume_point(target)
            if self.rp is not None and self.rp.info.parent_run_id:
                root = self.rp.info
                while root.parent_run_id:
                    up = yield from self.io.get_run(root.parent_run_id)
                    if up is None:
                        break
                    root = up
                raise nested_resume_error(self.rp.info, root)
            if self.rp is not None:
                return
            if not _valid_id(target):
                raise ValueError(f"run_id={target!r}: use 1-64 letters, digits, '-', '_' or '.'")
        yield from self._begin(target, None, None)

    def _begin(self, run_id: str | None, pctx: RunContext | None, idx: int | None) -> Generator[StoreCall, Any, None]:
        """Create the run (``run_id`` ``None``: a fresh id), as the child ``idx`` of ``pctx``'s step if nested."""
        spec, state = self.spec, self.req.state
        start_blob = _codec.encode(state)
        if run_id is None or pctx is not None:
            run_id = run_id or new_run_id()
            self.claims.append(claim(self.store, run_id, self.owner))
        new = NewRun(
            spec_hash=spec.spec_hash, name=spec.name, kind=spec.kind, run_id=run_id,
            parent_run_id=pctx.run_id if pctx is not None else None,
            parent_step=pctx.step_n if pctx is not None else None, call_index=idx,
            root_run_id=pctx.root_run_id if pctx is not None else None,
            state_type=_codec.type_ref(state), input_blob=start_blob, budget=self.budget.to_dict(),
            meta=spec.meta or None, owner=self.owner,
        )
        self.run_id = yield from self._take(self.io.begin_run(new), run_id, 0.0)

    def _take_over(self, rp: ResumePoint) -> Generator[StoreCall, Any, RunResult | None]:
        """Check and acquire a found run; a finished child returns its outcome instead."""
        spec, req, info = self.spec, self.req, rp.info
        run_id = self.run_id = info.id
        if info.name and info.name != spec.name and not req.force and not self.nested:
            raise SpecMismatch(
                f"run {run_id} was started by {info.name}, not {spec.name}; resume it with that function, "
                "or pass force=True to continue it with this one"
            )
        # The run's own limits, with those the caller names replaced (inf removes one).
        self.budget = Budget.merged(info.budget or spec.policy.budget, req.budget)
        state_type = rp.state_type
        if state_type and state_type != "json" and _codec.resolve_type(state_type) is None and not isinstance(req.state, type(None)):
            _codec._seen_types[state_type] = type(req.state)
        _codec.require_type(state_type, run_id)  # a renamed class must not come back as a dict
        self.state = _codec.decode(rp.start_blob, state_type)
        history = self.history = RunHistory(rp.history)
        self.partial = rp.partial  # only the last step: the earlier ones are read when first needed
        if history and history[-1].step_n == rp.next_from and history[-1].error is None:
            history[-1].state = self.state  # already decoded: detectors need not read it back
        # A finished child of a re-run parent step returns its outcome without running again
        # (a stalled one too: continuing it would not be what the original run did).
        if info.status is RunStatus.COMPLETED or (self.nested and info.status is RunStatus.STALLED):
            if self.nested and self.parent is not None and self.parent_ctx is not None:
                if self.carried:
                    self.parent.carry(self.carried)
                self.parent_ctx.child_paid(run_id, info.cost_usd)
            yield from self._earlier_steps()
            best_state, best_score = _BestStep(history).of(history)
            return RunResult(run_id, info.status, self.state, info.steps, info.cost_usd, best_state, best_score,
                             info.stop_reason, None, history)
        if callable(getattr(self.store, "questions", None)):
            waiting = info.status is RunStatus.WAITING
            asked = yield from self.io.questions(run_id, waiting)
            pending = [q for q in asked if q.answer is None]
            if pending:  # nobody answered yet: running the step again would only ask again
                q = pending[0]
                err = WaitingForInput(run_id, q.text, asking_run_id=q.run_id, step=q.step_n, pending=q)
                return RunResult(run_id, info.status, self.state, info.steps, info.cost_usd, None, None,
                                 info.stop_reason, err, history)
            self.answers = {(q.step_n, q.call_index): q.answer for q in asked if q.run_id == run_id and q.answer is not None}
        yield from self._take(
            self.io.acquire(run_id, self.owner, self.budget.to_dict() if req.budget is not None else None), run_id, info.wall_s
        )
        if supports_holds(self.store):
            # Holds still in the store were made by calls in flight when a process died
            # (or a step that never committed): they may have been billed, so they count.
            charged = yield from self._take(self.io.charge_holds(run_id), run_id, info.wall_s)
            if charged is not None:
                self.held = charged.usd
                self.meta_after = charge_record(info.meta, charged)
                self.first_events.append({"kind": "held_charge", "usd": charged.usd})
        return None

    def _take(self, request: Generator[StoreCall, Any, T], run_id: str, wall_s: float) -> Generator[StoreCall, Any, T]:
        """A write that takes (or creates) the run before its attempt's own handler is in place.

        Shielded from cancel scopes. A cancellation that still lands on it (asyncio's own ``task.cancel()``, which no
        cancel scope holds back) means the write was made — loomc's stores finish a write, and report
        its failure, before re-raising a cancellation — so the run is recorded `interrupted`.
        """
        try:
            return (yield from request)
        except BaseException as exc:
            if not isinstance(exc, (Exception, GeneratorExit)):
                yield from self.io.finish_run(run_id, RunStatus.INTERRUPTED, f"interrupted: {type(exc).__name__}", wall_s)
            raise

    def watch_found(self, done: RunResult) -> None:
        """A found run that had finished (a completed child, or the resume of a completed run):
        its watchers see it start and finish at once, as a run that had nothing left to do."""
        rp = self.rp
        assert rp is not None
        pctx = self.parent_ctx if self.nested else None
        ctx = RunContext(done.run_id, self.spec.name, self.store, rp.info.parent_run_id, self.budget)
        watch = watch_run(ctx, self.spec.kind, True, rp.info.steps, pctx, self.spec.on_step, self.req.observers)
        if watch is not None:
            watch.started(rp.info.steps)
            watch.finished(done.status, done.stop_reason, done.steps, done.cost_usd, done.error, best_score=done.best_score)

    # -- phase 2: restore the run's live state for this attempt ----------------------------

    def restore(self) -> None:
        """Set up the attempt: usage carried over, the run's context and ledger, where to start."""
        rp, spec, parent, nested = self.rp, self.spec, self.parent, self.nested
        pctx = self.parent_ctx if nested else None
        if rp is not None:
            info = rp.info
            usage = RunUsage(round(info.cost_usd + self.held, 12), info.steps, info.wall_s, info.max_step_cost)
            self.next_from = rp.next_from
            parent_run_id = info.parent_run_id
        else:
            self.state = self.req.state
            self.history = RunHistory()
            self.partial = False
            usage = RunUsage()
            self.next_from = -1
            parent_run_id = pctx.run_id if pctx is not None else None
        run_id, store, budget = self.run_id, self.store, self.budget
        # loomc's own stores read deltas back; any other CheckpointStore gets whole states
        self.encoder = _codec.StateEncoder() if getattr(store, "supports_deltas", False) else None
        t0 = self.t0 = time.monotonic()
        wall_cap = self.wall_cap = budget.wall_clock_seconds
        ctx = self.ctx = RunContext(run_id, spec.name, store, parent_run_id, budget, pctx.root_run_id if pctx else None)
        self.states = StateLoader(store, run_id)  # loads states dropped from memory, on demand
        ctx.meta = dict(rp.info.meta or {}) if rp is not None else dict(spec.meta)
        if rp is not None:
            ctx.answers = self.answers
        if self.meta_after is not None:
            ctx.meta = self.meta_after  # what the store now holds: a later ``set_meta`` keeps the note
        ledger = self.ledger = ledger_factory(store)(
            run_id, parent=parent if nested else None, usd_cap=budget.usd, spent=usage.usd,
            # what re-found children carry again: already in ``usage.usd``
            prepaid=rp.in_flight_usd if rp is not None else 0.0,
            deadline=(t0 + wall_cap - usage.wall_s) if wall_cap is not None else None, context=ctx,
        )
        if nested and parent is not None and self.carried:
            parent.carry(self.carried)
        if nested and parent is not None and self.held:
            parent.charge(self.held, enforce=False)  # charged at the resume: new to the enclosing runs' ledgers
        ctx.ledger = ledger
        # the runs above this one, whose stored totals each committed step raises too
        # (a parent opened from another process names the runs above it too: their totals rise as well)
        self.ancestors = tuple(
            dict.fromkeys(rid for rid in parent.lineage() if rid and rid != run_id)
        ) if nested and parent is not None else ()
        self.deadline = ledger.deadline_in_chain()  # this run's or an ancestor's, whichever comes first
        self.iterations, self.max_step_cost, self.wall_base = usage.iterations, usage.max_step_cost, usage.wall_s
        self.attempt_start = self.step_n = self.history[-1].step_n + 1 if self.history else 0
        self.best = _BestStep(self.history)
        policy = spec.policy
        self.needs_history = policy.converge_on is not None or bool(policy.backtrack) or policy.on_stall is not None

    # -- phase 3: the steps ------------------------------------------------------------------

    def steps(self) -> Generator[StoreCall | CallOp | SleepOp, Any, RunResult]:
        """Run steps until the run stops; record the outcome however it ends."""
        try:
            while True:
                done = yield from self.step()
                if done is not None:
                    return done
        except BaseException as exc:
            yield from self._failed(exc)
            raise
        finally:
            self.ctx.leave_step()
            self.ledger.release_step()
            if self.nested and self.parent_ctx is not None:
                self.parent_ctx.child_paid(self.run_id, self.ledger.spent)

    def step(self) -> Generator[StoreCall | CallOp | SleepOp, Any, RunResult | None]:
        """One step: the budget check, the call, its cost and score, the verdict and the commit."""
        ctx, ledger, run_id, spec, io = self.ctx, self.ledger, self.run_id, self.spec, self.io
        step_n, state, max_step_cost = self.step_n, self.state, self.max_step_cost
        for held in self.claims:
            if held.lost:  # the heartbeat found the run taken over: start nothing more (its writes would be refused)
                raise LeaseLost(run_id, None)
        now = time.monotonic()
        ctx.iterations = self.iterations
        used = RunUsage(ledger.spent, self.iterations, self.wall_base + (now - self.t0), max_step_cost)
        stop = check_budget(self.budget, used, ledger.headroom(now))
        if stop is None and (refused := ledger.hold_step(max_step_cost)) is not None:
            # a concurrent sibling took the enclosing run's headroom since the check
            stop = Stop(RunStatus.BUDGET_EXHAUSTED, f"budget: usd (enclosing run {refused.owner})", "usd",
                        refused.used, refused.cap, refused.owner)
        if stop is not None:
            self.recorded = True  # (a cancellation landing on a write lands after it is made)
            yield from io.finish_run(run_id, stop.status, stop.reason, used.wall_s)
            return (yield from self.finish(stop.status, stop.reason, _budget_error(stop, run_id, state)))

        ctx.enter_step(step_n)
        if ctx.events:
            ctx.events = []
        # a step costs what it spent plus what re-found children carried from ``prepaid``
        spent_before = ledger.spent - ledger.prepaid
        started = time.monotonic()
        start_from = self.next_from
        error: BaseException | None = None
        budget_stop: Stop | None = None
        new_state: Any = state
        try:
            if spec.retry is None:
                new_state = yield CallOp(state, ledger, self.deadline)
            else:
                new_state = yield from _attempts(spec.retry, ctx, ledger, state, spent_before, max_step_cost, self.deadline)
        except WallClockExceeded:
            wall_cap, wall = self.wall_cap or 0.0, self.wall_base + (time.monotonic() - self.t0)
            error = BudgetExhausted("wall_clock", wall, wall_cap, run_id=run_id)
            budget_stop = Stop(RunStatus.BUDGET_EXHAUSTED, "budget: wall_clock", "wall_clock", wall, wall_cap)
        except BudgetExhausted as exc:
            error, budget_stop = exc, _refused(exc, ledger)
        except Exception as exc:  # noqa: BLE001 - recorded with the step, re-raised by __call__
            error = exc
        except AskPending as asked:
            return (yield from self._wait(asked.question))
        except BaseException as exc:
            yield from self._interrupted(exc)
            raise
        if new_state is None and error is None and not spec.none_ok:  # a forgotten `return`: no null state
            error = StateError(_RETURNED_NONE)

        score: float | None = None
        if error is None and (spec.cost_fn is not None or spec.scorer is not None):
            try:
                score = self._cost_and_score(new_state, step_n)
            except BudgetExhausted as exc:  # the scorer's own call did not fit: as in the step
                error, budget_stop = exc, _refused(exc, ledger)
            except Exception as exc:  # noqa: BLE001 - a failing cost_fn or scorer fails the step
                error = exc
            except BaseException as exc:
                yield from self._interrupted(exc)
                raise
        ctx.leave_step()
        ledger.settle_open()  # a hold the step never settled counts in full
        self.iterations += 1
        cost = round(ledger.spent - ledger.prepaid - spent_before, 12)
        ended = time.monotonic()
        stored_state = state if error is not None else new_state
        try:
            encoder = self.encoder
            blob = encoder.encode(stored_state, step_n) if encoder is not None else _codec.encode(stored_state)
        except StateError as exc:
            self.recorded = True
            yield from io.finish_run(run_id, RunStatus.FAILED, f"error: {exc}", self.wall_base + (ended - self.t0))
            self.state = stored_state
            return (yield from self.finish(RunStatus.FAILED, f"error: {exc}", exc))

        ts = now_iso()
        record = StepRecord(step_n, stored_state, cost, score, ts, _error_text(error) if error else None)
        self.history.append(record)
        verdict_events: tuple[Event, ...] = ()
        if budget_stop is not None:
            verdict_next, stop = start_from, budget_stop
        elif error is None and not self.needs_history:  # what after_step decides with no strategies
            verdict_next, stop = step_n, None
        else:
            verdict = yield from self._verdict(start_from)
            verdict_events, verdict_next, stop = verdict.events, verdict.next_from, verdict.stop
            cost = record.cost_usd = round(ledger.spent - ledger.prepaid - spent_before, 12)
        ledger.release_step()
        events = ctx.events
        if verdict_events or self.first_events or (stop is not None and stop.limit is not None):
            events = [*self.first_events, *events, *verdict_events]
            self.first_events = []
            if stop is not None and stop.limit is not None:
                events.append({"kind": "budget", "limit": stop.limit, "used": stop.used, "cap": stop.cap,
                               "owner": stop.owner})
        if events:  # (a list of its own: ``ctx.events`` is replaced, never cleared, at the next step)
            record.events = events
        self.max_step_cost = max_step_cost = max(max_step_cost, cost)
        row = StepRow(
            step_n, blob, cost, score, ts, record.error, _events.encode(events) if events else None, verdict_next, ended - started,
            ledger.spent, self.iterations, self.wall_base + (ended - self.t0), max_step_cost,
            _RUNNING if stop is None else stop.status.value, None if stop is None else stop.reason, self.ancestors,
        )
        row.holds = ledger.take_durable()  # the step reserved: its commit deletes the holds it now pays for
        self.recorded = stop is not None  # the last commit is the run's outcome
        yield io.commit_step(run_id, row, self.recorded)
        if self.watch is not None:
            self.watch.committed(record)
        if row.holds:
            ledger.forget_durable(row.holds)
        if ctx.meta_dirty:  # e.g. a circuit breaker's state, remembered by a resume
            ctx.meta_dirty = False
            yield from io.set_meta(run_id, dict(ctx.meta))

        # What the next step starts from, and which states to keep in memory.
        if error is None and score is not None:
            self.best.offer(record, new_state)
        if verdict_next == step_n:
            self.state = new_state
        elif verdict_next != start_from:
            known, best_state = self.best.state_of(verdict_next)
            self.state = best_state if known else (yield from io.load_state(run_id, verdict_next))
        self.next_from = verdict_next
        # keep the last two states in memory (detectors compare them; an async run
        # must not read older ones back from SQLite on its event loop)
        history = self.history
        if len(history) >= 3:
            history[-3].drop_state(self.states)
        self.step_n = step_n + 1

        if stop is None:
            return None
        if stop.status is RunStatus.BUDGET_EXHAUSTED:
            # a child's BudgetExhausted (an enclosing cap) is re-issued for this run
            own = isinstance(error, BudgetExhausted) and error.run_id in (None, run_id)
            return (yield from self.finish(stop.status, stop.reason, error if own else _budget_error(stop, run_id, self.state)))
        return (yield from self.finish(stop.status, stop.reason, error))

    def _cost_and_score(self, new_state: Any, step_n: int) -> float | None:
        """Run ``cost_fn`` and ``scorer`` on the step's new state; returns the score.

        They are part of the step: this run's ledger is current, so what they charge (an
        LLM grader) counts in this step's cost, under this run's caps.
        """
        spec = self.spec
        token = _current_ledger.set(self.ledger)
        try:
            if spec.cost_fn is not None:
                # reported after the fact: the money is spent, so it is recorded even past a cap
                self.ledger.charge(check_usd(spec.cost_fn(new_state), f"the cost cost_fn returned for step {step_n}",
                                             hint=_COST_FN_HINT), enforce=False)
            if spec.scorer is None:
                return None
            raw = spec.scorer(new_state)
            return None if raw is None else float(raw)
        finally:
            _current_ledger.reset(token)

    def _verdict(self, start_from: int) -> Generator[StoreCall, Any, Verdict]:
        """What the policy makes of the new step (a judge's own LLM call is charged to this run)."""
        if self.needs_history:
            yield from self._earlier_steps()
        token = _current_ledger.set(self.ledger)
        try:
            return after_step(self.spec.policy, self.history, start_from=start_from, attempt_start=self.attempt_start)
        except BudgetExhausted as exc:  # the judge's call did not fit: keep the step, stop the run
            return Verdict((), self.step_n, Stop(RunStatus.BUDGET_EXHAUSTED, f"budget: {exc.limit}", exc.limit,
                                                 exc.used, exc.cap, exc.owner if exc.owner != self.run_id else None))
        finally:
            _current_ledger.reset(token)

    def _earlier_steps(self) -> Generator[StoreCall, Any, None]:
        """Read the steps a resumed run's history does not hold yet (once)."""
        if self.partial:
            self.partial = False
            self.history[:0] = yield from self.io.step_history(self.run_id, self.history[0].step_n)

    # -- phase 4: finish ----------------------------------------------------------------------

    def finish(self, status: RunStatus, reason: str | None, error: BaseException | None = None) -> Generator[StoreCall, Any, RunResult]:
        """The run's result (its outcome is already written)."""
        yield from self._earlier_steps()
        best_state, best_score = self.best.of(self.history)
        return RunResult(self.run_id, status, self.state, self.iterations, self.ledger.spent, best_state, best_score,
                         reason, error, self.history)

    def _wait(self, q: Question) -> Generator[StoreCall, Any, RunResult]:
        """A question without an answer stopped the step: discard it, keep its charges, wait.

        The step is not committed nor counted; what it spent stays in the run's total.
        ``q`` was asked by this run's step, or by a run nested in it (stored with that run).
        """
        ctx, ledger = self.ctx, self.ledger
        ctx.leave_step()
        ledger.settle_open()  # a hold the step never settled counts in full
        own = q.run_id == self.run_id
        wall = self.wall_base + (time.monotonic() - self.t0)
        first = (q.text.splitlines() or [""])[0]  # the whole question is stored with it
        text = first if len(first) <= 200 else first[:199] + "\u2026"
        reason = f"waiting: {text}" if own else f"waiting: run {q.run_id} asks {text}"
        holds = ledger.take_durable()
        row = WaitRow(round(ledger.spent, 12), wall, reason, q if own else None, self.ancestors, holds or None)
        self.recorded = True
        yield from self.io.wait_for_input(self.run_id, row)
        if holds:
            ledger.forget_durable(holds)
        ledger.release_step()
        err = WaitingForInput(self.run_id, q.text, asking_run_id=q.run_id, step=q.step_n, pending=q)
        return (yield from self.finish(RunStatus.WAITING, reason, err))

    def _interrupted(self, exc: BaseException) -> Generator[StoreCall, Any, None]:
        """The step (its call, cost_fn or scorer) was interrupted: record the run as interrupted."""
        self.ctx.leave_step()
        self.ledger.settle_open()
        self.recorded = True
        wall = self.wall_base + (time.monotonic() - self.t0)
        yield from self.io.finish_run(self.run_id, RunStatus.INTERRUPTED, f"interrupted: {type(exc).__name__}", wall)

    def _failed(self, exc: BaseException) -> Generator[StoreCall, Any, None]:
        """Cancelled or interrupted anywhere (in the step, or while loomc awaited the store), or
        failed in loomc's own code: record it, so the run is never left `running` under a live
        owner. A store that failed cannot record anything."""
        if isinstance(exc, GeneratorExit):
            return
        run_id = self.run_id
        if not self.recorded and not isinstance(exc, (StoreError, LeaseLost)):
            wall = self.wall_base + (time.monotonic() - self.t0)
            status, reason = (
                (RunStatus.FAILED, f"error: {_error_text(exc)}") if isinstance(exc, Exception)
                else (RunStatus.INTERRUPTED, f"interrupted: {type(exc).__name__}")
            )
            try:
                yield from self.io.finish_run(run_id, status, reason, wall)
            except Exception:  # noqa: BLE001, S110 - the exception being raised says what went wrong
                pass
        if isinstance(exc, KeyboardInterrupt) and not self.nested:  # Ctrl-C, SIGTERM: say how to go on
            exc.add_note(
                f"loomc: run {run_id} ({self.spec.name}) was interrupted; its committed steps are kept. "
                f"Resume it with .resume({run_id!r}) on that loop, or `loomc resume {run_id} --run`"
            )


def _attempts(
    retry: Any, ctx: RunContext, ledger: RunLedger, state: Any, spent_before: float, max_step_cost: float,
    deadline: float | None,
) -> Generator[Any, Any, Any]:
    """The step's call, retried on transient errors while ``retry`` and the budget allow.

    Returns the new state, or raises the last attempt's error. Every retry (or the reason
    one was not made) is recorded as one of the step's events.
    """
    failed = 0
    while True:
        try:
            return (yield CallOp(state, ledger, deadline))
        except (WallClockExceeded, BudgetExhausted):
            raise
        except Exception as exc:
            if retry is None:
                raise
            failed += 1
            room = ledger.headroom(time.monotonic(), include_self=True)
            estimate = max(max_step_cost, (ledger.spent - ledger.prepaid - spent_before) / failed)
            decision = retry.decide(exc, failed, usd_left=room.usd, step_estimate=estimate, wall_left=room.wall_s)
            if decision.event is not None:
                ctx.events.append(decision.event)
            if decision.delay is None:
                raise
        yield SleepOp(decision.delay)
        ctx.begin_step(ctx.step_n)  # nested loops of the new attempt resume the earlier attempt's


def _valid_id(run_id: str) -> bool:
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", run_id))
