"""loomc against the floor: what a step costs on top of raw ``sqlite3`` on this machine.

Every figure is a median of several repetitions, and every time is also printed as a ratio
to a *floor* measured in the same run: raw ``sqlite3``, one connection, WAL, per step one
INSERT of the JSON state and one UPDATE of a runs row, committed per step, with
``synchronous=FULL`` (the floor for ``durability="power"``, the default) and
``synchronous=NORMAL`` (the floor for ``durability="process"``)::

    python benchmarks/run_all.py                  # everything (about a minute)
    python benchmarks/run_all.py --only step,async --reps 7
    python benchmarks/run_all.py --json results.json

The CLI on a large database is timed by ``benchmarks/bench_cli.py``; peers by
``benchmarks/peers.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SMALL = {"x": "a" * 80, "n": 0}  # about 100 bytes of JSON
SYNC = {"power": "FULL", "process": "NORMAL"}
RESULTS: dict[str, Any] = {}


def med(xs: list[float]) -> float:
    """Median."""
    return statistics.median(xs)


def fresh_dir(root: Path, name: str) -> Path:
    """An empty directory under ``root``."""
    d = root / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def report(key: str, value: float, unit: str, note: str = "") -> None:
    """Print one figure and keep it for --json."""
    RESULTS[key] = value
    shown = f"{value:10.1f} {unit}" if unit in ("us", "ms", "MB", "KB", "B") else f"{value:10.2f} {unit}"
    print(f"  {key:<48}{shown}  {note}")


# ---------------------------------------------------------------------------------- floors


def floor_per_step(path: Path, durability: str, state: Any, steps: int, mutate: Callable[[Any, int], Any]) -> float:
    """Seconds per step of the raw sqlite3 floor."""
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute(f"PRAGMA synchronous={SYNC[durability]}")
    c.execute("CREATE TABLE runs(id TEXT PRIMARY KEY, steps INTEGER, cost_usd REAL, updated_at TEXT)")
    c.execute("CREATE TABLE steps(run_id TEXT, step_n INTEGER, state_blob BLOB, PRIMARY KEY(run_id, step_n)) WITHOUT ROWID")
    c.execute("INSERT INTO runs VALUES ('r', 0, 0, '')")
    t0 = time.perf_counter()
    for i in range(steps):
        state = mutate(state, i)
        c.execute("BEGIN")
        c.execute("INSERT INTO steps VALUES (?, ?, ?)", ("r", i, json.dumps(state)))
        c.execute("UPDATE runs SET steps = ?, cost_usd = ?, updated_at = ? WHERE id = ?", (i + 1, 0.0, "t", "r"))
        c.execute("COMMIT")
    el = (time.perf_counter() - t0) / steps
    c.close()
    return el


def bump(state: dict[str, Any], i: int) -> dict[str, Any]:
    """The small state's step: a new dict with the counter advanced."""
    return {"x": state["x"], "n": state["n"] + 1}


# --------------------------------------------------------------------------- loomc loops


def loomc_sync(path: Path, durability: str, state: Any, steps: int, fn: Callable[[Any], Any]) -> float:
    """Seconds per step of a sync @loop doing ``fn``."""
    from loomc import Budget, loop

    runner = loop(checkpoint=str(path), durability=durability, budget=Budget(iterations=steps), name="bench")(fn)
    t0 = time.perf_counter()
    res = runner.run(state)
    el = (time.perf_counter() - t0) / steps
    assert res.steps == steps, res
    runner.store().close()
    return el


def loomc_async(path: Path, durability: str, state: Any, steps: int) -> float:
    """Seconds per step of an async @loop doing nothing."""
    from loomc import Budget, loop

    @loop(checkpoint=str(path), durability=durability, budget=Budget(iterations=steps), name="bench-async")
    async def step(s: dict[str, Any]) -> dict[str, Any]:
        return {"x": s["x"], "n": s["n"] + 1}

    async def main() -> float:
        t0 = time.perf_counter()
        res = await step.run(state)
        el = (time.perf_counter() - t0) / steps
        assert res.steps == steps, res
        return el

    el = asyncio.run(main())
    step.store().close()
    return el


def thread_round_trip(calls: int = 2000) -> float:
    """Seconds for one asyncio -> aiosqlite thread -> asyncio round trip doing nothing.

    An async loop's commit cannot cost less: the event loop never runs SQLite itself.
    """
    import aiosqlite

    async def main() -> float:
        conn = await aiosqlite.connect(":memory:")
        try:
            t0 = time.perf_counter()
            for _ in range(calls):
                await conn._execute(int)  # the hand-off aiosqlite makes for every call
            return (time.perf_counter() - t0) / calls
        finally:
            await conn.close()

    return asyncio.run(main())


