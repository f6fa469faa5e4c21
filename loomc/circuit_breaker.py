"""Circuit breakers (loomc 0.3.0 module path): see :mod:`loomc._core.breaker`."""

from __future__ import annotations

from loomc._core.breaker import Backoff, BreakerPolicy, BreakerState, BreakerStatus, CircuitBreaker, admit, circuit_breaker, settle
from loomc._core.errors import CircuitOpenError, LoomcError

__all__ = ["Backoff", "BreakerPolicy", "BreakerState", "BreakerStatus", "CircuitBreaker", "CircuitOpenError"]
__all__ += ["LoomcError", "admit", "circuit_breaker", "settle"]
