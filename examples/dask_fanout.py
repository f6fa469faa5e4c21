"""The research fan-out on a Dask cluster: each node and each sub-question a task on a worker process.

The graph is examples/research_fanout.py's (plan -> one researcher loop per sub-question
-> merge -> fact-check -> editor), unchanged: only where it runs differs. Its runs, steps
and budget live in PostgreSQL, which every worker reaches; the graph's $0.25 cap holds
across all of them.

Run it (a local cluster of two worker processes on 127.0.0.1):
    pip install 'loomc[postgres,dask]'
    python examples/dask_fanout.py --dsn postgresql://user@host/db
On a cluster (start the workers with this directory on their PYTHONPATH, so they import
the example's loops):
    dask scheduler                                   # on one machine
    PYTHONPATH=examples dask worker tcp://10.0.0.5:8786   # on each worker machine
    python examples/dask_fanout.py --dsn postgresql://user@db-host/db --address tcp://10.0.0.5:8786
With no server at hand, `--local` starts a throwaway PostgreSQL from the `pgserver` wheel.
Kill the driver (kill -9) mid-run and continue it with `--resume RUN_ID`; kill a worker
and the cluster runs its task again on another, from the node's last checkpoint.
Inspect it:  loomc show <run_id> --tree --db postgresql://...
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # research_fanout, here and on local workers

from research_fanout import graph

from loomc import PostgresStore
from orchestration import DaskExecutor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", help="the PostgreSQL database every worker reaches")
    parser.add_argument("--local", action="store_true", help="start a throwaway PostgreSQL (pgserver)")
    parser.add_argument("--address", help="a Dask scheduler (default: a local cluster of 2 worker processes)")
    parser.add_argument("--topic", default="tides")
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--resume", metavar="RUN_ID")
    args = parser.parse_args()
    server: Any = None
    dsn = args.dsn
    if dsn is None and args.local:
        import pgserver

        server = pgserver.get_server(tempfile.mkdtemp(prefix="loomc-example-pg-"), cleanup_mode="delete")  # type: ignore[attr-defined]
        dsn = server.get_uri()
    if dsn is None:
        parser.error("give --dsn postgresql://... (a database every worker reaches), or --local")
    options: dict[str, Any] = {} if args.address else {"n_workers": 2, "threads_per_worker": 2}
    try:
        with PostgresStore(dsn) as store, DaskExecutor(args.address, **options) as executor:
            request = {"topic": args.topic, "questions": args.questions}
            if args.resume:
                result = graph.resume(args.resume, store=store, executor=executor)
            else:
                result = graph.run(request, store=store, executor=executor)
            print(f"graph run {result.run_id}: {result.status.value}, ${result.cost_usd:.4f} of $0.25")
            for name, node in result.nodes.items():
                extra = f" {node.items}" if node.items else (" (not routed)" if node.routed_out else "")
                print(f"  {name:<10} {node.status:<17} steps={node.steps:<2} cost=${node.cost_usd:.4f}{extra}")
            research = result.nodes["research"].run_id
            if research is not None:
                workers = {str(item.owner).split(":")[1] for item in store.children(research) if item.owner}
                print(f"  the sub-questions ran in {len(workers)} worker process(es): {', '.join(sorted(workers))}")
            print(f"see it: loomc show {result.run_id} --tree --db '{dsn}'")
    finally:
        if server is not None:
            server.cleanup()


if __name__ == "__main__":
    main()
