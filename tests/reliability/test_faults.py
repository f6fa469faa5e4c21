"""Faults: a full disk, a write error mid-commit, a database deleted under a running loop, SIGTERM."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import loomc
from loomc import Budget, loop
from tests.reliability.harness import Worker, committed, integrity, run_row


def _noise(n: int, size: int) -> str:
    return random.Random(n).randbytes(size // 2).hex()


def test_disk_full_mid_commit_is_a_store_error_and_resumable(tmp_path: Path) -> None:
    """The database hits its size cap during a commit: StoreError, nothing lost, resume completes."""
    db = tmp_path / "full.db"

    @loop(checkpoint=str(db), budget=Budget(usd=100.0, iterations=12), name="fills-the-disk")
    def work(state: dict[str, Any]) -> dict[str, Any]:
        n = state["n"]
        loomc.charge(0.25)
        if n == 4:  # from here on the "disk" has room for a few more pages only
            conn = work.store().conn
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages + 8}")
        return {"n": n + 1, "blob": _noise(n, 40_000)}

    with pytest.raises(loomc.StoreError) as caught:
        work({"n": 0, "blob": ""}, run_id="full")
    msg = str(caught.value)
    assert "full" in msg
    assert "free disk space, then resume the run" in msg
    before = committed(db, "full")
    assert sorted(before) == list(range(len(before)))
    assert 4 <= len(before) < 12

    # Space is freed; the same process resumes the run to its end.
    work.store().conn.execute("PRAGMA max_page_count = 1073741823")
    with pytest.raises(loomc.BudgetExhausted):
        work.resume("full")
    after = committed(db, "full")
    assert all(after[n] == v for n, v in before.items())
    assert sorted(after) == list(range(12))
    assert run_row(db, "full") == ("budget_exhausted", 12, pytest.approx(3.0))
    assert integrity(db) == "ok"


WRITE_ERROR = textwrap.dedent(
    """
    import json, os, random, resource, signal, sys
    import loomc
    from loomc import Budget, loop

    db, limit_after = sys.argv[1], int(sys.argv[2])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead

    @loop(checkpoint=db, budget=Budget(usd=100.0, iterations=40), name="write-error")
    def work(state):
        n = state["n"]
        loomc.charge(0.5)
        if n == limit_after:
            biggest = max(os.path.getsize(db + s) for s in ("", "-wal") if os.path.exists(db + s))
            resource.setrlimit(resource.RLIMIT_FSIZE, (biggest + 100_000, resource.RLIM_INFINITY))
        return {"n": n + 1, "blob": random.Random(n).randbytes(20_000).hex()}

    if len(sys.argv) > 3:
        res = work.resume_run(sys.argv[3])
        print(json.dumps([res.status.value, res.steps, res.cost_usd]))
        sys.exit(0)
    try:
        work({"n": 0, "blob": ""}, run_id="werr")
    except loomc.LoomcError as exc:
        print(json.dumps([type(exc).__name__, str(exc)]))
        sys.exit(3)
    """
)


def test_write_error_mid_commit_in_a_real_process(tmp_path: Path) -> None:
    """The OS refuses a write (file size limit) mid-commit: a clear StoreError; a new process resumes."""
    script = tmp_path / "werr.py"
    script.write_text(WRITE_ERROR)
    db = tmp_path / "werr.db"
    res = subprocess.run([sys.executable, str(script), str(db), "3"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 3, res.stderr
    assert "Traceback" not in res.stderr
    kind, msg = json.loads(res.stdout)
    assert kind == "StoreError"
    assert f"cannot write to {db}" in msg
    before = committed(db, "werr")
    assert sorted(before) == list(range(len(before)))
    assert 3 <= len(before) < 40
    assert integrity(db) == "ok"

    res = subprocess.run([sys.executable, str(script), str(db), "-1", "werr"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == ["budget_exhausted", 40, 20.0]
    after = committed(db, "werr")
    assert all(after[n] == v for n, v in before.items())
    assert sorted(after) == list(range(40))
    assert integrity(db) == "ok"


def test_database_deleted_under_a_running_loop(tmp_path: Path) -> None:
    """Deleting the file mid-run is a clear StoreError at the next commit, not silent lost steps."""
    db = tmp_path / "gone.db"

    deletions = []

    @loop(checkpoint=str(db), budget=Budget(iterations=10), name="loses-its-file")
    def work(state: dict[str, Any]) -> dict[str, Any]:
        if state["n"] == 3 and not deletions:
            deletions.append(state["n"])
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
        if len(deletions) == 1:
            time.sleep(0.03)  # the file is checked at most every 0.1 s
        return {"n": state["n"] + 1}

    with pytest.raises(loomc.StoreError, match="was deleted or replaced while this process was writing") as caught:
        work({"n": 0})
    assert "BudgetExhausted" not in repr(caught.value)
    assert not db.exists()
    deletions.append(-1)  # the next run's steps do not sleep
    # The interpreter and the store carry on: the next run starts a fresh database.
    with pytest.raises(loomc.BudgetExhausted) as caught:
        work({"n": 0}, run_id="fresh")
    assert caught.value.state == {"n": 10}
    assert sorted(committed(db, "fresh")) == list(range(10))
    assert integrity(db) == "ok"


@pytest.mark.parametrize("phase", ["step", "commit"])
def test_sigterm_interrupts_and_the_run_resumes(tmp_path: Path, phase: str) -> None:
    """SIGTERM stops the loop as KeyboardInterrupt, the run reads `interrupted`, a new process finishes it."""
    ref = tmp_path / "ref.db"
    w = Worker()
    try:
        w.go(ref, "ref", 12)
        expected = json.loads(w.finish())
    finally:
        w.close()

    db = tmp_path / "term.db"
    w = Worker()
    try:
        w.go(db, "term", 12, jitter=0.05)
        marker = "s5" if phase == "step" else "c4"  # step 4 stores a large state: a long commit
        while (line := w.next_line()) != marker:
            assert line is not None
        w.kill(signal.SIGTERM)
        assert w.proc.stderr is not None
        err = w.proc.stderr.read()
    finally:
        w.close()
    assert w.proc.returncode != 0
    assert "KeyboardInterrupt" in err
    before = committed(db, "term")
    assert sorted(before) == list(range(len(before)))
    assert len(before) in (4, 5)
    status = run_row(db, "term")[0]
    assert status == "interrupted"
    reader = loomc.SQLiteStore(db, create=False)
    info = reader.get_run("term")
    reader.close()
    assert info is not None
    assert info.status is loomc.RunStatus.INTERRUPTED
    assert info.stop_reason == "interrupted: KeyboardInterrupt"

    w = Worker()
    try:
        w.go(db, "term", 12)
        assert json.loads(w.finish()) == expected
    finally:
        w.close()
    after = committed(db, "term")
    assert all(after[n] == v for n, v in before.items())
    assert sorted(after) == list(range(12))
    assert integrity(db) == "ok"
    assert os.path.exists(db)


def test_database_deleted_under_a_running_async_loop(tmp_path: Path) -> None:
    """The async store (group commit on aiosqlite) reports a deleted database the same way."""
    import asyncio

    db = tmp_path / "gone-async.db"

    @loop(checkpoint=str(db), budget=Budget(iterations=10), name="async-loses-its-file")
    async def work(state: dict[str, Any]) -> dict[str, Any]:
        if state["n"] == 3:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
        if state["n"] >= 3:
            await asyncio.sleep(0.03)  # the file is checked at most every 0.1 s
        return {"n": state["n"] + 1}

    with pytest.raises(loomc.StoreError, match="was deleted or replaced while this process was writing"):
        asyncio.run(work({"n": 0}))
    assert not db.exists()
