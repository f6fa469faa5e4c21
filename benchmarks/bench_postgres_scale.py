"""Many processes, one PostgreSQL server: steps per second as processes are added.

N processes (1, 2, 4, 8) each run M loops of S steps against one database on one server
(started from the ``pgserver`` wheel, a unix socket). Two ways:

- **independent**: each loop is a top-level run with its own budget (the in-memory ledger);
- **shared budget**: every loop is a child of one pool run whose usd cap is enforced in the
  database (``seams.open_shared_parent`` + ``run_child``), and every step reserves $0.0001
  and settles it — the conditional ``UPDATE`` of the pool row that 8 processes contend on.

::

    python benchmarks/bench_postgres_scale.py
    python benchmarks/bench_postgres_scale.py --procs 1,2,4 --loops 4 --steps 100 --reps 3

Each figure is the median of ``--reps`` runs: all the processes' committed steps divided by
the wall time from the moment they all start to the moment the last one ends. This machine
has 2 cores, which the server shares with the workers: the curve flattens early here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

CHILD = textwrap.dedent(
    r'''
    import json, sys, time
    dsn, mode, pool_id, index, loops, steps, start_at, repo = sys.argv[1:9]
    sys.path.insert(0, repo)
    import loomc
    from loomc import Budget, PostgresStore, loop
    from loomc._core import seams

    index, loops, steps, start_at = int(index), int(loops), int(steps), float(start_at)
    shared = mode == "shared"
    store = PostgresStore(dsn, shared_budget=shared, durability="power")

    @loop(checkpoint=store, budget=Budget(iterations=steps), name="scale")
    def step(s):
        if shared:
            with loomc.reserve(0.0001) as hold:
                hold.settle(0.0001)
        return {"x": s["x"], "n": s["n"] + 1}

    pool = seams.open_shared_parent(store, pool_id) if shared else None
    while time.time() < start_at:
        time.sleep(0.001)
    t0 = time.time()
    done = 0
    for i in range(loops):
        state = {"x": "a" * 80, "n": 0}
        if shared:
            res = seams.run_child(step, pool, state, call_index=index * loops + i, meta={})
        else:
            res = step.run(state)
        done += res.steps
    print(json.dumps({"steps": done, "t0": t0, "t1": time.time()}))
    store.close()
    '''
)


def fresh_db(uri: str) -> str:
    """A new database on the server; its DSN."""
    import psycopg

    name = "s_" + uuid.uuid4().hex[:12]
    with psycopg.connect(uri, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return uri.replace("/postgres?", f"/{name}?", 1)


def one(uri: str, script: Path, mode: str, procs: int, loops: int, steps: int) -> float:
    """Steps per second of ``procs`` processes running ``loops`` loops each."""
    from loomc import Budget, PostgresStore
    from loomc.store.protocol import NewRun

    dsn = fresh_db(uri)
    store = PostgresStore(dsn)
    pool_id = store.begin_run(NewRun(spec_hash="pool", name="scale:pool", kind="graph",
                                     budget=Budget(usd=1e6).to_dict()))
    store.close()
    start_at = time.time() + 1.5 + 0.2 * procs  # every process imported and connected by then
    children = [
        subprocess.Popen([sys.executable, str(script), dsn, mode, pool_id, str(i), str(loops), str(steps),
                          str(start_at), str(REPO)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(procs)
    ]
    outs = []
    for c in children:
        out, err = c.communicate()
        if c.returncode != 0:
            raise RuntimeError(f"worker failed: {err[-1500:]}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    total = sum(o["steps"] for o in outs)
    assert total == procs * loops * steps, total
    wall = max(o["t1"] for o in outs) - min(o["t0"] for o in outs)
    return total / wall


def main() -> None:
    """Measure steps per second as processes are added, without and with a shared budget."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", default="1,2,4,8")
    ap.add_argument("--loops", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import pgserver  # type: ignore[import-untyped]

    root = Path(tempfile.mkdtemp(prefix="loomc-pgscale-"))
    srv = pgserver.get_server(str(root / "pg"), cleanup_mode="stop")
    script = root / "child.py"
    script.write_text(CHILD)
    table: dict[str, float] = {}
    try:
        print(f"{args.loops} loops x {args.steps} steps per process, ~100-byte state, durability=power; "
              f"median of {args.reps}")
        for mode in ("independent", "shared"):
            for n in (int(p) for p in args.procs.split(",")):
                rate = statistics.median(
                    one(srv.get_uri(), script, mode, n, args.loops, args.steps) for _ in range(args.reps))
                table[f"{mode} {n}"] = rate
                print(f"  {mode:<12} {n:2d} processes  {rate:8.0f} steps/s")
    finally:
        srv.cleanup()
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
