"""Contention: 4 processes x 4 threads run loops on one database file at the same time."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.reliability.harness import integrity

PROCS, THREADS, STEPS = 4, 4, 40

SCRIPT = textwrap.dedent(
    """
    import json, random, sys, threading, time
    import loomc
    from loomc import Budget, loop

    db, proc_no, threads, steps, start_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])

    @loop(checkpoint=db, budget=Budget(usd=100.0, iterations=steps), name="contention")
    def work(state):
        loomc.charge(0.01)
        time.sleep(random.uniform(0, 0.002))
        return {"n": state["n"] + 1, "pad": "x" * random.randint(10, 3000)}

    results, errors = {}, []

    def run(i):
        try:
            res = work.run({"n": 0, "pad": ""}, run_id=f"p{proc_no}-t{i}")
            results[res.run_id] = [res.status.value, res.steps, round(res.cost_usd, 6), res.state["n"]]
        except BaseException as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    def read():
        # a concurrent reader, as `loomc runs` would be
        store = loomc.SQLiteStore(db)
        while not done.is_set():
            try:
                store.list_runs(limit=50)
            except BaseException as exc:
                errors.append(f"reader {type(exc).__name__}: {exc}")
            time.sleep(0.005)

    time.sleep(max(0.0, start_at - time.time()))  # all processes open the fresh database together
    done = threading.Event()
    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    reader = threading.Thread(target=read)
    for t in ts:
        t.start()
    reader.start()
    for t in ts:
        t.join()
    done.set()
    reader.join()
    print(json.dumps({"results": results, "errors": errors}))
    """
)


ASYNC_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, random, sys, time
    import loomc
    from loomc import Budget, loop

    db, proc_no, loops, steps, start_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])

    @loop(checkpoint=db, budget=Budget(usd=100.0, iterations=steps), name="contention-async")
    async def work(state):
        loomc.charge(0.01)
        await asyncio.sleep(random.uniform(0, 0.002))
        return {"n": state["n"] + 1, "pad": "x" * random.randint(10, 3000)}

    async def main():
        time.sleep(max(0.0, start_at - time.time()))
        out = await asyncio.gather(*(work.run({"n": 0, "pad": ""}, run_id=f"a{proc_no}-{i}") for i in range(loops)),
                                   return_exceptions=True)
        results, errors = {}, []
        for res in out:
            if isinstance(res, BaseException):
                errors.append(f"{type(res).__name__}: {res}")
            else:
                results[res.run_id] = [res.status.value, res.steps, round(res.cost_usd, 6), res.state["n"]]
        return {"results": results, "errors": errors}

    print(json.dumps(asyncio.run(main())))
    """
)


def test_four_processes_of_eight_async_loops_one_file(tmp_path: Path) -> None:
    """Group commits of 4 processes x 8 async loops interleave on one file without errors or lost steps."""
    script = tmp_path / "contend_async.py"
    script.write_text(ASYNC_SCRIPT)
    db = tmp_path / "shared-async.db"
    start_at = time.time() + 1.0
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(db), str(p), "8", str(STEPS), str(start_at)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for p in range(PROCS)
    ]
    outs = [p.communicate(timeout=90) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        data = json.loads(out)
        assert data["errors"] == []
        assert len(data["results"]) == 8
        for status, steps, cost, n in data["results"].values():
            assert (status, steps, n) == ("budget_exhausted", STEPS, STEPS)
            assert cost == round(0.01 * STEPS, 6)

    import sqlite3

    assert integrity(db) == "ok"
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT run_id, COUNT(*), MIN(step_n), MAX(step_n) FROM steps GROUP BY run_id").fetchall()
    assert len(rows) == PROCS * 8
    assert all((count, lo, hi) == (STEPS, 0, STEPS - 1) for _, count, lo, hi in rows)


def test_four_processes_four_threads_one_file(tmp_path: Path) -> None:
    """No 'database is locked' (or any error) reaches the user; every run commits every step."""
    script = tmp_path / "contend.py"
    script.write_text(SCRIPT)
    db = tmp_path / "shared.db"
    start_at = time.time() + 1.0
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(db), str(p), str(THREADS), str(STEPS), str(start_at)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for p in range(PROCS)
    ]
    outs = [p.communicate(timeout=90) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert "locked" not in err, err
        assert "busy" not in err, err
        data = json.loads(out)
        assert data["errors"] == []
        assert len(data["results"]) == THREADS
        for status, steps, cost, n in data["results"].values():
            assert (status, steps, n) == ("budget_exhausted", STEPS, STEPS)
            assert cost == round(0.01 * STEPS, 6)

    import sqlite3

    assert integrity(db) == "ok"
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT run_id, COUNT(*), MIN(step_n), MAX(step_n) FROM steps GROUP BY run_id").fetchall()
    assert len(rows) == PROCS * THREADS
    assert all((count, lo, hi) == (STEPS, 0, STEPS - 1) for _, count, lo, hi in rows)
