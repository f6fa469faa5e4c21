"""Several worker processes share one budget: the cap is enforced in the database, offline.

Run it:      python examples/shared_budget_workers.py             (4 workers, a $0.50 cap)
             python examples/shared_budget_workers.py --workers 8 --cap 1.00 --db /tmp/pool.db
             python examples/shared_budget_workers.py --db postgresql://user@host/db   (workers anywhere)
Inspect it:  loomc show <run_id> --tree

The coordinator creates one run, the pool, with a usd cap. Each worker is a separate
process: it opens the pool's ledger (``open_shared_parent``) and runs its own loop as a
child of the pool (``run_child``). Every call a worker makes reserves the most it can cost
before the call and settles the real cost after; the reservation is a conditional
``UPDATE`` of the database, so all the workers together stop at the cap and never past it,
and what each spends rolls up into the pool's total as its steps commit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import loomc
from loomc import Budget, PostgresStore, SQLiteStore, loop
from loomc._core import seams
from loomc.store.postgres import is_dsn
from loomc.store.protocol import NewRun

PRICE_PER_TOKEN = 0.00001  # invented: $10 per million tokens
MAX_TOKENS = 400


def fake_model(prompt: str, seed: int) -> tuple[str, int]:
    """A deterministic stand-in for an LLM call: some text and how many tokens it used."""
    tokens = 120 + (len(prompt) * 7 + seed * 13) % 250
    return f"{prompt} (revised, {tokens} tokens)", tokens


@loop(budget=Budget(iterations=200), name="shared_budget_workers:refine")
def refine(state: dict[str, Any]) -> dict[str, Any]:
    """One call per step, paid for with a reservation settled at its real cost."""
    with loomc.reserve(MAX_TOKENS * PRICE_PER_TOKEN) as hold:
        text, tokens = fake_model(state["text"], state["round"])
        hold.settle(tokens * PRICE_PER_TOKEN)
    return {"text": text[-200:], "round": state["round"] + 1}


def open_db(db: str) -> Any:
    """The store every process opens: a SQLite file (one machine), or a PostgreSQL database (any machine)."""
    return PostgresStore(db) if is_dsn(db) else SQLiteStore(db)


def worker(db: str, pool_id: str, index: int) -> None:
    """One worker process: the child ``index`` of the pool, run until the shared cap stops it."""
    store = open_db(db)
    pool = seams.open_shared_parent(store, pool_id)
    result = seams.run_child(refine, pool, {"text": f"task {index}", "round": 0}, call_index=index, meta={})
    print(json.dumps({"worker": index, "status": result.status.value, "steps": result.steps,
                      "cost": round(result.cost_usd, 6)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--cap", type=float, default=0.50)
    parser.add_argument("--db", default=".loomc/shared-budget.db")
    parser.add_argument("--worker", nargs=2, metavar=("POOL", "INDEX"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.db, args.worker[0], int(args.worker[1]))
        return
    if not is_dsn(args.db):
        Path(args.db).parent.mkdir(parents=True, exist_ok=True)
    store = open_db(args.db)
    pool_id = store.begin_run(NewRun(spec_hash="pool", name="shared_budget_workers:pool", kind="graph",
                                     budget=Budget(usd=args.cap).to_dict()))
    started = time.monotonic()
    procs = [
        subprocess.Popen([sys.executable, __file__, "--db", args.db, "--worker", pool_id, str(i)],
                         stdout=subprocess.PIPE, text=True)
        for i in range(args.workers)
    ]
    for p in procs:
        out, _ = p.communicate()
        print(out.strip())
    store.finish_run(pool_id, loomc.RunStatus.BUDGET_EXHAUSTED, "budget: usd", time.monotonic() - started)
    pool = store.get_run(pool_id)
    assert pool is not None
    print(f"run {pool_id}: {args.workers} workers spent ${pool.cost_usd:.6f} of ${args.cap:.2f}")


if __name__ == "__main__":
    main()
