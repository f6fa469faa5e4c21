"""The ``@loop`` decorator and runners (loomc 0.3.0 module path)."""

from __future__ import annotations

from loomc._core.context import _current_ledger
from loomc._core.detectors import Escalate
from loomc._core.errors import StallError
from loomc._core.runner import AsyncLoopRunner, LoopRunner, loop

__all__ = ["AsyncLoopRunner", "Escalate", "LoopRunner", "StallError", "loop"]

# loomc 0.3.0 named the current run's ledger ``_parent_ledger`` (the parent of any loop a step starts).
_parent_ledger = _current_ledger
