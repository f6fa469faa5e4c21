"""Several worker processes, one history: loops checkpointing to one PostgreSQL database.

Each worker process runs a few "summarise a document" loops (a deterministic fake model
that charges for its tokens); every step of every run lands in the same database, where
any process, or `loomc runs --db DSN` on any machine, sees them all.

Run it against your server:
    pip install 'loomc[postgres]'
    python examples/shared_postgres.py --dsn postgresql://user@host/db
or with LOOMC_DB set (then every `loomc` command reads that database too):
    export LOOMC_DB=postgresql://user@host/db
    python examples/shared_postgres.py
    loomc runs
With no server at hand, `--local` starts a throwaway one from the `pgserver` wheel.
Kill a worker (kill -9) mid-run and run the example again with `--resume`: every crashed
run continues from its last committed step.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import sys
import time
from typing import Any

import loomc
from loomc import Budget, PostgresStore, loop, predicate

DOCS = ["tides", "orbits", "eclipses", "seasons", "comets", "auroras"]
#: Seconds the fake model "thinks" per call (LOOMC_EXAMPLE_DELAY=0 for instant runs).
DELAY = float(os.environ.get("LOOMC_EXAMPLE_DELAY", "0.05"))


def fake_model(prompt: str) -> str:
    """A deterministic stand-in for an LLM call; charges $0.00002 per word it writes."""
    time.sleep(DELAY)
    word = hashlib.sha256(prompt.encode()).hexdigest()[:6]
    loomc.charge(0.00002 * 8)
    return f"{word} " * 8


def make_summariser(dsn: str) -> Any:
    """The loop every worker runs: extend a summary until it has five sentences."""

    @loop(
        checkpoint=dsn,
        budget=Budget(usd=0.05, iterations=20),
        converge_on=predicate(lambda h: len(h[-1].state["sentences"]) >= 5),
        name="shared_postgres:summarise",
    )
    def summarise(state: dict[str, Any]) -> dict[str, Any]:
        sentence = fake_model(state["doc"] + " ".join(state["sentences"]))
        return {**state, "sentences": [*state["sentences"], sentence.strip()]}

    return summarise


def worker(dsn: str, docs: list[str], resume: bool) -> None:
    """Run (or resume) one loop per document, in this process."""
    summarise = make_summariser(dsn)
    store = summarise.store()
    for doc in docs:
        run_id = f"doc-{doc}"
        info = store.get_run(run_id)
        if info is None:
            result = summarise.run({"doc": doc, "sentences": []}, run_id=run_id)
        elif resume and info.status is loomc.RunStatus.CRASHED:
            result = summarise.resume_run(run_id)
        else:
            continue
        print(f"[pid {os.getpid()}] {run_id}: {result.status.value} after {result.steps} steps, ${result.cost_usd:.5f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", default=os.environ.get("LOOMC_DB"), help="postgresql://... (default: $LOOMC_DB)")
    parser.add_argument("--local", action="store_true", help="start a throwaway server from the pgserver wheel")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--resume", action="store_true", help="resume runs whose worker died")
    args = parser.parse_args()
    server = None
    if args.local:
        import tempfile

        import pgserver  # pip install pgserver

        server = pgserver.get_server(tempfile.mkdtemp(prefix="loomc-example-pg-"), cleanup_mode="delete")
        args.dsn = server.get_uri()
    if not args.dsn or not args.dsn.startswith(("postgresql://", "postgres://")):
        print("give a PostgreSQL DSN: --dsn postgresql://user@host/db, LOOMC_DB=..., or --local", file=sys.stderr)
        return 2
    try:
        setup = PostgresStore(args.dsn)
        setup.open()  # creates (or checks) loomc's tables once, before the workers start
        setup.close()
        shares = [DOCS[i :: args.workers] for i in range(args.workers)]
        procs = [multiprocessing.Process(target=worker, args=(args.dsn, share, args.resume)) for share in shares]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        store = PostgresStore(args.dsn, create=False)
        runs = [r for r in store.list_runs() if r.name == "shared_postgres:summarise"]
        print(f"{len(runs)} runs in {store.path}, {sum(r.steps for r in runs)} steps, ${sum(r.cost_usd for r in runs):.5f} in all")
        store.close()
    finally:
        if server is not None:
            server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