def bench_step(root: Path, reps: int, steps: int) -> None:
    """No-op loop, 100-byte state: loomc sync/async vs the FULL and NORMAL floors.

    Each repetition measures the floor right before and right after loomc, and the ratio
    is taken against their mean, so a machine whose load changes between repetitions
    still yields fair ratios; the printed ratio is the median of these.
    """
    print(f"\n[step] no-op loop, ~100-byte state, {steps} steps, median of {reps}")
    times: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    for r in range(reps):
        d = fresh_dir(root, f"step{r}")
        for dur in ("power", "process"):
            before = floor_per_step(d / f"floor-{dur}-a.db", dur, SMALL, steps, bump)
            sync = loomc_sync(d / f"sync-{dur}.db", dur, SMALL, steps, lambda s: bump(s, 0))
            asyn = loomc_async(d / f"async-{dur}.db", dur, SMALL, steps)
            after = floor_per_step(d / f"floor-{dur}-b.db", dur, SMALL, steps, bump)
            fl = (before + after) / 2
            hop = thread_round_trip()
            times.setdefault("hop", []).append(hop)
            ratios.setdefault(f"async_{dur}_hop", []).append(asyn / (fl + hop))
            times.setdefault(f"floor_{dur}", []).append(fl)
            times.setdefault(f"sync_{dur}", []).append(sync)
            times.setdefault(f"async_{dur}", []).append(asyn)
            ratios.setdefault(f"sync_{dur}", []).append(sync / fl)
            ratios.setdefault(f"async_{dur}", []).append(asyn / fl)
    report("asyncio -> database thread -> asyncio, doing nothing", med(times["hop"]) * 1e6, "us",
           "(the least an async commit adds to the floor)")
    for dur, label in (("power", "FULL"), ("process", "NORMAL")):
        report(f"floor {label} (synchronous={label})", med(times[f"floor_{dur}"]) * 1e6, "us", "per step")
        for kind in ("sync", "async"):
            ratio = med(ratios[f"{kind}_{dur}"])
            report(f"loomc {kind} durability={dur}", med(times[f"{kind}_{dur}"]) * 1e6, "us",
                   f"= {ratio:.2f}x the {label} floor")
            RESULTS[f"ratio {kind} {dur}"] = ratio
        hop_ratio = med(ratios[f"async_{dur}_hop"])
        print(f"  {'':<48}{'':>13}  = {hop_ratio:.2f}x (the {label} floor + one thread round trip)")
        RESULTS[f"ratio async {dur} vs floor+hop"] = hop_ratio


# ------------------------------------------------------------------------ 100 KB text state

WORDS = [
    "agent", "loop", "budget", "state", "draft", "review", "the", "a", "of", "and", "to", "in", "model", "plan",
    "step", "score", "token", "cost", "result", "check", "write", "read", "file", "test", "error", "fix", "again",
    "better", "worse", "answer", "question", "context", "memory", "tool", "call", "search", "summary", "report",
]


