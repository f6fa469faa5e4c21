"""What a step costs on PostgreSQL: loomc against a raw psycopg floor on the same server.

The floor is the least any durable loop must do per step: one ``INSERT`` of the step row
and one ``UPDATE`` of the run's totals, committed, on one psycopg connection with prepared
statements and the same ``synchronous_commit``. loomc's figure is a whole ``@loop`` step
(engine, budget, state encoding, the store's transaction) with a ~100-byte state. Each
figure is the median of several runs; the server is started from the ``pgserver`` wheel
in a temporary directory unless ``--dsn`` names one::

    python benchmarks/bench_postgres.py
    python benchmarks/bench_postgres.py --steps 2000 --repeats 7
    python benchmarks/bench_postgres.py --dsn postgresql://user@host/db

Target: loomc within 1.5x of the floor at either durability.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
import time
import warnings
from typing import Any
from urllib.parse import quote

import psycopg

from loomc import Budget, PostgresStore, loop

STATE = {"note": "x" * 80, "n": 0}  # ~100 bytes of JSON


def new_schema(uri: str) -> str:
    """A fresh schema on the server; the DSN that uses it."""
    name = f"bench_{secrets.token_hex(4)}"
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")  # type: ignore[call-overload]
    return f"{uri}{'&' if '?' in uri else '?'}options={quote(f'-csearch_path={name}')}"


def loomc_us(uri: str, durability: str, steps: int) -> float:
    """Microseconds per step of a ``@loop`` checkpointing to PostgreSQL."""
    store = PostgresStore(new_schema(uri), durability=durability)  # type: ignore[arg-type]
    store.open()

    @loop(budget=Budget(iterations=steps), checkpoint=store, name="bench")
    def step(s: dict[str, Any]) -> dict[str, Any]:
        return {"note": s["note"], "n": s["n"] + 1}

    # one short run first: the pool's connection and the prepared statements are warm
    warm = step.run(STATE)
    assert warm.steps == steps
    t0 = time.perf_counter()
    res = step.run(STATE)
    elapsed = time.perf_counter() - t0
    assert res.steps == steps
    store.close()
    return elapsed / steps * 1e6


def floor_us(uri: str, durability: str, steps: int) -> float:
    """Microseconds per step of one INSERT + one UPDATE committed, prepared, on one connection."""
    dsn = new_schema(uri)
    with psycopg.connect(dsn, prepare_threshold=0) as conn:
        conn.execute("SET synchronous_commit = " + ("on" if durability == "power" else "off"))  # type: ignore[call-overload]
        conn.execute("CREATE TABLE runs (id text PRIMARY KEY, steps bigint, cost double precision, updated_at text)")
        conn.execute("CREATE TABLE steps (run_id text, step_n bigint, state bytea, cost double precision, ts text, "
                     "PRIMARY KEY (run_id, step_n))")
        conn.execute("INSERT INTO runs VALUES ('r', 0, 0, '')")
        conn.commit()
        blob = repr(STATE).encode()
        ts = "2026-01-01T00:00:00.000000+00:00"
        for n in range(50):  # warm-up
            conn.execute("INSERT INTO steps VALUES (%s, %s, %s, %s, %s)", ("w", n, blob, 0.0, ts))
            conn.execute("UPDATE runs SET steps = %s, cost = %s, updated_at = %s WHERE id = %s", (n, 0.0, ts, "r"))
            conn.commit()
        t0 = time.perf_counter()
        for n in range(steps):
            conn.execute("INSERT INTO steps VALUES (%s, %s, %s, %s, %s)", ("r", n, blob, 0.0, ts))
            conn.execute("UPDATE runs SET steps = %s, cost = %s, updated_at = %s WHERE id = %s", (n + 1, 0.0, ts, "r"))
            conn.commit()
        return (time.perf_counter() - t0) / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", help="a server to use (default: start one from pgserver)")
    parser.add_argument("--steps", type=int, default=1000, help="steps per measured run (default 1000)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure; the median is reported (default 5)")
    args = parser.parse_args()
    server = None
    uri = args.dsn
    if uri is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

            server = pgserver.get_server(tempfile.mkdtemp(prefix="loomc-bench-pg-"), cleanup_mode="delete")
        uri = server.get_uri()
    print(f"PostgreSQL {psycopg.connect(uri).info.server_version}; {args.steps} steps per run, median of {args.repeats}")
    print(f"{'durability':<11} {'floor us/step':>14} {'loomc us/step':>14} {'ratio':>6}")
    try:
        for durability in ("process", "power"):
            floors, ours = [], []
            for _ in range(args.repeats):  # interleaved, so a busy moment of the machine hits both
                floors.append(floor_us(uri, durability, args.steps))
                ours.append(loomc_us(uri, durability, args.steps))
            f, o = statistics.median(floors), statistics.median(ours)
            print(f"{durability:<11} {f:>14.0f} {o:>14.0f} {o / f:>5.2f}x")
    finally:
        if server is not None:
            server.cleanup()


if __name__ == "__main__":
    main()
