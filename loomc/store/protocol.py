"""What a checkpoint store is: the ``CheckpointStore`` protocols and the data they carry.

Every store (SQLite, memory, a user's own) implements :class:`CheckpointStore`; the async
driver uses :class:`AsyncCheckpointStore` (the same methods, awaited). The engine, the
graph layer and the CLI reach stores only through these methods. The first six are
loomc 0.3.0's store API and stay as they were.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

from loomc._core.holds import HeldCharge
from loomc._core.types import RunInfo, RunStatus, StepRecord

__all__ = [
    "AsyncCheckpointStore",
    "CheckpointStore",
    "Durability",
    "NewRun",
    "PruneReport",
    "PruneRequest",
    "Question",
    "ResumePoint",
    "RunLifeStore",
    "RunSearch",
    "SchemaInfo",
    "StepRow",
    "StoredInput",
    "StoredStep",
    "WaitRow",
    "default_db_path",
    "new_run_id",
]

Durability = Literal["power", "process"]


def default_db_path() -> Path:
    """``$LOOMC_DB``, else ``.loomc/checkpoints.db`` under the working directory."""
    env = os.environ.get("LOOMC_DB")
    return Path(env) if env else Path.cwd() / ".loomc" / "checkpoints.db"


def new_run_id() -> str:
    """A fresh run id: 12 lowercase hex characters."""
    return secrets.token_hex(6)


@dataclass(frozen=True)
class NewRun:
    """What a store needs to create a run."""

    spec_hash: str
    name: str = ""
    kind: str = "loop"
    run_id: str | None = None
    parent_run_id: str | None = None
    parent_step: int | None = None
    call_index: int | None = None
    root_run_id: str | None = None
    state_type: str | None = "json"
    input_blob: str | bytes | None = None
    budget: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None
    owner: str | None = None
    cost_usd: float = 0.0


@dataclass(frozen=True)
class ResumePoint:
    """Where a run picks up: the state the next step starts from and its history.

    With ``partial``, ``history`` holds only the last step; the engine reads the earlier
    ones (``step_history``) when a strategy, a detector or the result first needs them.
    ``in_flight_usd`` is what the children of the step not yet committed have spent: the
    run's stored total includes it (children roll their spending up as they commit), and a
    re-found child's spending is taken from it rather than counted again.
    """

    info: RunInfo
    state_type: str | None
    start_blob: str | bytes | None
    next_from: int
    history: list[StepRecord]
    partial: bool = False
    in_flight_usd: float = 0.0


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~1.3 us per step more
class StepRow:
    """One step as committed: the step row and the run totals after it (plain data; treat as read-only)."""

    step_n: int
    state_blob: str | bytes | None
    cost_usd: float
    score: float | None
    timestamp: str
    error: str | None
    event: str | None
    next_from: int
    duration_s: float
    # run totals after this step
    total_cost: float
    total_steps: int
    total_wall_s: float
    max_step_cost: float
    status: str
    stop_reason: str | None
    #: The runs above this one (parent first): the step's cost is added to their totals as
    #: it commits, so a parent's stored total never lags what its descendants committed.
    ancestors: tuple[str, ...] = ()
    #: ids of the durable holds this step's cost now accounts for (removed with the step)
    holds: tuple[int, ...] | None = None


class StoredStep(NamedTuple):
    """A committed step as stored: its state in stored form (a delta made whole), not decoded."""

    step_n: int
    state: str | bytes
    cost_usd: float
    score: float | None
    timestamp: str
    error: str | None
    event: str | None


class StoredInput(NamedTuple):
    """A run's input as stored, how its states are typed and where its next step starts."""

    state_type: str | None
    input_blob: str | bytes | None
    next_from: int | None


class Question(NamedTuple):
    """A question a run's step asked (``loomc.ask``), and its answer once given.

    Keyed by ``(run_id, step_n, call_index)``: the ``call_index``-th ``ask`` of that step.
    ``answer`` is JSON text (``None`` while unanswered); ``schema_ref`` names the schema's
    class (``module:qualname``) when it is one, ``json_schema`` is its JSON schema (text).
    """

    run_id: str
    step_n: int
    call_index: int
    text: str
    schema_ref: str | None
    json_schema: str | None
    asked_at: str
    answer: str | None = None
    answered_at: str | None = None


