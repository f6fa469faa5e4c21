"""The ``-wal`` file deleted under a running loop: a StoreError, and no committed step lost."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import loomc
from loomc import Budget, loop
from tests.reliability.harness import committed, integrity, run_row

# Runs the loop, deletes the WAL during step 3, reports how many steps were called, then
# dies by SIGKILL: whatever sat only in the deleted WAL would be lost with the process.
SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    import anyio
    import loomc
    from loomc import Budget, loop

    db, mode = sys.argv[1], sys.argv[2]
    calls = []

    def step(state):
        calls.append(state["n"])
        if state["n"] == 3:
            Path(db + "-wal").unlink()
        if state["n"] >= 3:
            time.sleep(0.03)  # the files are checked at most every 0.1 s
        loomc.charge(0.5)
        return {"n": state["n"] + 1}

    if mode == "async":
        @loop(checkpoint=db, budget=Budget(iterations=20), name="loses-its-wal")
        async def work(state):
            return step(state)
        run = lambda: anyio.run(lambda: work.run({"n": 0}, run_id="wal"))
    else:
        work = loop(checkpoint=db, budget=Budget(iterations=20), name="loses-its-wal")(step)
        run = lambda: work.run({"n": 0}, run_id="wal")
    try:
        result = run()
        out = {"error": None, "status": result.status.value}
    except loomc.StoreError as exc:
        out = {"error": str(exc)}
    out["calls"] = len(calls)
    print(json.dumps(out), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_wal_deleted_under_a_running_loop_stops_it_and_loses_nothing(tmp_path: Path, mode: str) -> None:
    """Deleting -wal mid-run: StoreError within 0.1 s; after a crash every committed step is there."""
    db = tmp_path / "wal.db"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(db), mode], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.stdout, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["error"] is not None, f"the loop ran on without noticing: {out}"
    assert "write-ahead log" in out["error"]
    assert "none is lost" in out["error"]
    calls = out["calls"]
    assert 4 <= calls < 20  # stopped soon after the deletion, not at the end of its budget
    # every step whose commit returned is in the file, though the process died by SIGKILL
    steps = committed(db, "wal")
    assert sorted(steps) == list(range(calls - 1))
    assert integrity(db) == "ok"

    @loop(checkpoint=str(db), budget=Budget(iterations=20), name="loses-its-wal")
    def work(state: dict[str, int]) -> dict[str, int]:
        loomc.charge(0.5)
        return {"n": state["n"] + 1}

    with pytest.raises(loomc.BudgetExhausted) as caught:
        work.resume("wal")
    assert caught.value.state == {"n": 20}
    assert sorted(committed(db, "wal")) == list(range(20))
    assert run_row(db, "wal") == ("budget_exhausted", 20, pytest.approx(10.0))
