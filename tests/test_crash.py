"""SIGKILL a running loop at several points, resume in a fresh process: nothing committed is lost."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import loomc
    from loomc import Budget, loop, predicate

    @loop(
        checkpoint=sys.argv[1],
        budget=Budget(usd=5.0, iterations=50),
        converge_on=predicate(lambda h: h[-1].state["n"] >= 8),
        name="crash-subject",
    )
    def work(state):
        loomc.charge(0.05)
        time.sleep(float(os.environ.get("STEP_SLEEP", "0.05")))
        return {"n": state["n"] + 1, "log": state["log"] + [state["n"]]}

    if len(sys.argv) > 2:
        print(work.resume(sys.argv[2]))
    else:
        print(work({"n": 0, "log": []}))
    """
)


def committed(db: Path) -> list[tuple[int, float]]:
    """(step_n, cost) of every committed step."""
    with sqlite3.connect(db) as c:
        return c.execute("SELECT step_n, cost_usd FROM steps ORDER BY step_n").fetchall()


def wait_for_steps(db: Path, n: int, timeout: float = 20.0) -> None:
    """Block until at least ``n`` steps are committed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.exists():
            try:
                if len(committed(db)) >= n:
                    return
            except sqlite3.OperationalError:
                pass
        time.sleep(0.01)
    raise AssertionError(f"{n} steps never committed")


@pytest.mark.parametrize("kill_after", [1, 3, 6])
def test_sigkill_then_resume_loses_nothing(tmp_path: Path, kill_after: int) -> None:
    """Kill -9 after k committed steps; the resumed run completes with contiguous steps and exact cost."""
    script = tmp_path / "subject.py"
    script.write_text(SCRIPT)
    db = tmp_path / "crash.db"
    proc = subprocess.Popen([sys.executable, str(script), str(db)], stdout=subprocess.DEVNULL)
    wait_for_steps(db, kill_after)
    time.sleep(0.02 * kill_after % 0.05)  # land at different points inside a step
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = committed(db)
    assert len(before) >= kill_after

    listing = subprocess.run(
        [sys.executable, "-c", f"import loomc; print(loomc.SQLiteStore({str(db)!r}).list_runs()[0].status.value)"],
        capture_output=True, text=True, check=True,
    )
    assert listing.stdout.strip() == "crashed"

    with sqlite3.connect(db) as c:
        run_id = c.execute("SELECT id FROM runs").fetchone()[0]
    out = subprocess.run([sys.executable, str(script), str(db), run_id], capture_output=True, text=True, check=True)
    assert "'n': 8" in out.stdout
    after = committed(db)
    assert after[: len(before)] == before
    assert [n for n, _ in after] == list(range(8))
    assert sum(c for _, c in after) == pytest.approx(0.40)
    with sqlite3.connect(db) as c:
        status, steps, cost = c.execute("SELECT status, steps, cost_usd FROM runs").fetchone()
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert (status, steps, cost) == ("completed", 8, pytest.approx(0.40))
    assert "'log': [0, 1, 2, 3, 4, 5, 6, 7]" in out.stdout


def test_resume_of_a_live_run_is_refused(tmp_path: Path) -> None:
    """While the owning process is alive, resume raises RunLocked; once it is dead, resume takes over."""
    script = tmp_path / "subject.py"
    script.write_text(SCRIPT)
    db = tmp_path / "live.db"
    env = {**os.environ, "STEP_SLEEP": "0.5"}
    proc = subprocess.Popen([sys.executable, str(script), str(db)], stdout=subprocess.DEVNULL, env=env)
    try:
        wait_for_steps(db, 1)
        with sqlite3.connect(db) as c:
            run_id = c.execute("SELECT id FROM runs").fetchone()[0]
        res = subprocess.run([sys.executable, str(script), str(db), run_id], capture_output=True, text=True)
        assert res.returncode != 0
        assert "RunLocked" in res.stderr
        assert f"run {run_id} is running in live process" in res.stderr
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    env = {**os.environ, "STEP_SLEEP": "0"}
    out = subprocess.run([sys.executable, str(script), str(db), run_id], capture_output=True, text=True, env=env, check=True)
    assert "'n': 8" in out.stdout