@dataclass(frozen=True)
class WaitRow:
    """A run stops to wait for an answer: its totals (the discarded step's charges kept) and the question.

    ``question`` is ``None`` when the question was asked by a run nested in this one (it
    is stored with that run). ``ancestors`` and ``holds`` are as in :class:`StepRow`.
    """

    total_cost: float
    wall_s: float
    reason: str
    question: Question | None = None
    ancestors: tuple[str, ...] = ()
    holds: tuple[int, ...] | None = None


@dataclass(frozen=True)
class PruneRequest:
    """Which run trees ``prune`` removes (every filter given must hold).

    Args:
        older_than_s: only runs not updated for this many seconds.
        statuses: only runs with one of these statuses (``None``: every finished status).
        name: only runs whose name matches this glob pattern (``fnmatch``).
        keep_last: of each name, keep the newest this many runs that match.
        now: the time ages are measured from (``time.time()``; for tests).
    """

    older_than_s: float | None = None
    statuses: tuple[str, ...] | None = None
    name: str | None = None
    keep_last: int | None = None
    now: float | None = None


@dataclass
class PruneReport:
    """What ``prune`` removed (or, with ``dry_run``, would remove)."""

    roots: list[RunInfo]
    runs: int = 0
    steps: int = 0
    blobs: int = 0
    questions: int = 0
    bytes_freed: int = 0
    dry_run: bool = False
    #: roots chosen but left alone: they started running (or waiting) meanwhile
    skipped: list[str] = field(default_factory=list)


class SchemaInfo(NamedTuple):
    """The version of a store's schema and the versions this loomc reads and writes."""

    version: int
    reads_from: int
    current: int


@runtime_checkable
class RunSearch(Protocol):
    """An optional capability: a page of runs, narrowed and paged by the database.

    ``loomc ui`` lists runs through it when a store has it (SQLite and memory do), so a
    page of 100,000 runs reads about a page of rows; for a store without it the page is
    cut from ``list_runs``.
    """

    def search_runs(
        self, *, status: str | None = None, roots_only: bool = False, id_prefix: str | None = None,
        name: str | None = None, before: tuple[str, str] | None = None, limit: int = 50,
    ) -> list[RunInfo]:
        """Up to ``limit`` runs, newest first (by ``(created_at, id)``).

        Args:
            status: only runs with this status (``crashed``: running runs whose owner died).
            roots_only: only top-level runs (no nested loops, graph nodes or map items).
            id_prefix: only runs whose id starts with this.
            name: only runs whose name holds this text (ASCII letters in either case).
            before: only runs after this ``(created_at, id)`` in that order: the cursor of
                the next page is the last run of this one.
            limit: the size of the page.
        """
        ...


@runtime_checkable
class CheckpointStore(Protocol):
    """Everything the engine, the graph layer and the CLI ask of a checkpoint store (synchronous).

    The first six methods are loomc 0.3.0's store API. Run ids passed to any method but
    ``resolve`` are full ids. Writes are atomic: each either happens whole or not at all.
    """

    @property
    def db_path(self) -> str:
        """Where the store keeps its runs (a file path, or a name such as ``":memory:"``)."""
        ...

    # -- loomc 0.3.0
    def create_run(self, spec_hash: str, **kwargs: Any) -> str: ...
    def get_run(self, run_id: str) -> RunInfo | None: ...
    def list_runs(self, *, status: str | None = None, limit: int | None = None, roots_only: bool = False) -> list[RunInfo]: ...
    def update_run_status(self, run_id: str, status: RunStatus | str) -> None: ...
    def save_step(self, run_id: str, record: StepRecord) -> None: ...
    def load_steps(self, run_id: str) -> list[StepRecord]: ...

    # -- runs
    def resolve(self, run_id: str) -> str: ...
    def begin_run(self, new: NewRun) -> str: ...
    def acquire(self, run_id: str, owner: str, budget: dict[str, Any] | None = None) -> None: ...
    def renew_leases(self, owner: str, run_ids: list[str]) -> list[str] | None: ...
    def finish_run(self, run_id: str, status: RunStatus, stop_reason: str | None, wall_s: float) -> None: ...
    def set_meta(self, run_id: str, meta: dict[str, Any]) -> None: ...
    def add_cost(self, run_id: str, usd: float) -> None: ...
    def find_child(self, parent_run_id: str, parent_step: int, call_index: int) -> RunInfo | None: ...
    def children(self, run_id: str) -> list[RunInfo]: ...
    def schema_info(self) -> SchemaInfo: ...

    # -- steps
    def commit_step(self, run_id: str, row: StepRow) -> None: ...
    def resume_point(self, run_id: str) -> ResumePoint: ...
    def step_history(self, run_id: str, before: int) -> list[StepRecord]: ...
    def load_state(self, run_id: str, step_n: int) -> Any: ...
    def stored_state(self, run_id: str, step_n: int) -> str | bytes | None: ...
    def stored_input(self, run_id: str) -> StoredInput | None: ...
    def stored_steps(self, run_id: str) -> list[StoredStep]: ...
    def step_window(
        self, run_id: str, after: int = -1, *, first: int | None = None, last: int | None = None,
        error_chars: int | None = None,
    ) -> list[StepRecord]: ...
    def step_totals(self, run_id: str, before: int) -> tuple[int, float]: ...

    # -- holds (``loomc._core.holds``)
    def put_hold(self, run_id: str, hold_id: int, usd: float) -> None: ...
    def drop_holds(self, hold_ids: tuple[int, ...]) -> None: ...
    def charge_holds(self, run_id: str) -> HeldCharge | None: ...

    def close(self) -> None: ...


