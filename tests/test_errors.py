"""Bad inputs: each gives a clear error that says what to do, and loses nothing."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import loomc
from loomc import Budget, Escalate, LastGood, SQLiteStore, loop, score_plateau
from loomc.store.sqlite.sql import SCHEMA_VERSION


def digest(path: Path) -> str:
    """Content hash of a file, to prove it was not touched."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"usd": -1}, "usd=-1"),
        ({"usd": float("nan")}, "usd=nan"),
        ({"usd": "2"}, "must be a number"),
        ({"iterations": 1.5}, "whole number"),
        ({"iterations": -3}, "non-negative"),
        ({"wall_clock": "10x"}, "invalid duration '10x'"),
        ({"wall_clock": -5}, "non-negative"),
        ({"wall_clock": float("-inf")}, "finite"),
        ({"wall_clock": "1h30"}, "invalid duration"),
    ],
)
def test_bad_budget_values_fail_when_built(kwargs: dict[str, Any], message: str) -> None:
    """Budget(...) validates at construction, not at run time."""
    with pytest.raises(ValueError, match=message):
        Budget(**kwargs)


@pytest.mark.parametrize(
    ("wall_clock", "seconds"),
    [("30s", 30), ("10m", 600), ("1h", 3600), ("1h30m", 5400), ("500ms", 0.5), (12, 12), ("2.5", 2.5)],
)
def test_wall_clock_forms(wall_clock: Any, seconds: float) -> None:
    """wall_clock accepts the documented forms."""
    assert Budget(wall_clock=wall_clock).wall_clock_seconds == seconds


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"budget": 5}, TypeError, "expected loomc.Budget"),
        ({"on_stall": 3}, TypeError, "Escalate"),
        ({"backtrack": "best"}, TypeError, "BestScore"),
        ({"durability": "disk"}, ValueError, "'power' or 'process'"),
        ({"converge_on": 42}, TypeError, "detector"),
        ({"scorer": "score"}, TypeError, "callable"),
    ],
)
def test_bad_decorator_arguments_fail_at_decoration(kwargs: dict[str, Any], exc: type[Exception], message: str) -> None:
    """@loop rejects bad arguments when it is applied."""
    with pytest.raises(exc, match=message):
        loop(**kwargs)


def test_bad_strategy_arguments() -> None:
    """Strategy factories validate their numbers."""
    with pytest.raises(ValueError, match="after"):
        Escalate(after=0)
    with pytest.raises(ValueError, match="patience"):
        score_plateau(patience=0)
    with pytest.raises(ValueError, match="max_consecutive_errors"):
        LastGood(max_consecutive_errors=0)
    with pytest.raises(ValueError, match="non-negative"):
        loomc.charge(-1)


def _runner(db: str) -> Any:
    @loop(checkpoint=db, budget=Budget(iterations=1))
    def once(state: dict[str, int]) -> dict[str, int]:
        return state

    return once


def test_unknown_run_id_lists_the_nearest(db: str) -> None:
    """An unknown id raises RunNotFound naming the nearest ids."""
    once = _runner(db)
    rid = once.run({"n": 1}).run_id
    with pytest.raises(loomc.RunNotFound, match="nearest: " + rid) as info:
        once.resume(rid[:-1] + ("0" if rid[-1] != "0" else "1") + "x")
    assert isinstance(info.value, LookupError)


def test_ambiguous_prefix(db: str) -> None:
    """A prefix shared by several runs asks for more characters."""
    once = _runner(db)
    once.run({"n": 1}, run_id="batch-1")
    once.run({"n": 1}, run_id="batch-2")
    with pytest.raises(loomc.AmbiguousRunId, match="give more characters"):
        once.resume("batch")
    assert once.resume_run("batch-2").run_id == "batch-2"


@pytest.mark.parametrize("content", [b"this is not a database at all" * 200, bytes(range(256)) * 64])
def test_corrupted_or_non_sqlite_file(tmp_path: Path, content: bytes) -> None:
    """A file that is not SQLite is reported and left untouched."""
    path = tmp_path / "broken.db"
    path.write_bytes(content)
    before = digest(path)
    with pytest.raises(loomc.StoreError, match="not a usable loomc database"):
        _runner(str(path)).run({"n": 1})
    assert digest(path) == before


def test_foreign_sqlite_database(tmp_path: Path) -> None:
    """A SQLite file of another application is refused, not altered."""
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    before = digest(path)
    with pytest.raises(loomc.StoreError, match="not a loomc one"):
        _runner(str(path)).run({"n": 1})
    assert digest(path) == before


def test_newer_schema_is_refused_untouched(db: str) -> None:
    """A database from a newer loomc is refused with a clear message and never altered."""
    _runner(db).run({"n": 1})
    SQLiteStore(db).close()
    for store in list(loomc.store.sqlite.sync._stores.values()):
        store.close()
    with sqlite3.connect(db) as c:
        c.execute("PRAGMA user_version=99")
    before = digest(Path(db))
    with pytest.raises(loomc.SchemaTooNew, match=r"newer loomc.*upgrade loomc"):
        SQLiteStore(db).list_runs()
    assert digest(Path(db)) == before


def test_unwritable_location(tmp_path: Path) -> None:
    """A database path that cannot be created says so and how to fix it."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(loomc.StoreError, match="set LOOMC_DB or checkpoint="):
        _runner(str(blocker / "sub" / "x.db")).run({"n": 1})


def test_reader_never_creates_a_database(tmp_path: Path) -> None:
    """A store opened for reading does not create the file."""
    path = tmp_path / "nothing-here.db"
    with pytest.raises(loomc.StoreError, match="no loomc database"):
        SQLiteStore(path, create=False).list_runs()
    assert not path.exists()


def test_database_from_loomc_0_3_0_migrates_forward(tmp_path: Path) -> None:
    """A 0.3.0 database (no user_version) is migrated and its runs are readable."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as c:
        c.executescript(
            """
            CREATE TABLE runs (id TEXT PRIMARY KEY, spec_hash TEXT NOT NULL, status TEXT NOT NULL,
                               created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
            CREATE TABLE steps (run_id TEXT NOT NULL REFERENCES runs(id), step_n INTEGER NOT NULL,
                                state_blob TEXT NOT NULL, cost_usd REAL NOT NULL DEFAULT 0.0, score REAL,
                                timestamp TEXT NOT NULL, error TEXT, breaker_event TEXT,
                                PRIMARY KEY (run_id, step_n));
            INSERT INTO runs VALUES ('0123456789ab', 'h', 'failed', '2026-01-01T00:00:00', '2026-01-01T00:00:00');
            INSERT INTO steps VALUES ('0123456789ab', 0, '{"n": 1}', 0.25, 0.5, '2026-01-01T00:00:01', NULL, 'OPEN');
            INSERT INTO steps VALUES ('0123456789ab', 1, '{"n": 2}', 0.25, 0.6, '2026-01-01T00:00:02', 'E: x', NULL);
            """
        )
    store = SQLiteStore(path)
    (run,) = store.list_runs()
    assert (run.id, run.steps, run.cost_usd, run.status.value) == ("0123456789ab", 2, 0.5, "failed")
    steps = store.load_steps(run.id)
    assert [s.state for s in steps] == [{"n": 1}, {"n": 2}]
    assert steps[0].event == "OPEN"
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
