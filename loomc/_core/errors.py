"""The errors loomc raises.

Every error a user can cause derives from :class:`LoomcError`::

    LoomcError
    ├── BudgetExhausted          a budget limit stopped the run (or refused a charge)
    ├── CostError                an amount of money that is NaN, infinite or negative (also a ``ValueError``)
    ├── RunContextLost           a charge from a thread that does not carry the running step's context
    ├── StallError               no score improvement for ``Escalate(after=n)`` steps
    ├── RunNotFound              no run matches the id (also a ``LookupError``)
    ├── AmbiguousRunId           a prefix matches several runs (also a ``LookupError``)
    ├── RunLocked                the run is held by a live process
    ├── LeaseLost                another process took the run over: this one may no longer write it
    ├── SpecMismatch             resuming a run with a different function or graph
    ├── WaitingForInput          the run waits for a person's answer (``loomc.ask``)
    ├── InvalidAnswer            a reply that does not fit the question's schema (also a ``ValueError``)
    ├── StateError               a state cannot be serialised (also a ``TypeError``)
    ├── StoreError               the checkpoint database cannot be used
    │   └── SchemaTooNew         the database was written by a newer loomc
    └── CircuitOpenError         a circuit breaker refused a call

Two warnings, both ``UserWarning``: :class:`UnboundedLoopWarning` flags a ``@loop`` that
nothing but an error can stop; :class:`EventCallbackWarning` reports (once per run) an
``on_step`` callback that raised (the run goes on).

Exceptions raised by the user's own step pass through unchanged, with a note naming
the run and how to resume it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AmbiguousRunId",
    "BudgetExhausted",
    "CircuitOpenError",
    "CostError",
    "EventCallbackWarning",
    "LeaseLost",
    "InvalidAnswer",
    "LoomcError",
    "RunContextLost",
    "RunLocked",
    "RunNotFound",
    "SchemaTooNew",
    "SpecMismatch",
    "StallError",
    "StateError",
    "StoreError",
    "UnboundedLoopWarning",
    "WaitingForInput",
]


class LoomcError(Exception):
    """Base class of every error loomc raises on its own account."""


def _fmt(limit: str, value: float) -> str:
    if limit == "usd":
        return f"${value:.4f}"
    if limit == "wall_clock":
        return f"{value:.2f}s"
    return f"{value:g}"


class BudgetExhausted(LoomcError):
    """A budget limit stopped the run, or refused a charge that would cross a cap.

    Attributes:
        limit: ``"usd"``, ``"iterations"`` or ``"wall_clock"``.
        used: what had been used of that limit.
        cap: the limit itself.
        run_id: the run that stopped (``None`` for a refused charge outside a run).
        owner: the run whose cap was reached (the run itself or one of its ancestors).
        state: the run's state when it stopped (the state a resume starts from).
    """

    def __init__(
        self,
        limit: str,
        used: float,
        cap: float,
        *,
        run_id: str | None = None,
        owner: str | None = None,
        state: Any = None,
        requested: float | None = None,
    ) -> None:
        self.limit = limit
        self.used = used
        self.cap = cap
        self.max_val = cap  # loomc 0.3.0 name
        self.run_id = run_id
        self.owner = owner if owner is not None else run_id
        self.state = state
        self.requested = requested
        msg = f"Budget exhausted: {limit} ({_fmt(limit, used)} used of {_fmt(limit, cap)})"
        if requested is not None:
            msg += f"; a charge of {_fmt(limit, requested)} would cross the cap"
        if self.owner is not None and self.owner != run_id:
            msg += f" — the cap of enclosing run {self.owner}"
        if run_id is not None:
            msg += f". Run {run_id} keeps its state: resume it with a larger budget, e.g. fn.resume({run_id!r}, budget=Budget(...))"
        super().__init__(msg)


class CostError(LoomcError, ValueError):
    """An amount of money (a charge, a ``cost_fn`` result, a price) is not a finite number >= 0.

    NaN would pass every cap comparison and a negative amount would refill the budget, so
    such an amount is refused where it enters loomc; nothing is recorded.
    """


class RunContextLost(LoomcError):
    """A charge was made with no run in its context while a step of this process was running.

    A plain ``threading.Thread`` or a ``concurrent.futures`` executor does not carry the
    step's context, so loomc cannot tell which run the money belongs to. Wrap the thread's
    function with ``loomc.with_run_context(fn)``.
    """


class StallError(LoomcError):
    """The run made no score improvement in the last ``after`` scored steps.

    Attributes:
        run_id: the stalled run; resuming it continues (with whatever you changed).
        state: the state the next step would start from.
        best_state: the state of the best-scoring step so far.
        iterations: the stall window (``Escalate(after=n)``).
    """

    def __init__(
        self,
        iterations: int,
        *,
        run_id: str | None = None,
        state: Any = None,
        best_state: Any = None,
    ) -> None:
        self.iterations = iterations
        self.run_id = run_id
        self.state = state
        self.best_state = best_state
        msg = f"Loop stalled: no score improvement for {iterations} iterations"
        if run_id is not None:
            msg += f" (run {run_id}; change the prompt or strategy, then fn.resume({run_id!r}))"
        super().__init__(msg)


class RunNotFound(LoomcError, LookupError):
    """No run matches the given id or prefix."""

    def __init__(self, run_id: str, nearest: list[str] | None = None, where: str = "", hint: str | None = None) -> None:
        self.run_id = run_id
        self.nearest = nearest or []
        msg = f"no run {run_id!r}"
        if where:
            msg += f" in {where}"
        if self.nearest:
            msg += "; nearest: " + ", ".join(self.nearest)
        if hint:
            msg += f"; {hint}"
        elif not self.nearest:
            msg += "; list runs with `loomc runs`"
        super().__init__(msg)


class AmbiguousRunId(LoomcError, LookupError):
    """A run id prefix matches more than one run."""

    def __init__(self, prefix: str, matches: list[str]) -> None:
        self.prefix = prefix
        self.matches = matches
        shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
        super().__init__(f"run id prefix {prefix!r} is ambiguous ({shown}); give more characters")


class RunLocked(LoomcError):
    """The run is held by a live process; only one process may advance a run."""

    def __init__(self, run_id: str, owner: str, *, here: bool = False) -> None:
        self.run_id = run_id
        self.owner = owner
        if here:
            msg = (
                f"run {run_id} is already being driven by another thread or task of this process ({owner}); "
                "only one may advance a run: wait for that call to return, then resume"
            )
        else:
            msg = f"run {run_id} is running in live process {owner}; wait for it to finish or stop that process, then resume"
        super().__init__(msg)


class LeaseLost(LoomcError):
    """Another process took the run over (its lease had expired): this process's writes to it are refused.

    Nothing this process wrote to the run after the takeover is stored: the write that
    raised this was rolled back whole, and the run is left to its new owner.
    """

    def __init__(self, run_id: str, epoch: int | None, *, now_epoch: int | None = None, owner: str | None = None) -> None:
        self.run_id = run_id
        self.epoch = epoch
        self.now_epoch = now_epoch
        self.owner = owner
        by = f" by {owner}" if owner else ""
        at = f" (lease epoch {now_epoch}, this process held epoch {epoch})" if now_epoch is not None else ""
        super().__init__(
            f"run {run_id} was taken over{by}{at} after this process's lease on it expired (the process was "
            "paused or cut off longer than the lease); this process stopped writing to the run and nothing it did "
            f"since is stored. The new owner continues it: check it with `loomc show {run_id}`, and resume it "
            "yourself only once that process is gone"
        )


class SpecMismatch(LoomcError):
    """A run is being resumed by a different function or graph."""


class WaitingForInput(LoomcError):
    """The run stopped to wait for a person's answer to ``loomc.ask(question)``.

    Attributes:
        run_id: the run to reply to and resume (the top of its tree).
        question: what was asked.
        asking_run_id: the run whose step asked (``run_id`` itself, or a run nested in it).
        step: the step of ``asking_run_id`` that asked.
    """

    def __init__(
        self, run_id: str, question: str, *, asking_run_id: str | None = None, step: int | None = None,
        pending: Any = None,
    ) -> None:
        self.run_id = run_id
        #: the stored question (``loomc.store.protocol.Question``) when known
        self.pending = pending
        self.question = question
        self.asking_run_id = asking_run_id or run_id
        self.step = step
        where = "" if self.asking_run_id == run_id else f" (asked by its nested run {self.asking_run_id})"
        super().__init__(
            f"run {run_id} waits for an answer{where}: {question!r}. Answer it with "
            f"fn.reply({run_id!r}, answer) or `loomc reply {run_id} 'JSON'`, then resume it "
            f"(fn.resume({run_id!r}) or `loomc resume {run_id} --run`)"
        )


class InvalidAnswer(LoomcError, ValueError):
    """A reply to a question that its schema refuses (nothing was stored)."""


class StateError(LoomcError, TypeError):
    """A state cannot be serialised to JSON; nothing was written for that step."""


class StoreError(LoomcError):
    """The checkpoint database cannot be opened, read or written."""


class SchemaTooNew(StoreError):
    """The database was written by a newer loomc; it is left untouched."""


class CircuitOpenError(LoomcError):
    """A call was refused because its circuit breaker is open."""

    def __init__(self, name: str, retry_after: float) -> None:
        self.name = name
        self.retry_after = retry_after
        super().__init__(f"Circuit breaker open for {name!r}, retry after {retry_after:.1f}s")


class UnboundedLoopWarning(UserWarning):
    """A ``@loop`` has no budget limit and no ``converge_on``: only an error would end it."""


class EventCallbackWarning(UserWarning):
    """An event callback (``on_step=``) raised: reported once per run, and the run goes on."""
