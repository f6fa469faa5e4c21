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


#: The limits a ``Budget`` holds, in the order they print.
LIMITS = ("usd", "iterations", "wall_clock")


def _is_inf(value: Any) -> bool:
    """``math.inf`` (or the text ``"inf"``): the caller asks for no limit."""
    if isinstance(value, str):
        return value.strip().lower() in ("inf", "infinity")
    return isinstance(value, float) and value == math.inf


def _check_number(name: str, value: Any, *, integer: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Budget({name}={value!r}): must be a number, math.inf (no limit) or None")
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ValueError(f"Budget({name}={value!r}): must be finite and non-negative (math.inf for no limit)")
    if integer and (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"Budget({name}={value!r}): must be a whole number")


@dataclass(frozen=True)
class Budget:
    """Hard limits for a run: ``usd`` spent, ``iterations`` started, ``wall_clock`` active time.

    ``None`` means unlimited. ``wall_clock`` takes ``"30s"``, ``"10m"``, ``"1h30m"``,
    ``"500ms"``, a number of seconds or a ``timedelta``. Bad values raise ``ValueError``
    here, not at run time.

    ``math.inf`` also means unlimited, and says so on purpose: given to ``resume``, a
    limit left as ``None`` keeps the run's own, while ``math.inf`` removes it (see
    :meth:`merged`). The attribute then reads ``None``, as it is stored.
    """

    usd: float | None = None
    iterations: int | float | None = None  # a whole number, or math.inf for no limit
    wall_clock: str | float | timedelta | None = None
    wall_clock_seconds: float | None = field(init=False, repr=False, compare=False)
    #: The limits given as ``math.inf``: removed by :meth:`merged`, not kept.
    removed: frozenset[str] = field(init=False, repr=False, compare=True)

    def __post_init__(self) -> None:
        removed = frozenset(name for name in LIMITS if _is_inf(getattr(self, name)))
        for name in removed:
            object.__setattr__(self, name, None)
        object.__setattr__(self, "removed", removed)
        _check_number("usd", self.usd)
        _check_number("iterations", self.iterations, integer=True)
        if self.iterations is not None and not isinstance(self.iterations, int):
            object.__setattr__(self, "iterations", int(self.iterations))
        seconds = None if self.wall_clock is None else parse_duration(self.wall_clock)
        object.__setattr__(self, "wall_clock_seconds", seconds)

    def __repr__(self) -> str:
        given = {"usd": self.usd, "iterations": self.iterations, "wall_clock": self.wall_clock}
        parts = [f"{k}=math.inf" if k in self.removed else f"{k}={v!r}" for k, v in given.items() if v is not None or k in self.removed]
        return f"Budget({', '.join(parts)})"

    def to_dict(self) -> dict[str, float | None]:
        """The limits as plain numbers (seconds for ``wall_clock``)."""
        return {"usd": self.usd, "iterations": self.iterations, "wall_clock": self.wall_clock_seconds}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Budget:
        """Rebuild a budget written by :meth:`to_dict`."""
        data = data or {}
        return cls(usd=data.get("usd"), iterations=data.get("iterations"), wall_clock=data.get("wall_clock"))

    @classmethod
    def merged(cls, stored: Budget | dict[str, Any] | None, given: Budget | None) -> Budget:
        """The limits a resumed run gets: ``stored`` with what ``given`` names replaced.

        A limit ``given`` sets replaces the stored one, a limit it leaves as ``None`` is
        kept, and a limit it sets to ``math.inf`` is removed. ``resume(budget=...)``, the
        graph's resume and the CLI's ``--usd/--iterations/--wall-clock`` all use this.

        Args:
            stored: the run's own limits (a ``Budget`` or the dict :meth:`to_dict` wrote;
                ``None`` for none).
            given: the new limits, or ``None`` to keep the run's own.

        Returns:
            The limits to run with (``None`` wherever there is no limit).
        """
        base = stored if isinstance(stored, Budget) else cls.from_dict(stored)
        if given is None:
            return base
        kept = base.to_dict()
        named = {"usd": given.usd, "iterations": given.iterations, "wall_clock": given.wall_clock}
        # A removed limit stays marked as removed, so merging the result again changes nothing.
        limits: dict[str, Any] = {
            name: math.inf if name in given.removed else (kept[name] if named[name] is None else named[name])
            for name in LIMITS
        }
        return cls(**limits)
