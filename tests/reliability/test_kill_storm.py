"""Kill storm: SIGKILL a running loop 50 times at random instants, resume each time in a new process.

Half the kills land while the step runs, half right after the step returned, while the
engine encodes and commits a large state (a 20 KB document edited a little each step,
stored as deltas, and every fourth step 300 KB of noise, stored whole). After every kill the database must be sound,
every step seen committed before must still be there unchanged, and step numbers must be
contiguous; every run must end exactly like an uninterrupted run.
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import pytest

import loomc
from tests.reliability.harness import Worker, committed, integrity, run_row, stored_kinds

KILLS = 50
TARGET = 30  # steps per run


def _reference(tmp_path: Path) -> dict[str, object]:
    w = Worker()
    try:
        w.go(tmp_path / "reference.db", "reference", TARGET)  # a sync run: every flavor must end like it
        return dict(json.loads(w.finish()))
    finally:
        w.close()


@pytest.mark.parametrize(("flavor", "kills_wanted"), [("sync-power", KILLS), ("async-process", 20)])
def test_sigkills_lose_no_committed_step(tmp_path: Path, flavor: str, kills_wanted: int) -> None:
    """SIGKILLs during steps and during commits: nothing committed is lost, results match.

    50 kills of a sync loop (``durability="power"``), 20 of an async loop on the aiosqlite
    store (``durability="process"``, which must survive any process crash too).
    """
    rng = random.Random(20240611)
    db = tmp_path / "storm.db"
    ref = _reference(tmp_path)
    assert ref["status"] == "completed"
    assert ref["steps"] == TARGET

    spare = Worker()
    run_no = 0
    run_id = f"storm-{run_no}"
    seen: dict[int, tuple[float, str]] = {}
    kills = {"step": 0, "commit": 0}
    landed_before_commit = 0
    finished_runs: list[dict[str, object]] = []
    try:
        while sum(kills.values()) < kills_wanted:
            w, spare = spare, Worker()
            w.go(db, run_id, TARGET, flavor=flavor)
            mode = "step" if sum(kills.values()) % 2 == 0 else "commit"
            marker = "s" if mode == "step" else "c"
            wanted = rng.randint(1, 4)
            hits, last_n, done = 0, -1, None
            while hits < wanted:
                line = w.next_line()
                assert line is not None, "worker died on its own"
                if line.startswith("done "):
                    done = json.loads(line[5:])
                    break
                if line.startswith(marker):
                    hits += 1
                    last_n = int(line[1:])
            if done is None:
                # "step": inside time.sleep of the step; "commit": encoding or committing its state
                delay = rng.uniform(0, 0.004) if mode == "step" else rng.uniform(0, 0.003)
                time.sleep(delay)
                w.kill(signal.SIGKILL)
                w.close()
                kills[mode] += 1
            else:
                w.proc.wait(30)
                w.close()

            assert integrity(db) == "ok"
            now = committed(db, run_id)
            assert sorted(now) == list(range(len(now))), f"steps not contiguous: {sorted(now)}"
            lost = {n: v for n, v in seen.items() if now.get(n) != v}
            assert not lost, f"committed steps lost or changed after a kill: {sorted(lost)}"
            if done is None:
                reader = loomc.SQLiteStore(db, create=False)
                info = reader.get_run(run_id)
                reader.close()
                assert info is not None
                # crashed; or completed when the kill landed after the last commit
                expected = loomc.RunStatus.COMPLETED if len(now) == TARGET else loomc.RunStatus.CRASHED
                assert info.status is expected
                if mode == "commit" and last_n not in now:
                    landed_before_commit += 1
            seen = now

            if done is not None:
                status, steps, cost = run_row(db, run_id)
                assert (status, steps) == ("completed", TARGET)
                assert done == ref, f"run {run_id} ended {done}, uninterrupted run ended {ref}"
                assert cost == pytest.approx(sum(c for c, _ in now.values()))
                finished_runs.append(done)
                run_no += 1
                run_id, seen = f"storm-{run_no}", {}

        # Finish the run the last kill interrupted, undisturbed.
        w, spare = spare, Worker()
        w.go(db, run_id, TARGET, flavor=flavor)
        done = json.loads(w.finish())
        w.close()
        assert done == ref
        now = committed(db, run_id)
        assert all(now.get(n) == v for n, v in seen.items())
        assert sorted(now) == list(range(TARGET))
        assert integrity(db) == "ok"
        finished_runs.append(done)
    finally:
        spare.close()

    assert kills == {"step": kills_wanted // 2, "commit": kills_wanted // 2}
    assert len(finished_runs) >= 2
    kinds = stored_kinds(db)  # the runs stored keyframes and deltas, and every one of them read back
    assert kinds.get(b"Z", 0) > 0
    assert kinds.get(b"D", 0) > 0
    print(f"kill storm ({flavor}): {kills}, {landed_before_commit} commit-phase kills landed before the commit, "
          f"{len(finished_runs)} runs finished identical to the uninterrupted run")
