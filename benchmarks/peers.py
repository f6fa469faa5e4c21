"""loomc against its peers: loomc 0.3.0, LangGraph + SqliteSaver, DBOS on SQLite.

The peers are installed from PyPI into ``benchmarks/.venv-peers`` (created on first use) and
run there; this loomc and the raw ``sqlite3`` floors run in this interpreter. Each figure
is a median of several runs of ``--steps`` steps, for a ~100-byte state and for a 100 KB
text state changing a little each step::

    python benchmarks/peers.py                 # create the venv if missing, then measure
    python benchmarks/peers.py --steps 500 --reps 3

Each peer runs with the settings its documentation starts from: loomc 0.3.0's
``SQLiteCheckpointStore``; LangGraph's ``SqliteSaver`` on a plain ``sqlite3`` connection,
invoked with ``durability="sync"`` (a step's checkpoint is written before the next step
starts, as loomc does); DBOS with a SQLite system database, one ``@DBOS.step`` per step
inside one workflow.
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-peers"
PEER_PACKAGES = ["loomc==0.3.0", "langgraph", "langgraph-checkpoint-sqlite", "dbos"]

CHILD = textwrap.dedent(
    r'''
    import json, os, random, sqlite3, sys, time
    peer, kind, steps, db = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    sys.path.insert(0, sys.argv[5])
    from run_all import SMALL, bump, document, edit
    # run_all puts this repository first on sys.path: only "loomc-this" may import its loomc
    repo = os.path.dirname(os.path.realpath(sys.argv[5]))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != repo]

    if kind == "small":
        start = dict(SMALL)
        mutate = bump
    else:
        start = {"doc": document(100_000), "n": 0}
        mutate = edit

    marks = {}

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def advance(s):
        if s["n"] in (100, steps - 1):
            marks[s["n"]] = rss()
        return mutate(s, s["n"])

    def size():
        c = sqlite3.connect(db)
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        c.close()
        return sum(os.path.getsize(db + s) for s in ("", "-wal") if os.path.exists(db + s))

    if peer == "loomc-this":  # this loomc, in a fresh process like the peers (for its memory figure)
        sys.path.insert(0, os.path.dirname(sys.argv[5]))
        from loomc import Budget, loop

        @loop(checkpoint=db, budget=Budget(iterations=steps), name="bench")
        def step(s):
            return advance(s)

        t0 = time.perf_counter()
        step.run(start)
        el = time.perf_counter() - t0
    elif peer == "loomc-0.3.0":
        import loomc
        from loomc import Budget, BudgetExhausted, loop
        from loomc.checkpoint import SQLiteCheckpointStore

        assert "site-packages" in loomc.__file__, f"loomc 0.3.0 expected, imported {loomc.__file__}"

        store = SQLiteCheckpointStore(db_path=db)

        @loop(budget=Budget(iterations=steps), checkpoint=store)
        def step(s):
            return advance(s)

        t0 = time.perf_counter()
        try:
            step(start)
        except BudgetExhausted:
            pass
        el = time.perf_counter() - t0
    elif peer == "langgraph":
        from typing import TypedDict
        from langgraph.checkpoint.sqlite import SqliteSaver
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
        g.add_conditional_edges("step", lambda s: END if s["n"] >= steps else "step")
        conn = sqlite3.connect(db, check_same_thread=False)
        app = g.compile(checkpointer=SqliteSaver(conn))
        cfg = {"configurable": {"thread_id": "bench"}, "recursion_limit": steps + 10}
        t0 = time.perf_counter()
        out = app.invoke(start, cfg, durability="sync")
        el = time.perf_counter() - t0
        assert out["n"] == steps, out["n"]
        conn.close()
    elif peer == "dbos":
        from dbos import DBOS

        DBOS(config={"name": "bench", "system_database_url": f"sqlite:///{db}"})

        @DBOS.step()
        def step(s):
            return advance(s)

        @DBOS.workflow()
        def work(s, n):
            for _ in range(n):
                s = step(s)
            return s

        DBOS.launch()
        t0 = time.perf_counter()
        out = work(start, steps)
        el = time.perf_counter() - t0
        assert out["n"] == steps
        DBOS.destroy()
    else:
        raise SystemExit(f"unknown peer {peer}")
    grown = (marks[steps - 1] - marks[100]) / 2**20 if 100 in marks else float("nan")
    print(json.dumps({"us": el / steps * 1e6, "bytes": size() / steps, "rss_mb": grown}))
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
         "('loomc', 'langgraph', 'langgraph-checkpoint-sqlite', 'dbos')))"],
        capture_output=True, text=True, check=True, cwd=tempfile.gettempdir(),
    )
    return out.stdout.strip()


def run_peer(py: Path | str, peer: str, kind: str, steps: int, root: Path) -> dict[str, float]:
    """One measurement of a peer in a fresh process (its own database)."""
    d = Path(tempfile.mkdtemp(dir=root))
    script = d / "child.py"
    script.write_text(CHILD)
    out = subprocess.run(
        [str(py), str(script), peer, kind, str(steps), str(d / "peer.db"), str(HERE)],
        capture_output=True, text=True, cwd=d,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{peer} failed: {out.stderr[-1500:]}")
    shutil.rmtree(d, ignore_errors=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    """Measure the floors, this loomc and the peers."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--peers", default="loomc-0.3.0,langgraph,dbos")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import run_all

    py = ensure_venv()
    print(f"peers: {versions(py)}")
    root = Path(tempfile.mkdtemp(prefix="loomc-peers-"))
    table: dict[str, dict[str, float]] = {}
    for kind, start, mutate in (("small", run_all.SMALL, run_all.bump),
                                ("text", {"doc": run_all.document(100_000), "n": 0}, run_all.edit)):
        rows: dict[str, list[dict[str, float]]] = {}
        for _ in range(args.reps):
            d = run_all.fresh_dir(root, f"{kind}-floor")
            for dur, label in (("power", "floor FULL"), ("process", "floor NORMAL")):
                us = run_all.floor_per_step(d / f"{dur}.db", dur, start, args.steps, mutate) * 1e6
                rows.setdefault(label, []).append({"us": us, "bytes": run_all.db_bytes(d / f"{dur}.db") / args.steps})
                p = d / f"loomc-{dur}.db"
                counter = {"i": 0}

                def step(s: dict, counter: dict = counter, mutate=mutate) -> dict:  # type: ignore[type-arg]
                    counter["i"] += 1
                    return mutate(s, counter["i"] - 1)

                us = run_all.loomc_sync(p, dur, start, args.steps, step) * 1e6
                rows.setdefault(f"loomc (this) durability={dur}", []).append({"us": us, "bytes": run_all.db_bytes(p) / args.steps})
            rows.setdefault("loomc (this) durability=power", [])[-1]["rss_mb"] = run_peer(
                sys.executable, "loomc-this", kind, args.steps, root)["rss_mb"]
            for peer in args.peers.split(","):
                rows.setdefault(peer, []).append(run_peer(py, peer, kind, args.steps, root))
        print(f"\n[{kind}] {'~100-byte' if kind == 'small' else '100 KB text'} state, {args.steps} steps, median of {args.reps}")
        full = statistics.median(r["us"] for r in rows["floor FULL"])
        for name, rs in rows.items():
            us = statistics.median(r["us"] for r in rs)
            b = statistics.median(r["bytes"] for r in rs)
            mem = [r["rss_mb"] for r in rs if "rss_mb" in r]
            table[f"{kind} {name}"] = {"us": us, "bytes": b, **({"rss_mb": statistics.median(mem)} if mem else {})}
            shown = f"  RSS +{statistics.median(mem):6.1f} MB (step 100 -> last)" if mem else ""
            print(f"  {name:<34}{us:9.0f} us/step  {us / full:5.2f}x FULL floor  {b / 1024:8.1f} KB/step{shown}")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
