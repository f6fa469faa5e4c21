"""Budgets (loomc 0.3.0 module path): ``Budget``, ``BudgetExhausted`` and a simple ledger."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from loomc._core.budget import Budget, parse_duration
from loomc._core.errors import BudgetExhausted

__all__ = ["Budget", "BudgetExhausted", "BudgetLedger"]


def _parse_duration(s: str) -> float:
    """Parse a duration such as ``"10m"`` into seconds (loomc 0.3.0 helper)."""
    return parse_duration(s)


@dataclass
class BudgetLedger:
    """A standalone tally of cost and iterations against a :class:`Budget` (loomc 0.3.0 API)."""

    total_cost_usd: float = 0.0
    total_iterations: int = 0
    start_time: float = field(default_factory=time.monotonic)

    def check_pre(self, budget: Budget) -> None:
        """Raise :class:`BudgetExhausted` if the next iteration may not start."""
        if budget.iterations is not None and self.total_iterations >= budget.iterations:
            raise BudgetExhausted("iterations", self.total_iterations, budget.iterations)
        if budget.usd is not None and self.total_cost_usd >= budget.usd:
            raise BudgetExhausted("usd", self.total_cost_usd, budget.usd)
        wc = budget.wall_clock_seconds
        if wc is not None:
            elapsed = time.monotonic() - self.start_time
            if elapsed >= wc:
                raise BudgetExhausted("wall_clock", elapsed, wc)

    def record(self, cost_usd: float = 0.0) -> None:
        """Count one iteration and its cost."""
        self.total_cost_usd += cost_usd
        self.total_iterations += 1

    def remaining(self, budget: Budget) -> Budget:
        """What is left of ``budget``."""
        usd = None if budget.usd is None else max(0.0, budget.usd - self.total_cost_usd)
        iters = None if budget.iterations is None else max(0, budget.iterations - self.total_iterations)
        wc = None
        if budget.wall_clock_seconds is not None:
            wc = max(0.0, budget.wall_clock_seconds - (time.monotonic() - self.start_time))
        return Budget(usd=usd, iterations=iters, wall_clock=wc)
