"""What the ``loomc`` command does on large databases: how much it reads and how it writes.

These tests count work (rows read, statements run, writes to stdout), never time it: the
times themselves are measured by ``benchmarks/bench_cli.py``.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import sqlite3
from pathlib import Path

import pytest

from loomc import BestScore, Budget, LastGood, RunNotFound, SQLiteStore, loop
from loomc.cli.app import show


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


def test_show_of_a_long_run_prints_every_row_escaped(long_run: tuple[Path, str]) -> None:
    """``loomc show --all`` of 10,000 steps: every row, its markers, and stored escapes shown, never sent."""
    db, run_id = long_run
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        show(run_id, tree=False, first=None, last=None, all_=True, full=False, db=db, json_=False)
    lines = out.getvalue().splitlines()
    assert len(lines) > 10_000
    assert sum(1 for line in lines if "<- backtrack to step" in line) > 5000
    assert sum(1 for line in lines if "RuntimeError: rate limit \\x1b[2J at call" in line) == 10_000 // 97
    assert "\x1b" not in out.getvalue()  # the escape is shown, never sent to the terminal


class _CountingOut(io.StringIO):
    """A stdout that counts the writes it is handed (each one a system call when unbuffered)."""

    writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def test_a_long_table_is_written_at_once(long_run: tuple[Path, str]) -> None:
    """``loomc show --all`` hands 10,000 rows to stdout in a few writes, not one per row (PYTHONUNBUFFERED)."""
    db, run_id = long_run
    out = _CountingOut()
    with contextlib.redirect_stdout(out):
        show(run_id, tree=False, first=None, last=None, all_=True, full=False, db=db, json_=False)
    assert len(out.getvalue().splitlines()) > 10_000
    assert out.writes < 30


def _many_runs(db: Path, n: int) -> list[str]:
    """``n`` runs (copies of one real run row, with their own ids and creation times); their ids."""
    store = SQLiteStore(db)
    from loomc.store.protocol import NewRun

    template = store.begin_run(NewRun(spec_hash="h", name="m:f"))
    store.close()
    with sqlite3.connect(db) as conn:
        cols = [c[1] for c in conn.execute("PRAGMA table_info(runs)")]
        exprs = {
            "id": "printf('%012x', (n.i * 2654435761) % 281474976710656)",
            "created_at": "printf('2026-01-01T00:00:00.%06d', n.i)",
            "root_run_id": "printf('%012x', (n.i * 2654435761) % 281474976710656)",
        }
        select = ", ".join(exprs.get(c, f"r.{c}") for c in cols)
        conn.execute(
            f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
            f"INSERT INTO runs ({', '.join(cols)}) SELECT {select} FROM n, runs r WHERE r.id = ?",
            (n, template),
        )
        return [r[0] for r in conn.execute("SELECT id FROM runs ORDER BY created_at")]


def test_an_unknown_id_is_answered_without_reading_every_id(tmp_path: Path) -> None:
    """A mistyped id among 100,000 runs names the nearest ids from a few indexed reads, never a scan of every id."""
    db = tmp_path / "many.db"
    ids = _many_runs(db, 100_000)
    store = SQLiteStore(db, create=False)
    recent, old = ids[-1], ids[5]
    typo_recent = recent[:3] + ("0" if recent[3] != "0" else "1") + recent[4:]  # one character wrong, mid-id
    typo_old = old[:-1] + ("0" if old[-1] != "0" else "1") + "x"  # an old run: the ids next to it in order
    statements: list[str] = []
    store.conn.set_trace_callback(statements.append)

    def unknown(run_id: str) -> str:
        with pytest.raises(RunNotFound) as info:
            store.resolve(run_id)
        return str(info.value)

    assert recent in unknown(typo_recent)
    assert old in unknown(typo_old)
    for probe in ("abc123abc123", "zzzzzz"):
        unknown(probe)
    reads = [q for q in statements if "FROM runs" in q]
    assert reads
    assert all("LIMIT" in q for q in reads), reads  # every read of the runs table is bounded
    store.conn.set_trace_callback(None)
    store.close()
