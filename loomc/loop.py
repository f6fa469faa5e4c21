"""The ``@loop`` decorator and runners (loomc 0.3.0 module path)."""

from __future__ import annotations

from loomc._core.context import _parent_ledger
from loomc._core.detectors import Escalate
from loomc._core.errors import StallError
from loomc._core.runner import AsyncLoopRunner, LoopRunner, loop

__all__ = ["AsyncLoopRunner", "Escalate", "LoopRunner", "StallError", "loop"]
_ = _parent_ledger  # re-exported for code written against 0.3.0
