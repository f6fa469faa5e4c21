"""loomc on PostgreSQL against its peers on the same server: LangGraph's PostgresSaver and DBOS.

One PostgreSQL 16 server is started from the ``pgserver`` wheel (a unix socket in a temporary
directory); every measurement gets a fresh database on it. The peers are installed from PyPI
into ``benchmarks/.venv-peers-pg`` (created on first use) and run there, each in a fresh
process; this loomc and the raw ``psycopg`` floor run from this checkout::

    python benchmarks/peers_postgres.py                  # create the venv if missing, then measure
    python benchmarks/peers_postgres.py --steps 300 --reps 3

For a ~100-byte state and for a 100 KB text state changing a little each step it prints

- **µs/step**: wall time of a loop of ``--steps`` steps, each checkpointed before the next;
- **bytes/step**: growth of the database (``pg_database_size``) over the run, per step;
- **resume**: a fresh process picks up a run whose process exited after ``--steps`` steps
  without finishing, and runs one more step (loomc: ``fn.resume``; LangGraph: ``invoke(None)``
  on the thread; DBOS: recovery of the pending workflow at ``DBOS.launch()``, which replays
  the recorded steps).

The floor is one INSERT of the JSON state and one UPDATE of a runs row committed per step
with psycopg on the same server (``synchronous_commit`` on, like ``durability="power"``).
Each peer runs with the settings its documentation starts from: LangGraph's
``PostgresSaver.from_conn_string`` with ``durability="sync"``; DBOS with its system database on
the server, one ``@DBOS.step`` per step inside one workflow.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENV = HERE / ".venv-peers-pg"
PEER_PACKAGES = ["langgraph", "langgraph-checkpoint-postgres", "psycopg[binary]", "psycopg-pool", "dbos"]

CHILD = textwrap.dedent(
    r'''
    import json, os, sys, time
    peer, kind, steps, dsn, phase, bench_dir, repo = sys.argv[1:8]
    steps = int(steps)
    sys.path.insert(0, bench_dir)
    from run_all import SMALL, bump, document, edit
    if peer == "loomc":
        sys.path.insert(0, repo)
    else:  # only this checkout's child may import its loomc
        sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.realpath(repo)]

    if kind == "small":
        start, mutate = dict(SMALL), bump
    else:
        start, mutate = {"doc": document(100_000), "n": 0}, edit

    # phase "run": run `steps` steps and finish; "crash": run `steps` steps, then exit without
    # finishing; "resume": pick the crashed run up and run one more step (timed).
    limit = steps if phase == "run" else steps + 1

    def advance(s):
        if phase == "crash" and s["n"] >= steps:
            os._exit(0)
        return mutate(s, s["n"])

    out = {}
    if peer == "loomc":
        from loomc import Budget, PostgresStore, loop

        store = PostgresStore(dsn)  # connected and its schema made before the clock starts, as the peers' are
        runs = store.list_runs(limit=1)

        @loop(checkpoint=store, budget=Budget(iterations=limit), name="bench")
        def step(s):
            return advance(s)

        t0 = time.perf_counter()
        if phase == "resume":
            res = step.resume_run(runs[0].id, budget=Budget(iterations=limit))
        else:
            res = step.run(start)
        assert res.steps == limit, res
        el = time.perf_counter() - t0
    elif peer == "langgraph":
        from typing import TypedDict
        from langgraph.checkpoint.postgres import PostgresSaver
        from langgraph.graph import END, START, StateGraph

        class S(TypedDict, total=False):
            x: str
            doc: str
            n: int

        def node(s):
            return advance(dict(s))

        g = StateGraph(S)
        g.add_node("step", node)
        g.add_edge(START, "step")
        g.add_conditional_edges("step", lambda s: END if s["n"] >= limit else "step")
        cfg = {"configurable": {"thread_id": "bench"}, "recursion_limit": limit + 10}
        with PostgresSaver.from_conn_string(dsn) as saver:
            saver.setup()
            app = g.compile(checkpointer=saver)
            t0 = time.perf_counter()
            res = app.invoke(None if phase == "resume" else start, cfg, durability="sync")
            el = time.perf_counter() - t0
        assert res["n"] == limit, res["n"]
    elif peer == "dbos":
        from dbos import DBOS, SetWorkflowID

        DBOS(config={"name": "bench", "system_database_url": dsn})

        @DBOS.step()
        def step(s):
            return advance(s)

        @DBOS.workflow()
        def work(s, n):
            for _ in range(n):
                s = step(s)
            return s

        if phase == "resume":
            t0 = time.perf_counter()
            DBOS.launch()  # recovers the pending workflow: replays its recorded steps
            handle = DBOS.retrieve_workflow("bench-wf")
            res = handle.get_result()
            el = time.perf_counter() - t0
            assert res["n"] == limit, res
        else:
            DBOS.launch()
            t0 = time.perf_counter()
            with SetWorkflowID("bench-wf"):
                res = work(start, limit)
            el = time.perf_counter() - t0
        DBOS.destroy()
    else:
        raise SystemExit(f"unknown peer {peer}")
    print(json.dumps({"s": el}))
    '''
)


def ensure_venv() -> Path:
    """The peers' interpreter, installing them on first use."""
    py = VENV / "bin" / "python"
    if not py.exists():
        print(f"creating {VENV} and installing {' '.join(PEER_PACKAGES)} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return py


def versions(py: Path) -> str:
    """Installed versions of the peers."""
    out = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in "
         "('langgraph', 'langgraph-checkpoint-postgres', 'dbos')))"],
        capture_output=True, text=True, check=True, cwd=tempfile.gettempdir(),
    )
    return out.stdout.strip()


