"""One run, written once: the sans-I/O run protocol shared by the sync and async drivers.

:func:`run_protocol` is a generator. It decides what to do with the pure policy core
and *yields* every piece of I/O it needs — a store call (:class:`StoreOp`) or the
user's step (:class:`CallOp`) — and receives the result. The sync driver fulfils those
requests with plain calls, the async driver with ``await``: the loop logic exists once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from loomc._core.budget import Budget
from loomc._core.context import RunView, _current_ledger, step_ended, step_started
from loomc._core.errors import BudgetExhausted, LoomcError, SpecMismatch, StateError, StoreError
from loomc._core.holds import HeldCharge, charge_record, supports_holds
from loomc._core.ledger import RunLedger, ledger_factory
from loomc._core.money import check_usd
from loomc._core.policy import Policy, RunUsage, Stop, Verdict, after_step, best_step, check_budget
from loomc._core.types import RunHistory, RunInfo, RunResult, RunStatus, StepRecord
from loomc.store import codec as _codec
from loomc.store.lease import Claim, claim, owner_token
from loomc.store.sqlite.sql import StepRow, now_iso
from loomc.store.sqlite.sync import NewRun, ResumePoint, StateLoader, new_run_id

__all__ = [
    "CallOp", "RunContext", "RunRequest", "RunSpec", "SleepOp", "StoreOp", "WallClockExceeded", "nested_resume_error",
    "run_protocol",
]


@dataclass(frozen=True, slots=True)
class StoreOp:
    """Call ``store.<method>(*args)`` (``shield``: even while being cancelled)."""

    store: Any
    method: str
    args: tuple[Any, ...]
    shield: bool = False


@dataclass(frozen=True, slots=True)
class CallOp:
    """Run the user's step on ``state`` with ``ledger`` as the current run (until ``deadline``)."""

    state: Any
    ledger: RunLedger
    deadline: float | None


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True)
class RunRequest:
    """What the caller asked for: a new run from ``state`` or the resume of ``run_id``."""

    state: Any = None
    run_id: str | None = None
    resume: bool = False
    budget: Budget | None = None
    force: bool = False
    call_index: int | None = None  # a child's fixed place under its parent step (graph nodes)


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
        self.notes: list[str] = []  # retries, breaker transitions: joined into the step's event

    def begin_step(self, step_n: int) -> None:
        """A step (or another attempt of it) starts: nested loops it starts are numbered from 0 again."""
        if step_n != self.step_n and self.children_paid:
            self.children_paid = {}
        self.step_n = step_n
        self._calls = 0
        self.in_step = True

    def enter_step(self, step_n: int) -> None:
        """The run's step ``step_n`` starts executing (counted until :meth:`leave_step`)."""
        step_started()
        self.begin_step(step_n)

    def leave_step(self) -> None:
        """The step's call, ``cost_fn`` and ``scorer`` are over (idempotent)."""
        if self.in_step:
            self.in_step = False
            step_ended()

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
    if not any(exc.owner == led.run_id for led in ledger.chain()):
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


def run_protocol(spec: RunSpec, req: RunRequest, parent: RunLedger | None, store: Any) -> Generator[Any, Any, RunResult]:
    """Drive one run to its end; yields :class:`StoreOp`/:class:`CallOp`, returns the result.

    The run is claimed in this process before its row is read (:func:`loomc.store.lease.claim`:
    a second thread or task resuming it gets ``RunLocked``) and let go when this ends.
    """
    claims: list[Claim] = []
    try:
        return (yield from _run(spec, req, parent, store, claims))
    finally:
        for held in claims:
            held.release()


