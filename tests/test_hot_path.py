"""The step hot path: what one committed step costs in statements, Python calls and event-loop turns.

Timings drift with the machine; these counts do not. Each is taken as the difference
between a long and a short run of the same loop, so start-up and finish cancel out.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from loomc import Budget, loop

SHORT, LONG = 20, 60


def _sync_loop(db: Path, steps: int) -> Any:
    @loop(budget=Budget(iterations=steps), checkpoint=str(db), durability="process", name="hot")
    def step(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    return step


def _async_loop(db: Path, steps: int) -> Any:
    @loop(budget=Budget(iterations=steps), checkpoint=str(db), durability="process", name="hot-async")
    async def step(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    return step


@contextmanager
def _profiled(count: Callable[[FrameType], bool]) -> Iterator[list[int]]:
    """Count the Python calls for which ``count(frame)`` holds, in this thread."""
    seen = [0]

    def prof(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and count(frame):
            seen[0] += 1

    sys.setprofile(prof)
    try:
        yield seen
    finally:
        sys.setprofile(None)


def _per_step(measure: Callable[[int], int]) -> float:
    return (measure(LONG) - measure(SHORT)) / (LONG - SHORT)


def test_a_step_commits_with_four_statements(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sync step executes BEGIN IMMEDIATE, one INSERT, one UPDATE and COMMIT: nothing else reaches SQLite."""
    statements: list[str] = []
    real_connect = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real_connect(*args, **kwargs)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect)

    def measure(steps: int) -> int:
        statements.clear()
        _sync_loop(tmp_path / f"s{steps}.db", steps).run({"n": 0})
        return len(statements)

    assert _per_step(measure) == 4
    per_step = [s.split(" (")[0].split(" SET")[0] for s in statements[-4 * 10 - 4 : -4]]
    assert set(per_step) == {"BEGIN IMMEDIATE", "INSERT OR REPLACE INTO steps", "UPDATE runs", "COMMIT"}


def test_a_sync_step_makes_few_python_calls(tmp_path: Path) -> None:
    """A no-op sync step costs at most 34 Python calls (generator resumptions included), loomc's and the step's."""

    def measure(steps: int) -> int:
        runner = _sync_loop(tmp_path / f"c{steps}.db", steps)
        with _profiled(lambda frame: True) as seen:
            runner.run({"n": 0})
        return seen[0]

    assert _per_step(measure) <= 34


def test_an_async_commit_takes_few_event_loop_callbacks(tmp_path: Path) -> None:
    """On asyncio a committed async step runs four loop callbacks (five allowed): the writer thread wakes its writer directly."""

    def is_callback(frame: FrameType) -> bool:
        code = frame.f_code
        return code.co_name == "_run" and code.co_filename.endswith(("asyncio/events.py", "asyncio\\events.py"))

    def measure(steps: int) -> int:
        runner = _async_loop(tmp_path / f"a{steps}.db", steps)

        async def main() -> int:
            with _profiled(is_callback) as seen:
                await runner.run({"n": 0})
            return seen[0]

        return asyncio.run(main())

    assert _per_step(measure) <= 5
