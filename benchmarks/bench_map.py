"""A map node over 1,000 and 10,000 items: time and memory per item stay flat.

Each item is a one-step ``@loop`` (trivial work, a $0.0001 charge), so what is measured is
what loomc adds per item: a child run created, its step committed, its cost rolled up, its
result gathered; plus the scheduler's workers. Real SQLite file, default durability::

    python benchmarks/bench_map.py                     # 1,000 and 10,000 items, async items
    python benchmarks/bench_map.py --sync              # sync items (worker threads)
    python benchmarks/bench_map.py --sizes 1000 10000 --concurrency 32

Per size: the wall time per item (µs), the peak of memory allocated by Python during the
run per item (tracemalloc, bytes) and the resident set growth. Flat means the 10,000-item
figures are within a small factor of the 1,000-item ones.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import loomc  # noqa: E402
from loomc import Budget, loop, predicate  # noqa: E402
from orchestration import Graph  # noqa: E402


def _done(history: Any) -> bool:
    return bool(history)


@loop(converge_on=predicate(_done))
async def async_item(x: int) -> int:
    """One async item: charge and return."""
    loomc.charge(0.0001)
    return x + 1


@loop(converge_on=predicate(_done))
def sync_item(x: int) -> int:
    """One sync item: charge and return."""
    loomc.charge(0.0001)
    return x + 1


def _rss_kb() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _run(n: int, *, sync: bool, concurrency: int | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        g = Graph(f"map-{n}", checkpoint=str(Path(tmp) / "map.db"), budget=Budget(usd=n))
        g.map("m", sync_item if sync else async_item, over=lambda up, gi: list(range(gi)), max_concurrency=concurrency)
        t0 = time.perf_counter()
        result = g.run(n)
        wall = time.perf_counter() - t0
        assert result.ok, result.stop_reason
        assert result.outputs["m"][-1] == n
        return wall


def bench(n: int, *, sync: bool, concurrency: int | None) -> dict[str, float]:
    """Run a graph with a map over ``n`` items twice (timed, then traced); return its per-item figures."""
    rss0 = _rss_kb()
    wall = _run(n, sync=sync, concurrency=concurrency)
    rss = _rss_kb() - rss0
    tracemalloc.start()  # a second run: tracing slows every allocation down
    _run(n, sync=sync, concurrency=concurrency)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"n": n, "us_per_item": wall / n * 1e6, "peak_bytes_per_item": peak / n, "rss_growth_kb": rss,
            "wall_s": wall}


def main() -> None:
    """Print the figures for each size, and the ratio of the largest to the smallest."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--sync", action="store_true", help="sync items (worker threads) instead of async ones")
    parser.add_argument("--concurrency", type=int, default=32, help="max_concurrency of the map (0: unbounded)")
    args = parser.parse_args()
    concurrency = args.concurrency or None
    bench(100, sync=args.sync, concurrency=concurrency)  # warm-up: imports, first database
    rows = [bench(n, sync=args.sync, concurrency=concurrency) for n in args.sizes]
    kind = "sync" if args.sync else "async"
    print(f"map of {kind} one-step items, max_concurrency={concurrency}")
    print(f"{'items':>8} {'wall s':>8} {'µs/item':>9} {'peak B/item':>12} {'RSS +KB':>9}")
    for r in rows:
        print(f"{r['n']:>8} {r['wall_s']:>8.2f} {r['us_per_item']:>9.0f} {r['peak_bytes_per_item']:>12.0f} "
              f"{r['rss_growth_kb']:>9}")
    first, last = rows[0], rows[-1]
    print(f"time per item x{last['us_per_item'] / first['us_per_item']:.2f}, "
          f"memory per item x{last['peak_bytes_per_item'] / first['peak_bytes_per_item']:.2f} "
          f"from {first['n']} to {last['n']} items")


if __name__ == "__main__":
    main()
