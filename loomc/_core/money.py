"""The one check every amount of money passes where it enters loomc.

Charges, reservations, settlements, ``cost_fn`` results, adapters' computed costs and
prices all go through :func:`check_usd` once, where they come in, so a NaN, an infinity
or a negative number never reaches a ledger: NaN would pass every cap comparison, an
infinity would poison the totals, and a negative amount would refill the budget.
"""

from __future__ import annotations

import math
import numbers
from decimal import Decimal

from loomc._core.errors import CostError

__all__ = ["check_usd"]


def check_usd(value: object, what: str, *, unit: str = "USD", hint: str = "") -> float:
    """``value`` as a float if it is a finite number >= 0, else :class:`CostError`.

    Args:
        value: the amount (``int``, ``float``, a numpy scalar, ``Decimal`` or ``Fraction``).
        what: where it came from, for the message (e.g. ``"the cost returned by cost_fn"``).
        unit: what the number counts (``"USD"``, ``"USD per 1M tokens"``).
        hint: what to do about it, appended to the message.

    Raises:
        CostError: the value is not a number, is NaN or infinite, or is negative.
    """
    if type(value) is float:  # the common case: one comparison
        if 0 <= value < math.inf:
            return value
    elif isinstance(value, (numbers.Real, Decimal)) and not isinstance(value, bool):
        try:
            usd = float(value)
        except (ValueError, OverflowError):  # a signalling Decimal NaN, a huge int
            usd = math.nan
        if 0 <= usd < math.inf:
            return usd
    tail = f"; {hint}" if hint else ""
    raise CostError(f"{what} is {value!r}: it must be a finite, non-negative number of {unit}{tail}")
