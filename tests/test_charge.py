"""``loomc.charge``, ``loomc.reserve`` and ``loomc.current_run``: hard caps across threads, tasks and the run tree."""

from __future__ import annotations

import contextvars
import itertools
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loomc
from loomc import Budget, BudgetExhausted, Reservation, RunStatus, SQLiteStore, loop
from loomc._core.ledger import TreeLedger as Ledger
from loomc._core.ledger import _lock
from loomc._core.policy import EPS

pytestmark = pytest.mark.usefixtures("no_blocking")

def in_threads(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run ``fn(i)`` in ``n`` threads started together, each with a copy of the current context."""
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n

    def body(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)
        except BaseException as exc:
            out[i] = exc

    threads = [threading.Thread(target=contextvars.copy_context().run, args=(body, i)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_outside_a_run_charge_and_reserve_do_nothing() -> None:
    """No run, no ledger: charging is a no-op, a reservation is inert, current_run() is None."""
    loomc.charge(1.0)
    with loomc.reserve(5.0) as r:
        r.settle(2.0)
    assert loomc.current_run() is None


@pytest.mark.parametrize("bad", [-0.01, float("nan"), "1", True, None])
def test_bad_amounts_are_value_errors(bad: Any) -> None:
    """A negative, NaN or non-number amount is a ValueError naming it."""
    with pytest.raises(ValueError, match="non-negative number of USD"):
        loomc.charge(bad)
    with pytest.raises(ValueError, match="non-negative number of USD"):
        loomc.reserve(bad)


def test_a_charge_that_would_cross_the_cap_is_refused_and_not_recorded(db: str) -> None:
    """Inside a step, the charge crossing the cap raises BudgetExhausted; spend stays under the cap."""
    refused: list[BudgetExhausted] = []

    @loop(checkpoint=db, budget=Budget(usd=1.0, iterations=1), name="spender")
    def spender(state: dict[str, int]) -> dict[str, int]:
        loomc.charge(0.75)
        try:
            loomc.charge(0.5)
        except BudgetExhausted as exc:
            refused.append(exc)
        loomc.charge(0.25)  # exactly the rest still fits
        return state

    result = spender.run({"x": 0})
    assert result.cost_usd == 1.0
    (exc,) = refused
    assert exc.limit == "usd"
    assert exc.cap == 1.0
    assert exc.run_id == result.run_id


def test_an_uncaught_refusal_stops_the_run_with_its_state(db: str) -> None:
    """A refused charge that escapes the step ends the run budget_exhausted, the previous state kept."""

    @loop(checkpoint=db, budget=Budget(usd=0.1), name="over")
    def over(state: dict[str, int]) -> dict[str, int]:
        loomc.charge(0.03)
        return {"n": state["n"] + 1}

    with pytest.raises(BudgetExhausted) as caught:
        over({"n": 0})
    assert caught.value.limit == "usd"
    assert caught.value.state == {"n": 3}
    assert caught.value.used <= 0.1


def test_reservation_holds_then_settles_the_actual_cost(db: str) -> None:
    """A reservation holds room against the cap; settle records the real cost and frees the rest."""
    seen: dict[str, Any] = {}

    @loop(checkpoint=db, budget=Budget(usd=1.0, iterations=1), name="reserver")
    def reserver(state: dict[str, int]) -> dict[str, int]:
        r = loomc.reserve(0.75)
        assert isinstance(r, Reservation)
        view = loomc.current_run()
        assert view is not None
        seen["held"] = view.usd_remaining
        with pytest.raises(BudgetExhausted):
            loomc.reserve(0.5)  # only $0.25 is free while $0.75 is held
        r.settle(0.25)
        r.settle(0.5)  # settling twice records once
        view = loomc.current_run()
        assert view is not None
        seen["after"] = view.usd_remaining
        with loomc.reserve(0.5):
            pass  # leaving without settle records the full hold
        with pytest.raises(RuntimeError), loomc.reserve(0.25):
            raise RuntimeError("the call failed")  # an exception releases it
        loomc.reserve(0.1).release()
        return state

    result = reserver.run({"x": 0})
    assert seen == {"held": 0.25, "after": 0.75}
    assert result.cost_usd == 0.75


def test_concurrent_reservations_in_threads_never_cross_the_cap(db: str) -> None:
    """Twenty threads each reserve $0.10 under a $1.00 cap: exactly ten get it; the total stays $1.00."""

    @loop(checkpoint=db, budget=Budget(usd=1.0, iterations=1), name="threads")
    def step(state: dict[str, Any]) -> dict[str, Any]:
        def call(i: int) -> bool:
            r = loomc.reserve(0.1)
            time.sleep(0.01)  # the call in flight
            r.settle(0.1)
            return True

        outcomes = in_threads(20, call)
        return {"ok": sum(o is True for o in outcomes), "refused": sum(isinstance(o, BudgetExhausted) for o in outcomes)}

    result = step.run({})
    assert result.state == {"ok": 10, "refused": 10}
    assert result.cost_usd == pytest.approx(1.0)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_concurrent_reservations_in_tasks_across_a_tree_never_cross_the_root_cap(db: str, anyio_backend: str) -> None:
    """Three child loops, each running eight tasks that reserve $0.10: the root's $1.00 cap holds them all."""
    granted: list[int] = []

    @loop(checkpoint=db, budget=Budget(iterations=1), name="child")
    async def child(state: dict[str, int]) -> dict[str, int]:
        ok = 0

        async def call() -> None:
            nonlocal ok
            try:
                r = loomc.reserve(0.1)
            except BudgetExhausted:
                return
            ok += 1
            await anyio.sleep(0.02)
            r.settle(0.08)

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(call)
        granted.append(ok)
        return state

    @loop(checkpoint=db, budget=Budget(usd=1.0, iterations=1), name="root")
    async def root(state: dict[str, int]) -> dict[str, int]:
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(child.run, state)
        return state

    result = await root.run({"x": 0})
    assert sum(granted) == 10  # all holds were in flight at once: $0.10 x 10 = the cap
    assert result.cost_usd == pytest.approx(0.8)
    assert result.cost_usd <= 1.0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    caps=st.lists(st.one_of(st.none(), st.floats(0.05, 2.0)), min_size=1, max_size=3),
    ops=st.lists(
        st.tuples(st.integers(0, 2), st.floats(0.0, 0.5), st.floats(0.0, 1.0), st.booleans()),
        min_size=1, max_size=40,
    ),
    threads=st.integers(2, 6),
)
def test_property_concurrent_charges_and_reservations_never_cross_any_cap(
    caps: list[float | None], ops: list[tuple[int, float, float, bool]], threads: int,
) -> None:
    """Random charges and reservations (settled at most at the hold) from several threads on a ledger
    chain: at no instant does any ledger's spent + reserved exceed its cap."""
    chain: list[Ledger] = []
    for i, cap in enumerate(caps):
        chain.append(Ledger(f"run{i}", parent=chain[-1] if chain else None, usd_cap=cap))
    violations: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            with _lock:
                for led in chain:
                    if led.usd_cap is not None and led.spent + led.reserved > led.usd_cap + EPS:
                        violations.append(f"{led.run_id}: {led.spent} + {led.reserved} > {led.usd_cap}")
            time.sleep(0)

    def worker(t: int) -> None:
        for k, (level, amount, fraction, as_reservation) in enumerate(ops):
            if k % threads != t:
                continue
            led = chain[min(level, len(chain) - 1)]
            try:
                if as_reservation:
                    r = led.reserve(amount)
                    time.sleep(0)
                    r.settle(amount * fraction)
                else:
                    led.charge(amount)
            except BudgetExhausted:
                pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        in_threads(threads, worker)
    finally:
        stop.set()
        watcher.join()
    assert violations == []
    for led in chain:
        assert led.reserved == pytest.approx(0.0, abs=1e-9)
        if led.usd_cap is not None:
            assert led.spent <= led.usd_cap + EPS
    # each ledger's spend includes its descendants'
    for parent, kid in itertools.pairwise(chain):
        assert parent.spent >= kid.spent - EPS


