"""How fast the ``loomc`` command answers on a large database.

Builds (once, then reuses) a database of 100,000 runs and 1,000,000 steps with the real
schema (``loomc.store.sqlite.sql``), then times real ``loomc`` subprocesses, end to end (interpreter
start-up included), median of several runs::

    python benchmarks/bench_cli.py                 # build if missing, then time
    python benchmarks/bench_cli.py --rebuild       # build afresh
    python benchmarks/bench_cli.py --runs 10000 --steps 100000

Targets: ``loomc runs`` well under a second (aim: < 300 ms); ``loomc runs --help`` < 400 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from loomc.store.sqlite import sql as _sql

STATUSES = ["completed"] * 6 + ["budget_exhausted", "stalled", "failed", "interrupted", "running"]
ERRORS = [None] * 12 + ["RuntimeError: rate limit", "TimeoutError: model did not answer"]


def build(path: Path, n_runs: int, n_steps: int, seed: int = 7) -> None:
    """Write ``n_runs`` runs (a fifth of them nested) and ``n_steps`` steps with the real schema."""
    rng = random.Random(seed)
    tmp = path.with_suffix(".building")
    for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        p.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    for stmt in _sql.MIGRATIONS[0].split(";"):
        if stmt.strip():
            conn.execute(stmt)
    conn.execute(f"PRAGMA user_version={_sql.SCHEMA_VERSION}")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    per_run = max(1, n_steps // n_runs)
    ids: list[str] = []
    runs, steps = [], []
    dead_owner = "nohost-bench:1:0"  # another host, no heartbeat: reads as crashed
    for i in range(n_runs):
        rid = f"{rng.getrandbits(48):012x}"
        ids.append(rid)
        nested = i % 5 == 4 and i > 0
        parent = ids[i - 1] if nested else None
        status = rng.choice(STATUSES)
        created = (t0 + timedelta(seconds=i * 7)).isoformat(timespec="microseconds")
        n = per_run
        costs = [round(rng.uniform(0.001, 0.08), 4) for _ in range(n)]
        budget = json.dumps({"usd": 5.0, "iterations": 50, "wall_clock": 600.0})
        runs.append(
            (
                rid,
                "bench0000000",
                status,
                created,
                created,
                f"bench.agents:agent_{i % 17}",
                "loop",
                parent,
                0 if nested else None,
                0 if nested else None,
                parent or rid,
                "json",
                '{"n":0}',
                budget,
                sum(costs),
                n,
                n * 1.5,
                max(costs),
                n - 1,
                None if status == "running" else "converged",
                dead_owner if status == "running" else None,
                None,
                1,
                None,
            )
        )
        for k in range(n):
            err = rng.choice(ERRORS)
            event = "converged" if k == n - 1 and status == "completed" else None
            steps.append(
                (
                    rid,
                    k,
                    json.dumps({"n": k + 1, "draft": "x" * 40}),
                    costs[k],
                    None if err else round(rng.random(), 3),
                    created,
                    err,
                    event,
                    k,
                    1.5,
                    None,  # blob_id: the state is inline
                )
            )
        if len(steps) >= 50_000:
            conn.executemany(_INSERT_RUN, runs)
            conn.executemany(_sql.INSERT_STEP, steps)
            runs, steps = [], []
    conn.executemany(_INSERT_RUN, runs)
    conn.executemany(_sql.INSERT_STEP, steps)
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    tmp.rename(path)


_INSERT_RUN = (
    "INSERT INTO runs (id, spec_hash, status, created_at, updated_at, name, kind, parent_run_id, parent_step, "
    "call_index, root_run_id, state_type, input_blob, budget, cost_usd, steps, wall_s, max_step_cost, next_from, "
    "stop_reason, owner, heartbeat, attempts, meta) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)


def timed(argv: list[str], repeat: int) -> tuple[float, float, str]:
    """(median, min) wall seconds of ``argv`` over ``repeat`` runs, and its last stdout."""
    times, out = [], ""
    for _ in range(repeat):
        t = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        out = proc.stdout + proc.stderr
    return statistics.median(times), min(times), out


def build_long_run(path: Path, steps: int) -> str:
    """One real loop of ``steps`` steps (scores, a few errors, backtracks), for ``loomc show``."""
    from loomc import BestScore, Budget, LastGood, SQLiteStore, loop

    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)

    @loop(checkpoint=str(path), durability="process", budget=Budget(iterations=steps),
          scorer=lambda s: s["score"], backtrack=[BestScore(), LastGood(max_consecutive_errors=3)], name="long")
    def long(state: dict[str, float]) -> dict[str, float]:
        n = state["n"] + 1
        if n % 97 == 0:
            raise RuntimeError("rate limit")
        return {"n": n, "score": (n * 7919 % 1000) / 1000}

    long.run({"n": 0, "score": 0.0})
    run_id: str = SQLiteStore(path).list_runs()[0].id
    return run_id


def main() -> None:
    """Build the database if needed and print the timings."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", default="/tmp/loomc-bench-cli.db")
    ap.add_argument("--runs", type=int, default=100_000)
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args()
    db = Path(args.db)
    if args.rebuild or not db.exists():
        t = time.perf_counter()
        build(db, args.runs, args.steps)
        print(f"built {db} ({args.runs:,} runs, {args.steps:,} steps) in {time.perf_counter() - t:.1f}s")
    with sqlite3.connect(db) as c:
        n_runs, n_steps = c.execute("SELECT (SELECT COUNT(*) FROM runs), (SELECT COUNT(*) FROM steps)").fetchone()
        some_root = c.execute("SELECT id FROM runs WHERE parent_run_id IS NULL ORDER BY created_at DESC LIMIT 1 OFFSET 3").fetchone()[0]
    size_mb = db.stat().st_size / 1e6
    print(f"database: {n_runs:,} runs, {n_steps:,} steps, {size_mb:.0f} MB")

    long_db = db.with_name(db.stem + "-10k.db")
    long_id = build_long_run(long_db, 10_000)
    py = [sys.executable, "-m", "loomc"]
    cases = {
        "python -m loomc runs": [*py, "runs", "--db", str(db)],
        "python -m loomc runs --all --limit 50": [*py, "runs", "--all", "--limit", "50", "--db", str(db)],
        "python -m loomc runs --status crashed": [*py, "runs", "--status", "crashed", "--db", str(db)],
        "python -m loomc runs --json": [*py, "runs", "--json", "--db", str(db)],
        f"python -m loomc show {some_root[:6]}": [*py, "show", some_root[:6], "--db", str(db)],
        f"python -m loomc show {some_root[:6]} --tree": [*py, "show", some_root[:6], "--tree", "--db", str(db)],
        "python -m loomc show <unknown id>": [*py, "show", "zzzzzz", "--db", str(db)],
        "python -m loomc show <a 10,000-step run>": [*py, "show", long_id, "--db", str(long_db)],
        "python -m loomc runs --help": [*py, "runs", "--help"],
        "python -c pass (interpreter floor)": [sys.executable, "-c", "pass"],
    }
    exe = shutil.which("loomc")
    if exe:
        cases["loomc runs (console script)"] = [exe, "runs", "--db", str(db)]
        cases["loomc runs --help (console script)"] = [exe, "runs", "--help"]
    width = max(map(len, cases))
    for label, argv in cases.items():
        med, best, out = timed(argv, args.repeat)
        print(f"{label.ljust(width)}  median {med * 1000:6.0f} ms   min {best * 1000:6.0f} ms")
        if label == "python -m loomc runs" and os.environ.get("SHOW"):
            print(out)


if __name__ == "__main__":
    main()
