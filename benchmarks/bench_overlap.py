"""Async loops on one database: do their steps overlap, and does a checkpoint ever stall the event loop?

    python benchmarks/bench_overlap.py            # asyncio and trio

For each backend it prints:
- two loops of 5 x 100 ms steps run together: total time against the 1.0 s they would take in turn;
- fifty loops of 3 x 50 ms steps: total time against 7.5 s in turn;
- twenty loops of 20 steps with no sleep (checkpoint-bound, ``durability="power"``): steps per
  second and the longest gap seen by a 1 ms ticker on the same event loop, for the async store
  and, for comparison, for the sync store called directly on the event loop.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import loomc
from loomc import (
    Budget,
    _astore,
    loop,
)


def make(db: str, name: str, steps: int, sleep: float) -> Any:
    """An async loop of ``steps`` steps sleeping ``sleep`` each."""

    @loop(checkpoint=db, budget=Budget(iterations=steps), name=name)
    async def step(state: dict[str, int]) -> dict[str, int]:
        if sleep:
            await anyio.sleep(sleep)
        loomc.charge(0.001)
        return {"n": state["n"] + 1}

    return step


async def together(loops: list[Any]) -> float:
    """Run every loop concurrently; the wall time."""
    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for fn in loops:
            tg.start_soon(fn.run, {"n": 0})
    return time.perf_counter() - t0


async def with_ticker(loops: list[Any]) -> tuple[float, float]:
    """Run the loops with a 1 ms ticker beside them; (wall time, longest ticker gap)."""
    gaps: list[float] = []
    done = anyio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await anyio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        wall = await together(loops)
        done.set()
    return wall, max(gaps)


class _OnTheLoop:
    """The sync store called directly on the event loop (what the async store avoids)."""

    is_async = True

    def __init__(self, store: Any) -> None:
        self.store = store

    async def __aenter__(self) -> _OnTheLoop:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)

        async def call(*args: Any) -> Any:
            return method(*args)

        return call


async def bench(tmp: Path, backend: str) -> None:
    """Print the figures for one backend."""
    two = await together([make(str(tmp / f"two-{backend}.db"), n, 5, 0.1) for n in "ab"])
    print(f"[{backend}] 2 loops x 5 x 100 ms:  {two:.2f} s together (1.00 s in turn)")
    fifty = await together([make(str(tmp / f"fifty-{backend}.db"), f"l{i}", 3, 0.05) for i in range(50)])
    print(f"[{backend}] 50 loops x 3 x 50 ms:  {fifty:.2f} s together (7.50 s in turn)")
    db = str(tmp / f"busy-{backend}.db")
    wall, gap = await with_ticker([make(db, f"b{i}", 20, 0.0) for i in range(20)])
    print(f"[{backend}] 20 loops x 20 steps, async store:      {400 / wall:7.0f} steps/s, longest loop stall {gap * 1000:6.1f} ms")
    real = _astore.async_twin
    _astore.async_twin = lambda store: _OnTheLoop(store)  # type: ignore[assignment]
    try:
        db = str(tmp / f"blocking-{backend}.db")
        wall, gap = await with_ticker([make(db, f"b{i}", 20, 0.0) for i in range(20)])
    finally:
        _astore.async_twin = real  # type: ignore[assignment]
    print(f"[{backend}] 20 loops x 20 steps, sync store on loop: {400 / wall:7.0f} steps/s, longest loop stall {gap * 1000:6.1f} ms")


def main() -> None:
    """Both backends, in a temporary directory."""
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("asyncio", "trio"):
            anyio.run(bench, Path(tmp), backend, backend=backend)


if __name__ == "__main__":
    main()
