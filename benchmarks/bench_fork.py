"""Forking a long run: time and space of ``fn.fork`` on a 10,000-step run with 100 KB states.

A real loop commits 10,000 steps whose state is ~100 KB of JSON (changing a little each
step, so loomc stores zstd keyframes and deltas in the blob table), then the run is
forked at its last step and at its middle step. Reported: the time of each fork (median
of several), the file's growth per fork (the step rows are copied, the states are not),
and, for scale, the size of the original run's states::

    python benchmarks/bench_fork.py                    # 10,000 steps of 100 KB
    python benchmarks/bench_fork.py --steps 2000 --reps 9

The prune of the original afterwards shows that the fork keeps the blobs it shares.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from loomc import Budget, SQLiteStore, loop  # noqa: E402


def _size(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())


def main() -> None:
    """Build the long run, fork it, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--state-kb", type=int, default=100)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "fork.db"
        base = os.urandom(args.state_kb * 512).hex()  # ~state_kb KB of JSON text, incompressible

        @loop(budget=Budget(iterations=args.steps), checkpoint=str(db), durability="process", name="bench:long")
        def long_run(state: dict[str, Any]) -> dict[str, Any]:
            n = state["n"] + 1
            return {"n": n, "doc": base, "tail": f"step {n}"}

        t0 = time.perf_counter()
        result = long_run.run({"n": 0, "doc": base, "tail": ""})
        built = time.perf_counter() - t0
        store = SQLiteStore(db)
        store.vacuum()
        original = _size(db)
        print(f"original run: {result.steps} steps of {len(base) // 1000} KB states, built in {built:.1f} s, "
              f"database {original / 1e6:.1f} MB")
        for at, label in ((args.steps - 1, "last step"), (args.steps // 2, "middle step")):
            times, growth = [], []
            for _ in range(args.reps):
                before = _size(db)
                t0 = time.perf_counter()
                fid = long_run.fork(result.run_id, at_step=at)
                times.append(time.perf_counter() - t0)
                store.vacuum()  # the file's real size, not pages the WAL still holds
                growth.append(_size(db) - before)
            print(f"fork at the {label} ({at + 1} steps kept): {statistics.median(times) * 1000:.1f} ms, "
                  f"file +{statistics.median(growth) / 1e3:.0f} KB "
                  f"({statistics.median(growth) / original * 100:.2f}% of the original's database)")
        t0 = time.perf_counter()
        report = store.prune(name="bench:long", status="budget_exhausted")
        pruned = time.perf_counter() - t0
        kept = store.load_state(fid, args.steps // 2)
        assert kept["tail"] == f"step {args.steps // 2 + 1}"
        print(f"prune of the original: {report.steps} steps in {pruned:.2f} s, {report.blobs} of its blobs freed "
              "(the forks share the rest, and still read every state)")


if __name__ == "__main__":
    main()