def document(size: int, seed: int = 1) -> str:
    """About ``size`` characters of word text."""
    rng = random.Random(seed)
    out: list[str] = []
    n = 0
    while n < size:
        w = rng.choice(WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


def edit(state: dict[str, Any], i: int) -> dict[str, Any]:
    """Change a little of the text: overwrite a few words at random places."""
    rng = random.Random(i)
    doc = state["doc"]
    for _ in range(3):
        at = rng.randrange(0, len(doc) - 20)
        doc = doc[:at] + rng.choice(WORDS) + doc[at + 6 :]
    return {"doc": doc, "n": state["n"] + 1}


def db_bytes(path: Path) -> int:
    """Size of the database after a full checkpoint (WAL folded in)."""
    c = sqlite3.connect(path)
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()
    return sum(os.path.getsize(f"{path}{s}") for s in ("", "-wal") if os.path.exists(f"{path}{s}"))


def bench_text(root: Path, reps: int, steps: int) -> None:
    """100 KB text state changing a little each step: bytes on disk per step and step time."""
    print(f"\n[text] 100 KB text state, 3 words changed per step, {steps} steps, median of {reps}")
    start = {"doc": document(100_000), "n": 0}
    json_size = len(json.dumps(start))
    times: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    sizes: list[float] = []
    for r in range(reps):
        d = fresh_dir(root, f"text{r}")
        for dur in ("power", "process"):
            before = floor_per_step(d / f"floor-{dur}-a.db", dur, start, steps, edit)
            counter = {"i": 0}

            def step(s: dict[str, Any], counter: dict[str, int] = counter) -> dict[str, Any]:
                counter["i"] += 1
                return edit(s, counter["i"] - 1)

            p = d / f"loomc-{dur}.db"
            t = loomc_sync(p, dur, start, steps, step)
            after = floor_per_step(d / f"floor-{dur}-b.db", dur, start, steps, edit)
            times.setdefault(f"floor_{dur}", []).append((before + after) / 2)
            times.setdefault(f"sync_{dur}", []).append(t)
            ratios.setdefault(dur, []).append(t / ((before + after) / 2))
            if dur == "power":
                sizes.append(db_bytes(p) / steps)
    report("JSON size of the state", json_size / 1024, "KB")
    per = med(sizes)
    report("loomc bytes on disk per step", per / 1024, "KB", f"= {per / json_size:.3f}x the JSON size")
    RESULTS["ratio bytes per step"] = per / json_size
    for dur, label in (("power", "FULL"), ("process", "NORMAL")):
        report(f"floor {label}, 100 KB state", med(times[f"floor_{dur}"]) * 1e6, "us", "per step")
        ratio = med(ratios[dur])
        report(f"loomc sync durability={dur}, 100 KB", med(times[f"sync_{dur}"]) * 1e6, "us",
               f"= {ratio:.2f}x the {label} floor")
        RESULTS[f"ratio text {dur}"] = ratio


# ------------------------------------------------------------------------------ memory


def bench_memory(root: Path, steps: int) -> None:
    """Memory growth over ``steps`` steps of a 100 KB state (tracemalloc and RSS)."""
    from loomc import Budget, loop

    print(f"\n[memory] {steps} steps of a 100 KB text state")
    d = fresh_dir(root, "memory")
    marks: dict[int, tuple[int, int]] = {}

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @loop(checkpoint=str(d / "mem.db"), durability="process", budget=Budget(iterations=steps), name="bench-mem")
    def step(s: dict[str, Any]) -> dict[str, Any]:
        n = s["n"]
        if n in (100, steps - 1):
            gc.collect()
            marks[n] = (tracemalloc.get_traced_memory()[0], rss())
        return edit(s, n)

    tracemalloc.start()
    res = step.run({"doc": document(100_000), "n": 0})
    tracemalloc.stop()
    assert res.steps == steps
    (m0, r0), (m1, r1) = marks[100], marks[steps - 1]
    report("python heap growth, step 100 -> last", (m1 - m0) / 2**20, "MB", "(tracemalloc)")
    report("RSS growth, step 100 -> last", (r1 - r0) / 2**20, "MB")
    RESULTS["history entries kept"] = len(res.history)
    step.store().close()


# ------------------------------------------------------------------------------- resume

RESUME_CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
t0 = time.perf_counter()
from loomc import Budget, loop
first = []

@loop(checkpoint={db!r}, durability="process", budget=Budget(iterations=10**9), name="bench-resume")
def step(s):
    if not first:
        first.append(time.perf_counter())
    return {{"doc": s["doc"], "n": s["n"] + 1}}

t1 = time.perf_counter()
info = step.store().get_run("resume")
step.store().close()
t2 = time.perf_counter()
res = step.resume_run("resume", budget=Budget(iterations=info.steps + 1))
print((first[0] - t2) * 1000, (t2 - t1) * 1000, res.steps)
"""


def bench_resume(root: Path, reps: int, steps: int) -> None:
    """Resume of a ``steps``-step run with a 100 KB state: time to the first new step."""
    from loomc import Budget, loop

    print(f"\n[resume] a {steps}-step run with a 100 KB text state, fresh process, median of {reps}")
    d = root / "resume"
    db = d / f"resume-{steps}.db"
    if not db.exists():
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()

        @loop(checkpoint=str(db), durability="process", budget=Budget(iterations=steps), name="bench-resume")
        def build(s: dict[str, Any]) -> dict[str, Any]:
            return edit(s, s["n"])

        res = build.run({"doc": document(100_000), "n": 0}, run_id="resume")
        assert res.steps == steps
        build.store().close()
        print(f"  (built {db.name}: {db_bytes(db) / 2**20:.0f} MB in {time.perf_counter() - t0:.1f} s)")
    times = []
    for _ in range(reps):
        out = subprocess.run(
            [sys.executable, "-c", RESUME_CHILD.format(repo=str(REPO), db=str(db))],
            capture_output=True, text=True, check=True,
        ).stdout.split()
        times.append(float(out[0]))
    report(f"resume of {steps} steps to the first new step", med(times), "ms", "(includes opening the database)")


# ----------------------------------------------------------------------------- fan-out


def bench_fanout(root: Path, reps: int, loops: int, steps: int, sleep: float) -> None:
    """``loops`` concurrent async loops, ``steps`` steps each sleeping ``sleep`` s."""
    from loomc import Budget, loop

    ideal = steps * sleep
    print(f"\n[fan-out] {loops} concurrent async loops x {steps} steps sleeping {sleep * 1000:.0f} ms (ideal {ideal:.2f} s)")
    for dur in ("power", "process"):
        times = []
        for r in range(reps):
            d = fresh_dir(root, f"fan{r}-{dur}")

            @loop(checkpoint=str(d / "fan.db"), durability=dur, budget=Budget(iterations=steps), name="bench-fan")
            async def step(s: dict[str, Any]) -> dict[str, Any]:
                await asyncio.sleep(sleep)
                return {"n": s["n"] + 1}

            async def main(step: Any = step) -> float:
                t0 = time.perf_counter()
                out = await asyncio.gather(*(step.run({"n": 0}) for _ in range(loops)))
                el = time.perf_counter() - t0
                assert all(o.steps == steps for o in out)
                return el

            times.append(asyncio.run(main()))
            step.store().close()
        t = med(times)
        report(f"fan-out wall time, durability={dur}", t, "s", f"= {t / ideal:.2f}x the ideal")
        RESULTS[f"ratio fanout {dur}"] = t / ideal


# ------------------------------------------------------------------------------ detectors


def bench_detectors(steps: int) -> None:
    """A long run with BestScore, score_plateau and Escalate: does a step get slower as it grows?"""
    from loomc import BestScore, Budget, Escalate, MemoryStore, loop, score_plateau

    print(f"\n[detectors] {steps} steps with BestScore, score_plateau and Escalate, memory store")
    marks: dict[int, float] = {}
    window = 500

    @loop(checkpoint=MemoryStore(), budget=Budget(iterations=steps), scorer=lambda s: s["score"], backtrack=BestScore(),
          converge_on=score_plateau(patience=steps), on_stall=Escalate(after=steps), name="bench-detectors")
    def step(s: dict[str, Any]) -> dict[str, Any]:
        n = s["n"]
        if n in (0, window, steps - window, steps - 1):
            marks[n] = time.perf_counter()
        return {"n": n + 1, "score": float(n)}

    step.run({"n": 0, "score": 0.0})
    first = (marks[window] - marks[0]) / window
    last = (marks[steps - 1] - marks[steps - window]) / (window - 1)
    report(f"per step, steps 0-{window}", first * 1e6, "us")
    report(f"per step, the last {window} steps", last * 1e6, "us", f"= {last / first:.2f}x the first ones")
    RESULTS["detectors last/first"] = last / first


# -------------------------------------------------------------------------------- start-up


def bench_startup(reps: int) -> None:
    """``import loomc`` and ``loomc runs --help`` in fresh processes."""
    print(f"\n[start-up] fresh processes, median of {reps}")
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    bare, imp, helps = [], [], []
    for _ in range(reps):
        for cmd, out in (([py, "-c", "pass"], bare), ([py, "-c", "import loomc"], imp),
                         ([py, "-m", "loomc", "runs", "--help"], helps)):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, env=env)
            out.append(time.perf_counter() - t0)
    report("python -c pass", med(bare) * 1000, "ms")
    report("python -c 'import loomc'", med(imp) * 1000, "ms", f"(import alone: {(med(imp) - med(bare)) * 1000:.0f} ms)")
    report("loomc runs --help", med(helps) * 1000, "ms")
    RESULTS["import loomc only ms"] = (med(imp) - med(bare)) * 1000


def main() -> None:
    """Run the selected benchmarks."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="step,text,memory,resume,fanout,detectors,startup")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--resume-steps", type=int, default=10_000)
    ap.add_argument("--dir", default=None, help="where the databases go (default: a temporary directory)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    only = set(args.only.split(","))
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="loomc-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    import loomc

    print(f"loomc {getattr(loomc, '__version__', '?')}, Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, "
          f"{os.cpu_count()} CPUs, databases in {root}")
    if "step" in only:
        bench_step(root, args.reps, args.steps)
    if "text" in only:
        bench_text(root, args.reps, args.steps)
    if "memory" in only:
        bench_memory(root, args.steps)
    if "resume" in only:
        bench_resume(root, args.reps, args.resume_steps)
    if "fanout" in only:
        bench_fanout(root, max(1, args.reps // 2), 100, 50, 0.010)
    if "detectors" in only:
        bench_detectors(10_000)
    if "startup" in only:
        bench_startup(max(args.reps, 7))
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=2) + "\n")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