def _run(
    spec: RunSpec, req: RunRequest, parent: RunLedger | None, store: Any, claims: list[Claim]
) -> Generator[Any, Any, RunResult]:
    owner = owner_token()
    parent_ctx: RunContext | None = parent.context if parent is not None else None
    nested = parent_ctx is not None and parent_ctx.in_step
    budget = req.budget if req.budget is not None else spec.policy.budget
    rp: ResumePoint | None = None
    held = 0.0  # holds left in the store by an earlier attempt, charged when this one took over
    meta_after: dict[str, Any] | None = None  # the run's meta once held charges were noted in it
    carried = 0.0  # cost already spent by a resumed child, to roll up into its parent

    if nested:
        assert parent_ctx is not None
        store = parent_ctx.store
        idx = req.call_index if req.call_index is not None else parent_ctx.next_call_index()
        existing: RunInfo | None = yield StoreOp(store, "find_child", (parent_ctx.run_id, parent_ctx.step_n, idx))
        if existing is not None:
            claims.append(claim(store, existing.id, owner))
            rp = yield StoreOp(store, "resume_point", (existing.id,))
            # What it had committed (its own re-found children carry the rest). After a crash
            # that is not in the parent's ledger yet; after an earlier attempt of the same step
            # in this process, it (or part of it) is.
            carried = parent_ctx.carry(existing.id, round(existing.cost_usd - rp.in_flight_usd, 12))
        else:
            start_blob = _codec.encode(req.state)
            run_id = new_run_id()
            claims.append(claim(store, run_id, owner))
            run_id = yield from _take(StoreOp(store, "begin_run", (NewRun(
                spec_hash=spec.spec_hash, name=spec.name, kind=spec.kind, run_id=run_id, parent_run_id=parent_ctx.run_id,
                parent_step=parent_ctx.step_n, call_index=idx, root_run_id=parent_ctx.root_run_id,
                state_type=_codec.type_ref(req.state),
                input_blob=start_blob, budget=budget.to_dict(), meta=spec.meta or None, owner=owner,
            ),), True), run_id, 0.0)
    else:
        target = req.run_id
        if target is not None:
            if req.resume:
                target = yield StoreOp(store, "resolve", (target,))
            # claimed before the row is read: what it says cannot change under this attempt
            claims.append(claim(store, target, owner))
            if req.resume:
                rp = yield StoreOp(store, "resume_point", (target,))
            else:
                info = yield StoreOp(store, "get_run", (target,))
                if info is not None:
                    rp = yield StoreOp(store, "resume_point", (target,))
            if rp is not None and rp.info.parent_run_id:
                root = rp.info
                while root.parent_run_id:
                    up = yield StoreOp(store, "get_run", (root.parent_run_id,))
                    if up is None:
                        break
                    root = up
                raise nested_resume_error(rp.info, root)
        if rp is None:
            if target is not None and not _valid_id(target):
                raise ValueError(f"run_id={target!r}: use 1-64 letters, digits, '-', '_' or '.'")
            start_blob = _codec.encode(req.state)
            if target is None:
                target = new_run_id()
                claims.append(claim(store, target, owner))
            run_id = yield from _take(StoreOp(store, "begin_run", (NewRun(
                spec_hash=spec.spec_hash, name=spec.name, kind=spec.kind, run_id=target,
                state_type=_codec.type_ref(req.state), input_blob=start_blob, budget=budget.to_dict(),
                meta=spec.meta or None, owner=owner,
            ),), True), target, 0.0)

    if rp is not None:
        info = rp.info
        run_id = info.id
        if info.name and info.name != spec.name and not req.force and not nested:
            raise SpecMismatch(
                f"run {run_id} was started by {info.name}, not {spec.name}; resume it with that function, "
                "or pass force=True to continue it with this one"
            )
        # The run's own limits, with those the caller names replaced (inf removes one).
        budget = Budget.merged(info.budget or spec.policy.budget, req.budget)
        state_type = rp.state_type
        if state_type and state_type != "json" and _codec.resolve_type(state_type) is None and not isinstance(req.state, type(None)):
            _codec._seen_types[state_type] = type(req.state)
        _codec.require_type(state_type, run_id)  # a renamed class must not come back as a dict
        state = _codec.decode(rp.start_blob, state_type)
        history = RunHistory(rp.history)
        partial = rp.partial  # only the last step: the earlier ones are read when first needed
        if history and history[-1].step_n == rp.next_from and history[-1].error is None:
            history[-1].state = state  # already decoded: detectors need not read it back
        # A finished child of a re-run parent step returns its outcome without running again
        # (a stalled one too: continuing it would not be what the original run did).
        if info.status is RunStatus.COMPLETED or (nested and info.status is RunStatus.STALLED):
            if nested and parent is not None and parent_ctx is not None:
                if carried:
                    parent.carry(carried)
                parent_ctx.child_paid(run_id, info.cost_usd)
            if partial:
                history[:0] = yield StoreOp(store, "step_history", (run_id, history[0].step_n))
            best = best_step(history)
            return RunResult(
                run_id, info.status, state, info.steps, info.cost_usd,
                best.state if best else None, best.score if best else None, info.stop_reason, None, history,
            )
        yield from _take(StoreOp(
            store, "acquire", (run_id, owner, budget.to_dict() if req.budget is not None else None), True
        ), run_id, info.wall_s)
        if supports_holds(store):
            # Holds still in the store were made by calls in flight when a process died
            # (or a step that never committed): they may have been billed, so they count.
            charged: HeldCharge | None = yield from _take(StoreOp(store, "charge_holds", (run_id,), True), run_id, info.wall_s)
            if charged is not None:
                held = charged.usd
                meta_after = charge_record(rp.info.meta, charged)
        usage = RunUsage(round(info.cost_usd + held, 12), info.steps, info.wall_s, info.max_step_cost)
        next_from = rp.next_from
        parent_run_id = info.parent_run_id
    else:
        state = req.state
        history = RunHistory()
        partial = False
        usage = RunUsage()
        next_from = -1
        parent_run_id = parent_ctx.run_id if nested and parent_ctx is not None else None

    # -- the attempt --------------------------------------------------------------
    # loomc's own stores read deltas back; any other CheckpointStore gets whole states
    encoder = _codec.StateEncoder() if getattr(store, "supports_deltas", False) else None
    t0 = time.monotonic()
    wall_cap = budget.wall_clock_seconds
    ctx = RunContext(
        run_id, spec.name, store, parent_run_id, budget, parent_ctx.root_run_id if nested and parent_ctx else None
    )
    states = StateLoader(store, run_id)  # loads states dropped from memory, on demand
    ctx.meta = dict(rp.info.meta or {}) if rp is not None else dict(spec.meta)
    if meta_after is not None:
        ctx.meta = meta_after  # what the store now holds: a later ``set_meta`` keeps the note
    ledger = ledger_factory(store)(
        run_id, parent=parent if nested else None, usd_cap=budget.usd, spent=usage.usd,
        # what re-found children carry again: already in ``usage.usd``
        prepaid=rp.in_flight_usd if rp is not None else 0.0,
        deadline=(t0 + wall_cap - usage.wall_s) if wall_cap is not None else None, context=ctx,
    )
    if nested and parent is not None and carried:
        parent.carry(carried)
    if nested and parent is not None and held:
        parent.charge(held, enforce=False)  # charged at the resume: new to the enclosing runs' ledgers
    ctx.ledger = ledger
    # the runs above this one, whose stored totals each committed step raises too
    ancestors = tuple(
        dict.fromkeys(led.run_id for led in parent.chain() if led.run_id and led.run_id != run_id)
    ) if nested and parent is not None else ()
    deadline = ledger.deadline_in_chain()  # this run's or an ancestor's, whichever comes first
    iterations, max_step_cost, wall_base = usage.iterations, usage.max_step_cost, usage.wall_s
    attempt_start = history[-1].step_n + 1 if history else 0
    step_n = attempt_start
    best = best_step(history)  # of the steps in memory (a resumed run's earlier ones are read later)
    best_state: Any = None
    have_best_state = False
    policy, retry = spec.policy, spec.retry
    needs_history = policy.converge_on is not None or bool(policy.backtrack) or policy.on_stall is not None
    recorded = False  # the run's outcome is written: an interruption after it changes nothing

    def earlier_steps() -> Generator[Any, Any, None]:
        nonlocal partial
        if partial:
            partial = False
            history[:0] = yield StoreOp(store, "step_history", (run_id, history[0].step_n))

    def interrupted(exc: BaseException) -> Generator[Any, Any, None]:
        """The step (its call, cost_fn or scorer) was interrupted: record the run as interrupted."""
        nonlocal recorded
        ctx.leave_step()
        ledger.settle_open()
        recorded = True
        wall = wall_base + (time.monotonic() - t0)
        yield StoreOp(store, "finish_run", (run_id, RunStatus.INTERRUPTED, f"interrupted: {type(exc).__name__}", wall), True)

    def result(status: RunStatus, reason: str | None, error: BaseException | None = None) -> Generator[Any, Any, RunResult]:
        yield from earlier_steps()
        b = best_step(history)
        bstate = best_state if (have_best_state and b is best) else (b.state if b is not None else None)
        return RunResult(run_id, status, state, iterations, ledger.spent, bstate, b.score if b else None, reason, error, history)

    try:
        while True:
            now = time.monotonic()
            ctx.iterations = iterations
            used = RunUsage(ledger.spent, iterations, wall_base + (now - t0), max_step_cost)
            stop = check_budget(budget, used, ledger.headroom(now))
            if stop is None and (refused := ledger.hold_step(max_step_cost)) is not None:
                # a concurrent sibling took the enclosing run's headroom since the check
                stop = Stop(RunStatus.BUDGET_EXHAUSTED, f"budget: usd (enclosing run {refused.owner})", "usd",
                            refused.used, refused.cap, refused.owner)
            if stop is not None:
                recorded = True  # (a cancellation landing on a write lands after it is made)
                yield StoreOp(store, "finish_run", (run_id, stop.status, stop.reason, used.wall_s), True)
                return (yield from result(stop.status, stop.reason, _budget_error(stop, run_id, state)))

            ctx.enter_step(step_n)
            if ctx.notes:
                ctx.notes = []
            # a step costs what it spent plus what re-found children carried from ``prepaid``
            spent_before = ledger.spent - ledger.prepaid
            started = time.monotonic()
            start_from = next_from
            error: BaseException | None = None
            budget_stop: Stop | None = None
            new_state: Any = state
            try:
                if retry is None:
                    new_state = yield CallOp(state, ledger, deadline)
                else:
                    new_state = yield from _attempts(retry, ctx, ledger, state, spent_before, max_step_cost, deadline)
            except WallClockExceeded:
                error = BudgetExhausted("wall_clock", wall_base + (time.monotonic() - t0), wall_cap or 0.0, run_id=run_id)
                budget_stop = Stop(RunStatus.BUDGET_EXHAUSTED, "budget: wall_clock", "wall_clock",
                                   wall_base + (time.monotonic() - t0), wall_cap or 0.0)
            except BudgetExhausted as exc:
                error, budget_stop = exc, _refused(exc, ledger)
            except Exception as exc:  # noqa: BLE001 - recorded with the step, re-raised by __call__
                error = exc
            except BaseException as exc:
                yield from interrupted(exc)
                raise
            if new_state is None and error is None and not spec.none_ok:  # a forgotten `return`: no null state
                error = StateError(_RETURNED_NONE)

            # cost_fn and scorer are part of the step: this run's ledger is current, so what
            # they charge (an LLM grader) counts in this step's cost, under this run's caps.
            score: float | None = None
            if error is None and (spec.cost_fn is not None or spec.scorer is not None):
                token = _current_ledger.set(ledger)
                try:
                    if spec.cost_fn is not None:
                        # reported after the fact: the money is spent, so it is recorded even past a cap
                        ledger.charge(check_usd(spec.cost_fn(new_state), f"the cost cost_fn returned for step {step_n}",
                                                hint=_COST_FN_HINT), enforce=False)
                    if spec.scorer is not None:
                        raw = spec.scorer(new_state)
                        score = None if raw is None else float(raw)
                except BudgetExhausted as exc:  # the scorer's own call did not fit: as in the step
                    error, budget_stop = exc, _refused(exc, ledger)
                except Exception as exc:  # noqa: BLE001 - a failing cost_fn or scorer fails the step
                    error = exc
                except BaseException as exc:
                    yield from interrupted(exc)
                    raise
                finally:
                    _current_ledger.reset(token)
            ctx.leave_step()
            ledger.settle_open()  # a hold the step never settled counts in full
            iterations += 1
            cost = round(ledger.spent - ledger.prepaid - spent_before, 12)
            ended = time.monotonic()
            stored_state = state if error is not None else new_state
            try:
                blob = encoder.encode(stored_state, step_n) if encoder is not None else _codec.encode(stored_state)
            except StateError as exc:
                wall = wall_base + (ended - t0)
                recorded = True
                yield StoreOp(store, "finish_run", (run_id, RunStatus.FAILED, f"error: {exc}", wall), True)
                state = stored_state
                return (yield from result(RunStatus.FAILED, f"error: {exc}", exc))

            ts = now_iso()
            record = StepRecord(step_n, stored_state, cost, score, ts, _error_text(error) if error else None)
            history.append(record)
            if budget_stop is not None:
                verdict_event, verdict_next, stop = None, start_from, budget_stop
            elif error is None and not needs_history:  # what after_step decides with no strategies
                verdict_event, verdict_next, stop = None, step_n, None
            else:
                if needs_history:
                    yield from earlier_steps()
                token = _current_ledger.set(ledger)  # a judge's own LLM call is charged to this run
                try:
                    verdict = after_step(policy, history, start_from=start_from, attempt_start=attempt_start)
                except BudgetExhausted as exc:  # the judge's call did not fit: keep the step, stop the run
                    verdict = Verdict(None, step_n, Stop(RunStatus.BUDGET_EXHAUSTED, f"budget: {exc.limit}", exc.limit,
                                                         exc.used, exc.cap, exc.owner if exc.owner != run_id else None))
                finally:
                    _current_ledger.reset(token)
                verdict_event, verdict_next, stop = verdict.event, verdict.next_from, verdict.stop
                cost = record.cost_usd = round(ledger.spent - ledger.prepaid - spent_before, 12)
            ledger.release_step()
            if ctx.notes:  # retries, breaker transitions
                record.event = "; ".join([*ctx.notes, verdict_event] if verdict_event else ctx.notes)
            else:
                record.event = verdict_event
            max_step_cost = max(max_step_cost, cost)
            wall = wall_base + (ended - t0)
            row = StepRow(
                step_n, blob, cost, score, ts, record.error, record.event, verdict_next, ended - started,
                ledger.spent, iterations, wall, max_step_cost, _RUNNING if stop is None else stop.status.value,
                None if stop is None else stop.reason, ancestors,
            )
            row.holds = ledger.take_durable()  # the step reserved: its commit deletes the holds it now pays for
            recorded = stop is not None  # the last commit is the run's outcome
            yield StoreOp(store, "commit_step", (run_id, row), recorded)
            if row.holds:
                ledger.forget_durable(row.holds)
            if ctx.meta_dirty:  # e.g. a circuit breaker's state, remembered by a resume
                ctx.meta_dirty = False
                yield StoreOp(store, "set_meta", (run_id, dict(ctx.meta)))

            # What the next step starts from, and which states to keep in memory.
            if error is None and score is not None and (best is None or score > best.score):  # type: ignore[operator]
                best, best_state, have_best_state = record, new_state, True
            if verdict_next == step_n:
                state = new_state
            elif verdict_next != start_from:
                state = best_state if (have_best_state and best is not None and best.step_n == verdict_next) else (
                    (yield StoreOp(store, "load_state", (run_id, verdict_next)))
                )
            next_from = verdict_next
            # keep the last two states in memory (detectors compare them; an async run
            # must not read older ones back from SQLite on its event loop)
            if len(history) >= 3:
                history[-3].drop_state(states)
            step_n += 1

            if stop is not None:
                if stop.status is RunStatus.BUDGET_EXHAUSTED:
                    # a child's BudgetExhausted (an enclosing cap) is re-issued for this run
                    own = isinstance(error, BudgetExhausted) and error.run_id in (None, run_id)
                    return (yield from result(stop.status, stop.reason, error if own else _budget_error(stop, run_id, state)))
                return (yield from result(stop.status, stop.reason, error))
    except BaseException as exc:
        # Cancelled or interrupted anywhere (in the step, or while loomc awaited the store),
        # or failed in loomc's own code: record it, so the run is never left `running`
        # under a live owner. A store that failed cannot record anything.
        if isinstance(exc, GeneratorExit):
            raise
        if not recorded and not isinstance(exc, StoreError):
            wall = wall_base + (time.monotonic() - t0)
            status, reason = (
                (RunStatus.FAILED, f"error: {_error_text(exc)}") if isinstance(exc, Exception)
                else (RunStatus.INTERRUPTED, f"interrupted: {type(exc).__name__}")
            )
            try:
                yield StoreOp(store, "finish_run", (run_id, status, reason, wall), True)
            except Exception:  # noqa: BLE001, S110 - the exception being raised says what went wrong
                pass
        if isinstance(exc, KeyboardInterrupt) and not nested:  # Ctrl-C, SIGTERM: say how to go on
            exc.add_note(
                f"loomc: run {run_id} ({spec.name}) was interrupted; its committed steps are kept. "
                f"Resume it with .resume({run_id!r}) on that loop, or `loomc resume {run_id} --run`"
            )
        raise
    finally:
        ctx.leave_step()
        ledger.release_step()
        if nested and parent_ctx is not None:
            parent_ctx.child_paid(run_id, ledger.spent)


