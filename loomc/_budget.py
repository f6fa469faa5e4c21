"""Budget limits and their parsing."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

__all__ = ["Budget", "parse_duration"]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")


def parse_duration(value: str | float | timedelta) -> float:
    """Parse ``"30s"``, ``"10m"``, ``"1h30m"``, ``"500ms"``, seconds or a ``timedelta``.

    Raises:
        ValueError: for a negative, NaN, infinite or unparseable duration.
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: use seconds or a string like '10m'")
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        pos, seconds = 0, 0.0
        for m in _PART.finditer(text):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(text) or not text:
            try:
                seconds = float(text)
            except ValueError:
                raise ValueError(
                    f"invalid duration {value!r}: use e.g. '30s', '10m', '1h30m', '500ms' "
                    "or a number of seconds"
                ) from None
    else:
        raise ValueError(f"invalid duration {value!r}: use seconds, a string like '10m' or a timedelta")
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must be a finite, non-negative time")
    return seconds


def _check_number(name: str, value: Any, *, integer: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Budget({name}={value!r}): must be a number or None")
    if integer and (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"Budget({name}={value!r}): must be a whole number")
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ValueError(f"Budget({name}={value!r}): must be finite and non-negative")


@dataclass(frozen=True)
class Budget:
    """Hard limits for a run: ``usd`` spent, ``iterations`` started, ``wall_clock`` active time.

    ``None`` means unlimited. ``wall_clock`` takes ``"30s"``, ``"10m"``, ``"1h30m"``,
    ``"500ms"``, a number of seconds or a ``timedelta``. Bad values raise ``ValueError``
    here, not at run time.
    """

    usd: float | None = None
    iterations: int | None = None
    wall_clock: str | float | timedelta | None = None
    wall_clock_seconds: float | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_number("usd", self.usd)
        _check_number("iterations", self.iterations, integer=True)
        if self.iterations is not None and not isinstance(self.iterations, int):
            object.__setattr__(self, "iterations", int(self.iterations))
        seconds = None if self.wall_clock is None else parse_duration(self.wall_clock)
        object.__setattr__(self, "wall_clock_seconds", seconds)

    def to_dict(self) -> dict[str, float | None]:
        """The limits as plain numbers (seconds for ``wall_clock``)."""
        return {"usd": self.usd, "iterations": self.iterations, "wall_clock": self.wall_clock_seconds}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Budget:
        """Rebuild a budget written by :meth:`to_dict`."""
        data = data or {}
        return cls(usd=data.get("usd"), iterations=data.get("iterations"), wall_clock=data.get("wall_clock"))