def test_current_run_tells_id_step_and_remaining_budget(db: str) -> None:
    """Inside a step: the run id, the step number, spent and the remaining usd/iterations/wall clock."""
    views: list[Any] = []

    @loop(checkpoint=db, budget=Budget(usd=1.0, iterations=3, wall_clock="1h"), name="viewer")
    def viewer(state: dict[str, int]) -> dict[str, int]:
        loomc.charge(0.1)
        views.append(loomc.current_run())
        return {"n": state["n"] + 1}

    result = viewer.run({"n": 0})
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert [v.step for v in views] == [0, 1, 2]
    assert {v.run_id for v in views} == {result.run_id}
    assert re.fullmatch(r"[0-9a-f]{12}", result.run_id)
    assert [round(v.usd_spent, 6) for v in views] == [0.1, 0.2, 0.3]
    assert [round(v.usd_remaining, 6) for v in views] == [0.9, 0.8, 0.7]
    assert [v.iterations_remaining for v in views] == [3, 2, 1]
    assert all(v.parent_run_id is None for v in views)
    assert all(3500 < v.wall_clock_remaining <= 3600 for v in views)
    assert views[0].name == "viewer"


def test_a_hold_left_open_by_a_step_counts_in_full_and_frees_the_cap(db: str) -> None:
    """A reservation a step never settles is recorded at its full amount when the step ends."""
    seen: list[float] = []

    @loop(checkpoint=db, budget=Budget(usd=1.0, iterations=3), name="leaky")
    def leaky(state: dict[str, int]) -> dict[str, int]:
        view = loomc.current_run()
        assert view is not None
        seen.append(round(view.usd_remaining, 6))
        loomc.reserve(0.25)  # never settled
        return {"n": state["n"] + 1}

    result = leaky.run({"n": 0})
    assert seen == [1.0, 0.75, 0.5]  # no hold outlives its step
    assert result.cost_usd == pytest.approx(0.75)
    assert [s.cost_usd for s in SQLiteStore(db).load_steps(result.run_id)] == pytest.approx([0.25] * 3)


def test_settle_checks_the_amount_and_counts_once_across_threads() -> None:
    """settle() refuses a bad amount; racing settles of one hold record it once."""
    led = Ledger("r", usd_cap=1.0)
    hold = led.reserve(0.5)
    with pytest.raises(ValueError, match="non-negative"):
        hold.settle(-1.0)
    in_threads(8, lambda i: hold.settle(0.25))
    assert led.spent == 0.25
    assert led.reserved == 0.0
    assert led.holds == set()