@runtime_checkable
class RunLifeStore(Protocol):
    """What a store provides for a run's whole life: questions, forks and pruning (optional).

    loomc's stores implement it; a store of your own may leave it out, and then
    ``loomc.ask``, ``fn.fork`` and ``prune`` say that the store does not support them.
    """

    def questions(self, run_id: str, tree: bool = False) -> list[Question]: ...
    def wait_for_input(self, run_id: str, row: WaitRow) -> None: ...
    def answer(self, question: Question, answer: str) -> None: ...
    def fork(
        self, run_id: str, at_step: int, *, new_run_id: str, state_blob: str | bytes | None = None,
        budget: dict[str, Any] | None = None,
    ) -> str: ...
    def prune(self, request: PruneRequest | None = None, *, dry_run: bool = False) -> PruneReport: ...


@runtime_checkable
class AsyncCheckpointStore(Protocol):
    """What the async driver needs from a checkpoint backend: ``CheckpointStore``, awaited.

    An implementation is also an async context manager: the driver enters it for the
    length of a run (open connections there, release them on exit).
    """

    is_async: bool

    async def __aenter__(self) -> Any: ...
    async def __aexit__(self, *exc: object) -> None: ...

    async def create_run(self, spec_hash: str, **kwargs: Any) -> str: ...
    async def get_run(self, run_id: str) -> RunInfo | None: ...
    async def list_runs(self, *, status: str | None = None, limit: int | None = None, roots_only: bool = False) -> list[RunInfo]: ...
    async def update_run_status(self, run_id: str, status: RunStatus | str) -> None: ...
    async def save_step(self, run_id: str, record: StepRecord) -> None: ...
    async def load_steps(self, run_id: str) -> list[StepRecord]: ...

    async def resolve(self, run_id: str) -> str: ...
    async def begin_run(self, new: NewRun) -> str: ...
    async def acquire(self, run_id: str, owner: str, budget: dict[str, Any] | None = None) -> None: ...
    async def renew_leases(self, owner: str, run_ids: list[str]) -> list[str] | None: ...
    async def finish_run(self, run_id: str, status: RunStatus, stop_reason: str | None, wall_s: float) -> None: ...
    async def set_meta(self, run_id: str, meta: dict[str, Any]) -> None: ...
    async def add_cost(self, run_id: str, usd: float) -> None: ...
    async def find_child(self, parent_run_id: str, parent_step: int, call_index: int) -> RunInfo | None: ...
    async def children(self, run_id: str) -> list[RunInfo]: ...
    async def schema_info(self) -> SchemaInfo: ...

    async def commit_step(self, run_id: str, row: StepRow) -> None: ...
    async def resume_point(self, run_id: str) -> ResumePoint: ...
    async def step_history(self, run_id: str, before: int) -> list[StepRecord]: ...
    async def load_state(self, run_id: str, step_n: int) -> Any: ...
    async def stored_state(self, run_id: str, step_n: int) -> str | bytes | None: ...
    async def stored_input(self, run_id: str) -> StoredInput | None: ...
    async def stored_steps(self, run_id: str) -> list[StoredStep]: ...
    async def step_window(
        self, run_id: str, after: int = -1, *, first: int | None = None, last: int | None = None,
        error_chars: int | None = None,
    ) -> list[StepRecord]: ...
    async def step_totals(self, run_id: str, before: int) -> tuple[int, float]: ...

    async def put_hold(self, run_id: str, hold_id: int, usd: float) -> None: ...
    async def drop_holds(self, hold_ids: tuple[int, ...]) -> None: ...
    async def charge_holds(self, run_id: str) -> HeldCharge | None: ...
