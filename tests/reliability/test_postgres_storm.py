"""Kill storm on PostgreSQL: SIGKILL a loop writing to a real server at random instants, resume it each time.

The worker of the SQLite kill storm (``worker.py``), pointed at a PostgreSQL DSN: half the
kills land while a step runs, half while the engine encodes and commits its state (large
states stored as keyframes and deltas). After every kill each step seen committed before
is still there unchanged and step numbers are contiguous; every run ends exactly like an
uninterrupted run on SQLite.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import time
from pathlib import Path

import psycopg
import pytest

import loomc
from loomc.store.postgres.sql import STATE_OF
from tests.reliability.harness import Worker

TARGET = 30


def committed(dsn: str, run_id: str) -> dict[int, tuple[float, str]]:
    """step_n -> (cost, fingerprint of the stored state) for every committed step of ``run_id``."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            f"SELECT s.step_n, s.cost_usd, {STATE_OF} FROM steps s WHERE s.run_id = %s", (run_id,)  # type: ignore[arg-type]
        ).fetchall()
    return {n: (cost, hashlib.sha256(bytes(blob or b"")).hexdigest()[:16]) for n, cost, blob in rows}


def blob_kinds(dsn: str) -> set[bytes]:
    """The tags of the stored compressed states (``b"Z"`` keyframes, ``b"D"`` deltas)."""
    with psycopg.connect(dsn) as conn:
        return {bytes(r[0]) for r in conn.execute("SELECT DISTINCT substr(data, 1, 1) FROM blobs").fetchall()}


def reference(tmp_path: Path) -> dict[str, object]:
    """How an uninterrupted run ends (on SQLite)."""
    w = Worker()
    try:
        w.go(tmp_path / "reference.db", "reference", TARGET)
        return dict(json.loads(w.finish()))
    finally:
        w.close()


@pytest.mark.parametrize(("flavor", "kills_wanted"), [("sync-power", 12), ("async-process", 6)])
def test_sigkills_on_postgres_lose_no_committed_step(pg_dsn: str, tmp_path: Path, flavor: str, kills_wanted: int) -> None:
    """SIGKILLs during steps and commits of a loop on PostgreSQL: nothing committed is lost, results match."""
    rng = random.Random(20261129)
    ref = reference(tmp_path)
    spare = Worker()
    run_no, run_id = 0, "pg-storm-0"
    seen: dict[int, tuple[float, str]] = {}
    kills = 0
    finished = 0
    try:
        while kills < kills_wanted:
            w, spare = spare, Worker()
            w.go(pg_dsn, run_id, TARGET, flavor=flavor)  # type: ignore[arg-type]
            marker = "s" if kills % 2 == 0 else "c"
            wanted, hits, done = rng.randint(1, 4), 0, None
            while hits < wanted:
                line = w.next_line()
                assert line is not None, "worker died on its own"
                if line.startswith("done "):
                    done = json.loads(line[5:])
                    break
                hits += line.startswith(marker)
            if done is None:
                time.sleep(rng.uniform(0, 0.004))
                w.kill(signal.SIGKILL)
                kills += 1
            else:
                w.proc.wait(30)
            w.close()

            now = committed(pg_dsn, run_id)
            assert sorted(now) == list(range(len(now))), f"steps not contiguous: {sorted(now)}"
            lost = {n: v for n, v in seen.items() if now.get(n) != v}
            assert not lost, f"committed steps lost or changed after a kill: {sorted(lost)}"
            with loomc.PostgresStore(pg_dsn, create=False) as reader:
                info = reader.get_run(run_id)
            assert info is not None
            if done is None:
                expected = loomc.RunStatus.COMPLETED if len(now) == TARGET else loomc.RunStatus.CRASHED
                assert info.status is expected
                seen = now
            else:
                assert done == ref, f"run {run_id} ended {done}, an uninterrupted run ended {ref}"
                assert (info.status, info.steps) == (loomc.RunStatus.COMPLETED, TARGET)
                assert info.cost_usd == pytest.approx(sum(c for c, _ in now.values()))
                finished += 1
                run_no += 1
                run_id, seen = f"pg-storm-{run_no}", {}

        w, spare = spare, Worker()
        w.go(pg_dsn, run_id, TARGET, flavor=flavor)  # type: ignore[arg-type]
        assert json.loads(w.finish()) == ref
        w.close()
        now = committed(pg_dsn, run_id)
        assert all(now.get(n) == v for n, v in seen.items())
        assert sorted(now) == list(range(TARGET))
    finally:
        spare.close()
    assert {b"Z", b"D"} <= blob_kinds(pg_dsn)
    print(f"postgres kill storm ({flavor}): {kills} kills, {finished + 1} runs finished like the uninterrupted one")
