"""How fast the ``loomc`` command answers on large databases, against floors measured in the same test.

Each time is the best of a few rounds, interleaved with its floor, so a loaded machine
slows both alike; the bounds leave room for noise, not for a lost optimisation.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from loomc import BestScore, Budget, LastGood, loop
from loomc.cli.app import show


def _best(fn: Callable[[], object], rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.fixture(scope="module")
def long_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A real loop of 10,000 steps: scores, a failed step every 97 (its error holds an escape), backtracks."""
    db = tmp_path_factory.mktemp("long") / "long.db"
    calls = itertools.count(1)

    @loop(checkpoint=str(db), durability="process", budget=Budget(iterations=10_000), scorer=lambda s: s["score"],
          backtrack=[BestScore(), LastGood(max_consecutive_errors=3)], name="long")
    def long(state: dict[str, float]) -> dict[str, float]:
        n = next(calls)
        if n % 97 == 0:
            raise RuntimeError(f"rate limit \x1b[2J at call {n}")
        return {"n": n, "score": (n * 7919 % 1000) / 1000}

    run_id = long.run({"n": 0, "score": 0.0}).run_id
    return db, run_id


def test_show_of_a_long_run_costs_little_more_than_reading_its_rows(long_run: tuple[Path, str]) -> None:
    """``loomc show --all`` of 10,000 steps: escaped, aligned rows at a few times the cost of fetching them raw."""
    db, run_id = long_run
    out = io.StringIO()

    def render() -> None:
        out.seek(0)
        out.truncate()
        with contextlib.redirect_stdout(out):
            show(run_id, tree=False, first=None, last=None, all_=True, full=False, db=db, json_=False)

    def floor() -> None:
        # the same rows fetched and printed with one f-string each: no escaping, no alignment
        with sqlite3.connect(db) as conn:
            rows = conn.execute(
                "SELECT step_n, cost_usd, score, error, event FROM steps WHERE run_id = ? ORDER BY step_n", (run_id,)
            ).fetchall()
        text = io.StringIO()
        for n, cost, score, error, event in rows:
            text.write(f"{n:>4}  ${cost:.4f}  {score}  {error}  {event}\n")

    render()
    lines = out.getvalue().splitlines()
    assert len(lines) > 10_000
    assert sum(1 for line in lines if "<- backtrack to step" in line) > 5000
    assert sum(1 for line in lines if "RuntimeError: rate limit \\x1b[2J at call" in line) == 10_000 // 97
    assert "\x1b" not in out.getvalue()  # the escape is shown, never sent to the terminal
    ratios = []
    for _ in range(3):
        ratios.append(_best(render, 3) / _best(floor, 3))
    assert min(ratios) < 5.5, ratios
