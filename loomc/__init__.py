"""loomc: durable, budgeted agent loops.

Write one iteration of an agent; ``@loop`` runs it as a loop with hard budgets, a
checkpoint after every step, resume, convergence detection, backtracking and stall
escalation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# ``loomc.loop`` is both a submodule (0.3.0 path) and the decorator: import the
# module first, then bind the name to the decorator.
from loomc.loop import AsyncLoopRunner, LoopRunner, loop  # isort: skip
from loomc import circuit_breaker as _circuit_breaker_module  # isort: skip
from loomc._core.budget import Budget
from loomc._core.context import Reservation, RunView, areserve, charge, current_run, reserve, with_run_context
from loomc._core.detectors import BestScore, Escalate, JudgeDetector, LastGood, judge, predicate, score_plateau
from loomc._core.errors import (
    AmbiguousRunId,
    BudgetExhausted,
    CircuitOpenError,
    CostError,
    EventCallbackWarning,
    InvalidAnswer,
    LeaseLost,
    LoomcError,
    RunContextLost,
    RunLocked,
    RunNotFound,
    SchemaTooNew,
    SpecMismatch,
    StallError,
    StateError,
    StoreError,
    UnboundedLoopWarning,
    WaitingForInput,
)
from loomc._core.human import ask
from loomc._core.observe import RunEvent, RunFinished, RunStarted, StepCommitted
from loomc._core.retry import Retry
from loomc._core.types import RunInfo, RunResult, RunStatus, StepRecord
from loomc.circuit_breaker import BreakerState, CircuitBreaker, circuit_breaker
from loomc.integrations.semantic import SemanticDelta, semantic_delta
from loomc.store.sqlite.aio import AsyncCheckpointStore, AsyncSQLiteStore
from loomc.store.sqlite.sync import CheckpointStore, MemoryStore, SQLiteStore

if TYPE_CHECKING:
    from loomc.integrations.adapters import AnthropicAdapter, OpenAIAdapter
    from loomc.store.postgres.aio import AsyncPostgresStore
    from loomc.store.postgres.sync import PostgresStore

__version__ = "0.5.0"

__all__ = [
    "AmbiguousRunId",
    "AnthropicAdapter",
    "AsyncCheckpointStore",
    "AsyncLoopRunner",
    "AsyncPostgresStore",
    "AsyncSQLiteStore",
    "BestScore",
    "BreakerState",
    "Budget",
    "BudgetExhausted",
    "CheckpointStore",
    "CircuitBreaker",
    "CircuitOpenError",
    "CostError",
    "Escalate",
    "EventCallbackWarning",
    "InvalidAnswer",
    "JudgeDetector",
    "LastGood",
    "LeaseLost",
    "LoomcError",
    "LoopRunner",
    "MemoryStore",
    "OpenAIAdapter",
    "PostgresStore",
    "Reservation",
    "Retry",
    "RunContextLost",
    "RunEvent",
    "RunFinished",
    "RunInfo",
    "RunLocked",
    "RunNotFound",
    "RunResult",
    "RunStarted",
    "RunStatus",
    "RunView",
    "SQLiteStore",
    "SchemaTooNew",
    "SemanticDelta",
    "SpecMismatch",
    "StallError",
    "StateError",
    "StepCommitted",
    "StepRecord",
    "StoreError",
    "UnboundedLoopWarning",
    "WaitingForInput",
    "areserve",
    "ask",
    "charge",
    "circuit_breaker",
    "current_run",
    "judge",
    "loop",
    "predicate",
    "reserve",
    "score_plateau",
    "semantic_delta",
    "with_run_context",
]

_LAZY = {
    "AnthropicAdapter": "loomc.integrations.adapters",
    "OpenAIAdapter": "loomc.integrations.adapters",
    "PostgresStore": "loomc.store.postgres.sync",
    "AsyncPostgresStore": "loomc.store.postgres.aio",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loomc' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


del _circuit_breaker_module
