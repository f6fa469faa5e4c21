"""Real loops that fill a database for the CLI tests (run in the test process or as scripts)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import loomc
from loomc import BestScore, Budget, LastGood, loop, predicate, score_plateau

#: Scores of the refine loop's successful steps, by call number (call 2 fails).
REFINE_SCORES = {0: 0.2, 1: 0.5, 3: 0.4, 4: 0.8, 5: 0.8, 6: 0.8, 7: 0.8, 8: 0.8}

#: A loop run as a script (``__main__``) with a pydantic state; checkpoints to $LOOMC_DB.
SCRIPT = textwrap.dedent(
    """
    import os, time
    import loomc
    from pydantic import BaseModel
    from loomc import Budget, loop, predicate

    class Draft(BaseModel):
        n: int = 0
        text: str = ""

    @loop(
        budget=Budget(usd=1.0, iterations=40),
        converge_on=predicate(lambda h: h[-1].state.n >= int(os.environ.get("STEPS", "8"))),
        scorer=lambda s: s.n / 10,
    )
    def work(state: Draft) -> Draft:
        assert isinstance(state, Draft), f"state came back as {type(state).__name__}"
        loomc.charge(0.01)
        time.sleep(float(os.environ.get("STEP_SLEEP", "0.05")))
        return Draft(n=state.n + 1, text=state.text + "x")

    if __name__ == "__main__":
        work.run(Draft())
    """
)


def committed_steps(db: Path, run_id: str | None = None) -> list[int]:
    """Step numbers committed (for one run, or all)."""
    if not db.exists():
        return []
    with sqlite3.connect(db) as c:
        if run_id is None:
            return [r[0] for r in c.execute("SELECT step_n FROM steps ORDER BY run_id, step_n")]
        return [r[0] for r in c.execute("SELECT step_n FROM steps WHERE run_id=? ORDER BY step_n", (run_id,))]


def wait_for_steps(db: Path, n: int, timeout: float = 20.0) -> None:
    """Block until at least ``n`` steps are committed in ``db``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(committed_steps(db)) >= n:
                return
        except sqlite3.OperationalError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"{n} steps never committed in {db}")


def start_script(folder: Path, db: Path, *, steps: int = 8, sleep: float = 0.05, name: str = "agent.py") -> subprocess.Popen[bytes]:
    """Start :data:`SCRIPT` as ``__main__`` in ``folder``, checkpointing to ``db``."""
    script = folder / name
    script.write_text(SCRIPT)
    env = {**os.environ, "LOOMC_DB": str(db), "STEPS": str(steps), "STEP_SLEEP": str(sleep)}
    return subprocess.Popen([sys.executable, str(script)], cwd=folder, env=env, stdout=subprocess.DEVNULL)


def crash_script(folder: Path, db: Path, after: int = 2) -> None:
    """Run :data:`SCRIPT` and SIGKILL it once ``after`` steps are committed: a crashed run."""
    already = len(committed_steps(db))
    proc = start_script(folder, db, steps=30, sleep=0.05)
    try:
        wait_for_steps(db, already + after)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def build(db: str) -> dict[str, Any]:
    """Run the subject loops into ``db``; returns their run ids and results."""
    calls: list[int] = []

    @loop(
        checkpoint=db,
        budget=Budget(usd=1.0, iterations=12, wall_clock="10m"),
        converge_on=score_plateau(patience=2),
        backtrack=[BestScore(), LastGood()],
        scorer=lambda s: s["score"],
        cost_fn=lambda s: 0.05,
        name="subjects:refine",
    )
    def refine(state: dict[str, Any]) -> dict[str, Any]:
        k = len(calls)
        calls.append(k)
        if k == 2:
            raise RuntimeError("rate limit")
        return {"n": state["n"] + 1, "score": REFINE_SCORES[k]}

    @loop(checkpoint=db, budget=Budget(usd=0.5, iterations=3), cost_fn=lambda s: 0.15, name="subjects:capped")
    def capped(state: dict[str, Any]) -> dict[str, Any]:
        return {"n": state["n"] + 1}

    @loop(checkpoint=db, budget=Budget(iterations=1), name="subjects:leaf")
    def leaf(state: int) -> int:
        loomc.charge(0.001)
        return state + 1

    @loop(checkpoint=db, budget=Budget(iterations=2), name="subjects:child")
    def child(state: int) -> int:
        loomc.charge(0.01)
        return leaf.run(state).state  # type: ignore[no-any-return]

    @loop(
        checkpoint=db,
        budget=Budget(usd=1.0, iterations=5),
        converge_on=predicate(lambda h: len(h) >= 2),
        name="subjects:parent",
    )
    def parent(state: int) -> int:
        loomc.charge(0.1)
        return child.run(state).state  # type: ignore[no-any-return]

    @loop(checkpoint=db, converge_on=predicate(lambda h: True), name="subjects:quick")
    def quick(state: dict[str, Any]) -> dict[str, Any]:
        return {"n": state["n"] + 1}

    from orchestration import Graph

    @loop(checkpoint=db, budget=Budget(iterations=2), name="subjects:gather")
    def gather(state: dict[str, Any]) -> dict[str, Any]:
        loomc.charge(0.02)
        return {**state, "notes": state.get("notes", 0) + 1}

    def summarise(state: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("rate limit")

    def publish(state: dict[str, Any]) -> dict[str, Any]:
        return state

    graph = Graph("subjects-report", budget=Budget(usd=1.0), checkpoint=db)
    graph.add(gather)
    graph.add(summarise, after=gather)
    graph.add(publish, after=summarise)

    out: dict[str, Any] = {}
    out["graph"] = graph.run({"topic": "tides"})
    out["refine"] = refine.run({"n": 0, "score": 0.0})
    out["capped"] = capped.run({"n": 0})
    out["parent"] = parent.run(0)
    out["twin1"] = quick.run({"n": 0}, run_id="abcd00000001")
    out["twin2"] = quick.run({"n": 10}, run_id="abcd00000002")
    return out


if __name__ == "__main__":  # pragma: no cover - manual use: python tests/cli_subjects.py x.db
    for key, result in build(sys.argv[1]).items():
        print(key, result.run_id, result.status.value)
