"""Where the time of 100 concurrent async loops goes: the fan-out benchmark taken apart.

100 loops of 50 steps, each step sleeping 10 ms (ideal: 0.5 s), built up piece by piece::

    python benchmarks/bench_fanout_parts.py              # durability="power", 3 repetitions
    python benchmarks/bench_fanout_parts.py --durability process --reps 5

1. ``asyncio.sleep`` alone, in 100 tasks;
2. a hand-written loop: sleep, encode the state, build the step row — no commit;
3. the same loop committing each row through loomc's ``AsyncSQLiteStore`` (group commit);
4. ``@loop`` with the store's commit replaced by one that does nothing;
5. ``@loop`` as users run it.

Each line gives the wall time (and its ratio to the ideal) and the event loop thread's CPU
per step (``time.thread_time``).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LOOPS, STEPS, SLEEP = 100, 50, 0.010


def measure(make: Callable[[Path], Callable[[], Awaitable[None]]], reps: int) -> tuple[float, float]:
    """Median wall seconds and event-loop CPU seconds per step of ``reps`` fresh runs."""
    walls, cpus = [], []
    for _ in range(reps):
        body = make(Path(tempfile.mkdtemp(prefix="loomc-fan-")))

        async def main(body: Callable[[], Awaitable[None]] = body) -> tuple[float, float]:
            t0, c0 = time.perf_counter(), time.thread_time()
            await body()
            return time.perf_counter() - t0, time.thread_time() - c0

        wall, cpu = asyncio.run(main())
        walls.append(wall)
        cpus.append(cpu / (LOOPS * STEPS))
    return statistics.median(walls), statistics.median(cpus)


def bare(d: Path) -> Callable[[], Awaitable[None]]:
    """Only the sleeps."""

    async def one() -> None:
        for _ in range(STEPS):
            await asyncio.sleep(SLEEP)

    async def body() -> None:
        await asyncio.gather(*(one() for _ in range(LOOPS)))

    return body


def hand_written(durability: str, commit: bool) -> Callable[[Path], Callable[[], Awaitable[None]]]:
    """A loop written by hand on the async store (with or without its commits)."""
    from loomc import RunStatus
    from loomc.store.codec import encode
    from loomc.store.sqlite.aio import AsyncSQLiteStore
    from loomc.store.sqlite.sql import StepRow, now_iso
    from loomc.store.sqlite.sync import NewRun

    def make(d: Path) -> Callable[[], Awaitable[None]]:
        async def one(store: AsyncSQLiteStore) -> None:
            rid = await store.begin_run(NewRun(spec_hash="h", name="by-hand"))
            state: dict[str, Any] = {"n": 0}
            for n in range(STEPS):
                await asyncio.sleep(SLEEP)
                state = {"n": state["n"] + 1}
                row = StepRow(n, encode(state), 0.0, None, now_iso(), None, None, n, SLEEP, 0.0, n + 1, 0.0, 0.0,
                              "running", None)
                if commit:
                    await store.commit_step(rid, row)
                else:
                    await asyncio.sleep(0)
            await store.finish_run(rid, RunStatus.COMPLETED, None, 0.0)

        async def body() -> None:
            async with AsyncSQLiteStore(d / "fan.db", durability=durability) as store:  # type: ignore[arg-type]
                await asyncio.gather(*(one(store) for _ in range(LOOPS)))

        return body

    return make


def with_loop(durability: str, null_commit: bool) -> Callable[[Path], Callable[[], Awaitable[None]]]:
    """``@loop`` (optionally with a store whose commit does nothing)."""
    from loomc import Budget, loop
    from loomc.store.sqlite.aio import AsyncSQLiteStore

    def make(d: Path) -> Callable[[], Awaitable[None]]:
        @loop(checkpoint=str(d / "fan.db"), durability=durability, budget=Budget(iterations=STEPS), name="bench-fan")
        async def step(s: dict[str, Any]) -> dict[str, Any]:
            await asyncio.sleep(SLEEP)
            return {"n": s["n"] + 1}

        async def body() -> None:
            real = AsyncSQLiteStore.commit_step
            if null_commit:
                async def nothing(self: Any, run_id: str, row: Any) -> None:
                    await asyncio.sleep(0)

                AsyncSQLiteStore.commit_step = nothing  # type: ignore[method-assign]
            try:
                out = await asyncio.gather(*(step.run({"n": 0}) for _ in range(LOOPS)))
            finally:
                AsyncSQLiteStore.commit_step = real  # type: ignore[method-assign]
            assert all(o.steps == STEPS for o in out)

        return body

    return make


def main() -> None:
    """Print each piece's wall time and event-loop CPU per step."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--durability", default="power", choices=["power", "process"])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    ideal = STEPS * SLEEP
    print(f"{LOOPS} async loops x {STEPS} steps sleeping {SLEEP * 1000:.0f} ms (ideal {ideal:.2f} s), "
          f"durability={args.durability}, median of {args.reps}")
    pieces: list[tuple[str, Callable[[Path], Callable[[], Awaitable[None]]]]] = [
        ("asyncio.sleep alone", bare),
        ("hand-written loop, no commit", hand_written(args.durability, commit=False)),
        ("hand-written loop + AsyncSQLiteStore commits", hand_written(args.durability, commit=True)),
        ("@loop, commit that does nothing", with_loop(args.durability, null_commit=True)),
        ("@loop", with_loop(args.durability, null_commit=False)),
    ]
    for label, make in pieces:
        wall, cpu = measure(make, args.reps)
        print(f"  {label:<48}{wall:6.3f} s = {wall / ideal:4.2f}x the ideal   event loop CPU {cpu * 1e6:5.1f} us/step")


if __name__ == "__main__":
    main()
