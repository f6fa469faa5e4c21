"""Step events: what happened during a step, as records.

A step's events are a list of small JSON-ready dicts, each with a ``kind``:

=================  =====================================================================
kind               fields
=================  =====================================================================
``backtrack``      ``to``: the step the next step starts from (``-1``: the input)
``converged``      (none): ``converge_on`` ended the run
``stalled``        ``after``: ``on_stall`` ended the run (no improvement in that many steps)
``retry``          ``attempt`` (1 for the first retry), ``delay_s``, ``error``
``retry_skipped``  ``reason`` (``"budget"`` or ``"wall_clock"``), ``error``, and
                   ``usd_left``/``estimate_usd`` or ``delay_s``
``breaker``        ``name``, ``from``, ``to``, and when it opens ``failures``, ``cooldown_s``
``held_charge``    ``usd``: holds of an earlier attempt charged when this one resumed
``budget``         ``limit``, ``used``, ``cap`` and ``owner`` (an enclosing run's id, or
                   ``None``): a budget stopped the run at this step
``note``           ``text``: anything else (an event written by an older loomc)
=================  =====================================================================

They are stored as a JSON list in ``steps.event``. :func:`text` renders one as the line
loomc 0.3.0 stored (``"backtrack to step 2"``), which ``StepRecord.event`` joins with
``"; "``; :func:`parse_text` turns such a line back into records (the v3 -> v4 migration,
and databases read without migrating).
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["Event", "backtrack", "breaker", "decode", "encode", "parse_text", "text"]

#: One event: ``{"kind": ..., ...}`` (JSON-ready).
Event = dict[str, Any]


def backtrack(to: int) -> Event:
    """The next step starts from step ``to`` (``-1``: the input) instead of the last one."""
    return {"kind": "backtrack", "to": to}


def breaker(name: str, old: str, new: str, failures: int | None = None, cooldown_s: float | None = None) -> Event:
    """Circuit breaker ``name`` went from state ``old`` to ``new`` during the step."""
    ev: Event = {"kind": "breaker", "name": name, "from": old, "to": new}
    if failures is not None:
        ev["failures"] = failures
        ev["cooldown_s"] = cooldown_s
    return ev


def text(ev: Event) -> str:
    """The one-line text of an event (loomc 0.3.0's wording where 0.3.0 had the event)."""
    kind = ev.get("kind")
    try:
        if kind == "backtrack":
            to = int(ev["to"])
            return "backtrack to input" if to < 0 else f"backtrack to step {to}"
        if kind in ("converged", "stalled"):
            return str(kind)
        if kind == "retry":
            return f"retry {ev['attempt']} in {float(ev['delay_s']):.2f}s after {ev['error']}"
        if kind == "retry_skipped":
            if ev.get("reason") == "budget":
                return (f"retry skipped after {ev['error']}: the budget has ${float(ev['usd_left']):.4f} left, "
                        f"an attempt costs about ${float(ev['estimate_usd']):.4f}")
            return f"retry skipped after {ev['error']}: waiting {float(ev['delay_s']):.2f}s would pass the wall clock"
        if kind == "breaker":
            line = f"breaker {ev['name']}: {ev['from']} -> {ev['to']}"
            if ev.get("failures") is not None:
                line += f" ({ev['failures']} failures, cooldown {float(ev['cooldown_s']):g}s)"
            return line
        if kind == "held_charge":
            return f"held charge ${float(ev['usd']):.4f} (calls in flight when an earlier attempt stopped)"
        if kind == "budget":
            owner = ev.get("owner")
            return f"budget: {ev['limit']}" + (f" (enclosing run {owner})" if owner else "")
        if kind == "note":
            return str(ev.get("text", ""))
    except (KeyError, TypeError, ValueError):
        pass  # a record missing a field (written by hand): shown as its JSON
    return json.dumps(ev, sort_keys=True, default=str)


def encode(events: list[Event]) -> str | None:
    """The stored form of a step's events: a JSON list, or ``None`` for none."""
    return json.dumps(events, separators=(",", ":"), default=str) if events else None


#: Stored forms already decoded, as read-only copies. A long run repeats a few forms (the
#: same backtrack, a converged) over thousands of steps, and ``loomc show`` reads them all.
_DECODED: dict[str, tuple[Event, ...]] = {}
_DECODED_MAX = 512
_SCALARS = (str, int, float, bool, type(None))


def decode(stored: str | None) -> list[Event]:
    """A step's events from their stored form (a JSON list, or the text an older loomc stored).

    Every call returns new lists and dicts: a caller may change what it gets.
    """
    if not stored:
        return []
    known = _DECODED.get(stored)
    if known is not None:
        return [dict(e) for e in known]
    events = _parse(stored)
    # Only records of plain values are kept: a copy of one then shares nothing mutable.
    if all(isinstance(v, _SCALARS) for e in events for v in e.values()):
        if len(_DECODED) >= _DECODED_MAX:
            _DECODED.clear()
        _DECODED[stored] = tuple(dict(e) for e in events)
    return events


def _parse(stored: str) -> list[Event]:
    """The records in ``stored``: its JSON list, else the records of an older loomc's line."""
    if stored[0] == "[":
        try:
            value = json.loads(stored)
        except ValueError:
            value = None
        if isinstance(value, list) and all(isinstance(e, dict) and "kind" in e for e in value):
            return value
    return parse_text(stored)


def migrate(stored: str | None) -> str | None:
    """The v4 form (a JSON list) of a ``steps.event`` value written by schema v3 or older."""
    return encode(decode(stored))


# Where an event starts in a "; "-joined line (an error text inside an event may hold "; ").
_START = re.compile(r"(backtrack to |converged$|stalled$|retry |breaker |held charge |budget: )")
_PATTERNS: tuple[tuple[re.Pattern[str], Any], ...] = (
    (re.compile(r"backtrack to input"), lambda m: backtrack(-1)),
    (re.compile(r"backtrack to step (-?\d+)"), lambda m: backtrack(int(m[1]))),
    (re.compile(r"(converged|stalled)"), lambda m: {"kind": m[1]}),
    (re.compile(r"retry (\d+) in ([0-9.]+)s after (.*)", re.S),
     lambda m: {"kind": "retry", "attempt": int(m[1]), "delay_s": float(m[2]), "error": m[3]}),
    (re.compile(r"retry skipped after (.*): the budget has \$([0-9.]+) left, an attempt costs about \$([0-9.]+)", re.S),
     lambda m: {"kind": "retry_skipped", "reason": "budget", "error": m[1], "usd_left": float(m[2]),
                "estimate_usd": float(m[3])}),
    (re.compile(r"retry skipped after (.*): waiting ([0-9.]+)s would pass the wall clock", re.S),
     lambda m: {"kind": "retry_skipped", "reason": "wall_clock", "error": m[1], "delay_s": float(m[2])}),
    (re.compile(r"breaker (.+): (\w+) -> (\w+) \((\d+) failures, cooldown ([0-9.e+-]+)s\)", re.S),
     lambda m: breaker(m[1], m[2], m[3], int(m[4]), float(m[5]))),
    (re.compile(r"breaker (.+): (\w+) -> (\w+)", re.S), lambda m: breaker(m[1], m[2], m[3])),
    (re.compile(r"budget: (\w+)(?: \(enclosing run (.+)\))?"),
     lambda m: {"kind": "budget", "limit": m[1], "used": None, "cap": None, "owner": m[2]}),
)


def parse_text(line: str) -> list[Event]:
    """Records from a ``"; "``-joined event line as loomc up to schema v3 stored it.

    Text loomc does not recognise is kept whole as ``{"kind": "note", "text": ...}``.
    """
    parts: list[str] = []
    for piece in line.split("; "):
        if parts and not _START.match(piece):
            parts[-1] += "; " + piece  # part of the previous event (an error text with "; ")
        else:
            parts.append(piece)
    out: list[Event] = []
    for part in parts:
        for pattern, build in _PATTERNS:
            m = pattern.fullmatch(part)
            if m is not None:
                out.append(build(m))
                break
        else:
            if part.strip():
                out.append({"kind": "note", "text": part})
    return out
