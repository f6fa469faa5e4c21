"""What running a graph's items on Dask costs: the DaskExecutor against in-process, per item.

The graph is one map node of ``--items`` items (default 1,000), each a ``@loop`` of three
steps that sleep 10 ms (a stand-in for a model call), stored in PostgreSQL (started from
the ``pgserver`` wheel unless ``--dsn`` names a server). Both runs have the same number
of item slots: in process, ``max_concurrency`` worker threads; on Dask, a ``LocalCluster``
of ``--workers`` processes with ``--threads`` threads each (every item is submitted at
once; the workers' threads bound how many run). Reported:

- per item: the wall time times the slots divided by the items, in process and on Dask;
  the difference is what Dask adds per item (scheduling, the task's trip, opening the
  parent's ledger from the database, the outcome's trip back);
- where an item's time goes: its sleep, its steps' store cost (a bare step's, measured
  alone) and the rest (Dask's share);
- the store's cost per step (a bare ``@loop`` step, run alone);
- throughput (items per second) as worker processes grow (1, 2, 4).

    python benchmarks/bench_dask.py
    python benchmarks/bench_dask.py --items 200 --scaling 1,2
    python benchmarks/bench_dask.py --dsn postgresql://user@host/db

Target: under 5 ms of scheduling overhead per item, plus the store's per-step cost.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import loomc
from loomc import Budget, PostgresStore, loop
from orchestration import DaskExecutor, Graph

SLEEP_S = 0.010
STEPS = 3


@loop(budget=Budget(iterations=STEPS), name="bench_dask:item")
def item(state: dict[str, Any]) -> dict[str, Any]:
    """One 10 ms "call"."""
    time.sleep(SLEEP_S)
    return {**state, "i": state["i"] + 1}


def bare(state: dict[str, Any]) -> dict[str, Any]:
    """A step that does nothing: what the store costs per step."""
    return {"i": state["i"] + 1}


def new_schema(uri: str) -> str:
    """A fresh schema on the server; the DSN that uses it."""
    import psycopg

    name = f"bench_{secrets.token_hex(4)}"
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")  # type: ignore[call-overload]
    return f"{uri}{'&' if '?' in uri else '?'}options={quote(f'-csearch_path={name}')}"


def fan(store: Any, items: int, slots: int | None) -> Graph:
    """One map node of ``items`` items, at most ``slots`` at once (``None``: the cluster's threads bound them)."""
    graph = Graph("bench-dask", budget=Budget(usd=100.0), checkpoint=store)
    graph.map("items", item, over=lambda up, gi: [{"i": 0, "n": n} for n in range(items)], max_concurrency=slots)
    return graph


def nap(n: int) -> int:
    """A bare Dask task sleeping as long as an item's three steps: the floor any executor pays."""
    time.sleep(STEPS * SLEEP_S)
    return n


def dask_floor(executor: DaskExecutor, items: int) -> float:
    """Seconds for ``items`` bare tasks of the same length on the same cluster."""
    client = executor.client
    client.gather([client.submit(nap, n, pure=False) for n in range(16)])
    t0 = time.perf_counter()
    client.gather([client.submit(nap, n, pure=False) for n in range(items)])
    return time.perf_counter() - t0


def timed(graph: Graph, **kw: Any) -> float:
    t0 = time.perf_counter()
    result = graph.run({}, **kw)
    elapsed = time.perf_counter() - t0
    if result.status is not loomc.RunStatus.COMPLETED:
        raise SystemExit(f"the benchmark graph ended {result.status.value}: {result.stop_reason}")
    return elapsed


def store_step_ms(uri: str) -> float:
    store = PostgresStore(new_schema(uri))
    runner = loop(budget=Budget(iterations=200), checkpoint=store, name="bench_dask:bare")(bare)
    runner.run({"i": 0})  # warm: pool, prepared statements
    t0 = time.perf_counter()
    res = runner.run({"i": 0})
    elapsed = time.perf_counter() - t0
    store.close()
    return float(elapsed / res.steps * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", help="a server to use (default: start one from pgserver)")
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4, help="threads per worker process")
    parser.add_argument("--scaling", default="1,2,4", help="worker counts for the throughput table")
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                              os.environ.get("PYTHONPATH")]))
    server = None
    uri = args.dsn
    if uri is None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
            import pgserver

            root = tempfile.mkdtemp(prefix="loomc-bench-pg-")
            server = pgserver.get_server(root, cleanup_mode="delete")  # type: ignore[attr-defined]
        uri = server.get_uri()
    try:
        slots = args.workers * args.threads
        step_ms = store_step_ms(uri)
        print(f"store: {step_ms:.2f} ms per step (PostgreSQL, a bare @loop step)")
        store = PostgresStore(new_schema(uri), max_size=slots + 2)
        here = timed(fan(store, args.items, slots))
        ideal = args.items * STEPS * SLEEP_S / slots
        per_here = here * slots / args.items * 1e3
        print(f"in process: {args.items} items x {STEPS} steps of {SLEEP_S * 1e3:.0f} ms, {slots} at once: "
              f"{here:.2f} s ({per_here:.1f} ms per item; sleeping alone {ideal:.2f} s)")
        with DaskExecutor(n_workers=args.workers, threads_per_worker=args.threads) as executor:
            timed(fan(store, min(args.items, 2 * slots), None), executor=executor)  # warm: imports, pools
            there = timed(fan(store, args.items, None), executor=executor)
            floor = dask_floor(executor, args.items)
        per_there = there * slots / args.items * 1e3
        per_floor = floor * slots / args.items * 1e3
        sleep_ms = STEPS * SLEEP_S * 1e3
        print(f"dask ({args.workers} workers x {args.threads} threads): {there:.2f} s ({per_there:.1f} ms per item)")
        print(f"  bare Dask tasks of {sleep_ms:.0f} ms, same cluster: {floor:.2f} s ({per_floor:.1f} ms per task)")
        print("  where an item's time goes (ms, per slot):")
        print(f"    sleeping                         {sleep_ms:6.1f}")
        print(f"    Dask's own scheduling            {per_floor - sleep_ms:6.1f}")
        print(f"    loomc on Dask (store, ledger...) {per_there - per_floor:6.1f}  "
              f"(of which {STEPS} bare store steps: {STEPS * step_ms:.1f})")
        print(f"    = {per_there:.1f}; in process: {per_here:.1f} (Dask adds {per_there - per_here:.1f})")
        print(f"  in wall time per item (throughput): in process {here / args.items * 1e3:.2f} ms, on Dask "
              f"{there / args.items * 1e3:.2f} ms: Dask adds {(there - here) / args.items * 1e3:.2f} ms per item "
              f"(bare tasks: {(floor - ideal) / args.items * 1e3:.2f} ms over their sleep)")
        print("throughput as workers grow:")
        for n in [int(x) for x in args.scaling.split(",") if x]:
            with DaskExecutor(n_workers=n, threads_per_worker=args.threads) as executor:
                g = fan(store, args.items, None)
                timed(fan(store, min(args.items, 2 * n * args.threads), None), executor=executor)
                elapsed = timed(g, executor=executor)
            print(f"  {n} worker(s) x {args.threads} threads: {args.items / elapsed:.0f} items/s ({elapsed:.2f} s)")
        store.close()
    finally:
        if server is not None:
            server.cleanup()


if __name__ == "__main__":
    main()