def _take(op: StoreOp, run_id: str, wall_s: float) -> Generator[Any, Any, Any]:
    """A write that takes (or creates) the run before its attempt's own handler is in place.

    Shielded from cancel scopes. A cancellation that still lands on it (asyncio's own ``task.cancel()``, which no cancel
    scope holds back) means the write was made — loomc's stores finish a write, and report
    its failure, before re-raising a cancellation — so the run is recorded `interrupted`.
    """
    try:
        return (yield op)
    except BaseException as exc:
        if not isinstance(exc, (Exception, GeneratorExit)):
            reason = f"interrupted: {type(exc).__name__}"
            yield StoreOp(op.store, "finish_run", (run_id, RunStatus.INTERRUPTED, reason, wall_s), True)
        raise


def _attempts(
    retry: Any, ctx: RunContext, ledger: RunLedger, state: Any, spent_before: float, max_step_cost: float,
    deadline: float | None,
) -> Generator[Any, Any, Any]:
    """The step's call, retried on transient errors while ``retry`` and the budget allow.

    Returns the new state, or raises the last attempt's error. Every retry (or the reason
    one was not made) is noted for the step's ``event``.
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
            if decision.note:
                ctx.notes.append(decision.note)
            if decision.delay is None:
                raise
        yield SleepOp(decision.delay)
        ctx.begin_step(ctx.step_n)  # nested loops of the new attempt resume the earlier attempt's


def _valid_id(run_id: str) -> bool:
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", run_id))