class Server:
    """A PostgreSQL server from the pgserver wheel, and fresh databases on it."""

    def __init__(self, root: Path) -> None:
        import pgserver  # type: ignore[import-untyped]

        self.srv = pgserver.get_server(str(root / "pg"), cleanup_mode="stop")
        self.uri: str = self.srv.get_uri()

    def fresh(self) -> str:
        """The DSN of a new, empty database."""
        import psycopg

        name = "b_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.uri, autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return self.uri.replace("/postgres?", f"/{name}?", 1)

    def size(self, dsn: str) -> int:
        """The database's size on disk, in bytes."""
        import psycopg

        with psycopg.connect(dsn) as c:
            row = c.execute("SELECT pg_database_size(current_database())").fetchone()
        return int(row[0]) if row else 0

    def stop(self) -> None:
        self.srv.cleanup()


def floor_per_step(dsn: str, state: Any, steps: int, mutate: Any) -> float:
    """Seconds per step of the raw psycopg floor: one INSERT and one UPDATE committed per step."""
    import psycopg

    with psycopg.connect(dsn) as c:
        c.execute("SET synchronous_commit = on")
        c.execute("CREATE TABLE runs(id TEXT PRIMARY KEY, steps INTEGER, cost_usd DOUBLE PRECISION, updated_at TEXT)")
        c.execute("CREATE TABLE steps(run_id TEXT, step_n INTEGER, state_blob BYTEA, PRIMARY KEY(run_id, step_n))")
        c.execute("INSERT INTO runs VALUES ('r', 0, 0, '')")
        c.commit()
        t0 = time.perf_counter()
        for i in range(steps):
            state = mutate(state, i)
            c.execute("INSERT INTO steps VALUES (%s, %s, %s)", ("r", i, json.dumps(state).encode()))
            c.execute("UPDATE runs SET steps = %s, cost_usd = %s, updated_at = %s WHERE id = %s", (i + 1, 0.0, "t", "r"))
            c.commit()
        return (time.perf_counter() - t0) / steps


def child(py: Path | str, peer: str, kind: str, steps: int, dsn: str, phase: str, root: Path) -> float:
    """Seconds one phase of ``peer`` took, in a fresh process."""
    script = root / "child.py"
    if not script.exists():
        script.write_text(CHILD)
    out = subprocess.run(
        [str(py), str(script), peer, kind, str(steps), dsn, phase, str(HERE), str(REPO)],
        capture_output=True, text=True, cwd=root,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{peer} {phase} failed: {out.stderr[-1500:]}")
    if phase == "crash":
        return 0.0
    return float(json.loads(out.stdout.strip().splitlines()[-1])["s"])


def main() -> None:
    """Measure the floor, this loomc and the peers on one server."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--peers", default="loomc,langgraph,dbos")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import run_all

    peers = args.peers.split(",")
    py = ensure_venv() if set(peers) - {"loomc"} else Path(sys.executable)
    if py != Path(sys.executable):
        print(f"peers: {versions(py)}")
    root = Path(tempfile.mkdtemp(prefix="loomc-pgpeers-"))
    server = Server(root)
    table: dict[str, dict[str, float]] = {}
    try:
        for kind, start, mutate in (("small", run_all.SMALL, run_all.bump),
                                    ("text", {"doc": run_all.document(100_000), "n": 0}, run_all.edit)):
            rows: dict[str, list[dict[str, float]]] = {}
            for _ in range(args.reps):
                dsn = server.fresh()
                before = server.size(dsn)
                us = floor_per_step(dsn, start, args.steps, mutate) * 1e6
                rows.setdefault("floor (psycopg)", []).append({"us": us, "bytes": (server.size(dsn) - before) / args.steps})
                for peer in peers:
                    exe = sys.executable if peer == "loomc" else py
                    dsn = server.fresh()
                    before = server.size(dsn)
                    s = child(exe, peer, kind, args.steps, dsn, "run", root)
                    grown = (server.size(dsn) - before) / args.steps
                    dsn = server.fresh()
                    child(exe, peer, kind, args.steps, dsn, "crash", root)
                    resume = child(exe, peer, kind, args.steps, dsn, "resume", root)
                    rows.setdefault(peer, []).append({"us": s / args.steps * 1e6, "bytes": grown, "resume_ms": resume * 1e3})
            print(f"\n[{kind}] {'~100-byte' if kind == 'small' else '100 KB text'} state, "
                  f"{args.steps} steps, median of {args.reps}")
            floor = statistics.median(r["us"] for r in rows["floor (psycopg)"])
            for name, rs in rows.items():
                us = statistics.median(r["us"] for r in rs)
                b = statistics.median(r["bytes"] for r in rs)
                res = [r["resume_ms"] for r in rs if "resume_ms" in r]
                table[f"{kind} {name}"] = {"us": us, "bytes": b, **({"resume_ms": statistics.median(res)} if res else {})}
                shown = f"  resume {statistics.median(res):8.1f} ms" if res else ""
                print(f"  {name:<18}{us:9.0f} us/step  {us / floor:5.2f}x floor  {b / 1024:8.1f} KB/step{shown}")
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
