"""A budget shared by processes: the caps of a run tree enforced in the database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import loomc
from loomc import Budget, BudgetExhausted, PostgresStore, RunStatus, SQLiteStore, loop
from loomc._core import seams
from loomc._core.context import current_ledger
from loomc._core.ledger import TreeLedger
from loomc.store.open import open_store
from loomc.store.protocol import NewRun
from loomc.store.shared import StoreLedger

ROOT = Path(__file__).resolve().parent.parent
CAP = 1.0

WORKER = """
import json, os, sys, time
import loomc
from loomc import Budget, loop
from loomc._core import seams
from loomc.store.open import open_store

target, root_id, index, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
store = open_store(target)


@loop(budget=Budget(iterations=400), name="worker")
def worker(n):
    if mode == "hang":  # hold a reservation and never settle it (the process is killed meanwhile)
        loomc.reserve(0.25)
        print("holding", flush=True)
        time.sleep(600)
    with loomc.reserve(0.0031) as hold:  # the most a call could cost, held before it is made
        hold.settle(0.0017)  # what it did cost
    loomc.charge(0.00043)
    return n + 1


parent = seams.open_shared_parent(store, root_id)
start_at = float(os.environ.get("START_AT", "0"))
while time.time() < start_at:  # every worker starts charging at the same instant
    time.sleep(0.001)
result = seams.run_child(worker, parent, 0, call_index=index, meta={})
print(json.dumps({"run": result.run_id, "status": result.status.value, "cost": result.cost_usd,
                  "steps": result.steps}), flush=True)
"""


@pytest.fixture(params=["sqlite", "postgres"])
def shared_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """What a worker process opens with ``open_store``: a SQLite file, or a PostgreSQL DSN (a schema of its own)."""
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_dsn"))
    return str(tmp_path / "shared.db")


@pytest.fixture(params=["sqlite", "postgres"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Makes stores on fresh databases of one kind (a SQLite file, a PostgreSQL schema); closes them after the test."""
    made: list[Any] = []

    def make(name: str, **options: Any) -> Any:
        if request.param == "postgres":
            server = request.getfixturevalue("pg_server")
            store: Any = PostgresStore(server.new_schema(), **options)
        else:
            store = SQLiteStore(tmp_path / f"{name}.db", **options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def new_root(target: str, cap: float) -> str:
    """A run (a graph run, say) whose step 0 hosts the workers' children, capped at ``cap``."""
    store = open_store(target)
    return store.begin_run(  # type: ignore[no-any-return]
        NewRun(spec_hash="h", name="pool", kind="graph", budget=Budget(usd=cap).to_dict())
    )


def spawn(
    tmp_path: Path, target: str, root_id: str, index: int, mode: str = "work", start_at: float = 0.0
) -> subprocess.Popen[str]:
    """A worker process running the child ``index`` of ``root_id`` (``mode="hang"``: it holds and hangs)."""
    script = tmp_path / "worker.py"
    if not script.exists():
        script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "START_AT": str(start_at)}
    return subprocess.Popen(
        [sys.executable, str(script), target, root_id, str(index), mode], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env,
    )


class Watch(threading.Thread):
    """Reads the root's spent + reserved from the database while the workers run: the highest seen."""

    def __init__(self, target: str, root_id: str) -> None:
        super().__init__(daemon=True)
        self.store, self.root_id = open_store(target), root_id
        self.highest, self.samples = 0.0, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            view = self.store.shared_view(self.root_id)
            if view is not None:
                self.highest = max(self.highest, view[0] + view[1])
                self.samples += 1
            time.sleep(0.002)


def test_sixteen_processes_charging_and_reserving_never_cross_one_cap(tmp_path: Path, shared_target: str) -> None:
    """16 worker processes each run a child of one capped run, reserving and charging far past the cap:
    the cap (spent + held) is never crossed at any instant, the workers stop at it, and every cent is
    counted exactly once: the root's total is the sum of its children's, which is the sum of their steps."""
    root_id = new_root(shared_target, CAP)
    watch = Watch(shared_target, root_id)
    watch.start()
    start_at = time.time() + 3.0
    procs = [spawn(tmp_path, shared_target, root_id, i, start_at=start_at) for i in range(16)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        watch.done.set()
        watch.join(10)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=10)
    store = open_store(shared_target)
    root = store.get_run(root_id)
    assert root is not None
    spent, reserved, cap = store.shared_view(root_id)
    assert cap == CAP
    assert reserved == pytest.approx(0.0, abs=1e-9)  # every hold settled
    assert spent <= CAP + 1e-9
    assert watch.samples > 0
    assert watch.highest <= CAP + 1e-9
    # 16 x 400 steps of $0.00213 would be $13.6: the workers ran into the cap and stopped at it
    assert all(o["status"] == RunStatus.BUDGET_EXHAUSTED.value for o in outs), outs
    # The last worker stopped when its reservation (with a charge after it) found no room;
    # holds of the other 15 then settled below what they held, giving back up to 0.0014 each.
    assert spent > CAP - 0.0031 - 0.00043 - 15 * (0.0031 - 0.0017) - 1e-9
    assert sum(o["steps"] > 0 for o in outs) >= 8  # they charged at the same time, not one after another
    children = store.children(root_id)
    assert len(children) == 16
    assert sum(o["cost"] for o in outs) == pytest.approx(spent, abs=1e-9)
    assert sum(c.cost_usd for c in children) == pytest.approx(spent, abs=1e-9)
    for child in children:
        steps = store.load_steps(child.id)
        assert sum(s.cost_usd for s in steps) == pytest.approx(child.cost_usd, abs=1e-9)
    assert root.cost_usd == pytest.approx(spent, abs=1e-12)


def test_a_dead_holders_reservation_is_charged_in_full_when_its_run_is_taken_over(tmp_path: Path, shared_target: str) -> None:
    """A worker killed (SIGKILL) while it holds $0.25 keeps the cap's room taken; the worker that takes its
    child over charges the hold in full (spent, no longer held), and continues within what is left."""
    root_id = new_root(shared_target, CAP)
    hung = spawn(tmp_path, shared_target, root_id, 0, mode="hang")
    assert hung.stdout is not None
    try:
        assert hung.stdout.readline().strip() == "holding"
        store = open_store(shared_target)
        assert store.shared_view(root_id)[1] == pytest.approx(0.25)
    finally:
        os.kill(hung.pid, signal.SIGKILL)
        hung.communicate(timeout=10)
    again = spawn(tmp_path, shared_target, root_id, 0)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["status"] == RunStatus.BUDGET_EXHAUSTED.value
    spent, reserved, _ = store.shared_view(root_id)
    assert reserved == pytest.approx(0.0, abs=1e-9)
    assert spent <= CAP + 1e-9
    (child,) = store.children(root_id)
    assert [c["usd"] for c in child.meta["held_charges"]] == [pytest.approx(0.25)]
    assert child.cost_usd == pytest.approx(spent, abs=1e-9)
    steps = store.load_steps(child.id)
    assert sum(s.cost_usd for s in steps) == pytest.approx(spent - 0.25, abs=1e-9)


def test_shared_budget_store_option_gives_every_run_a_store_ledger(make_store: Callable[..., Any]) -> None:
    """``SQLiteStore(shared_budget=True)`` (and ``PostgresStore``): a loop's charges are held in the database
    against its cap (and its nested loops' against every cap above); the default store keeps the in-process ledger."""
    store = make_store("s", shared_budget=True)
    kinds: list[type] = []

    @loop(budget=Budget(usd=0.1, iterations=5), name="inner")
    def inner(n: int) -> int:
        kinds.append(type(current_ledger()))
        loomc.charge(0.01)
        return n + 1

    @loop(checkpoint=store, budget=Budget(usd=0.25, iterations=20), name="outer")
    def outer(n: int) -> int:
        kinds.append(type(current_ledger()))
        with loomc.reserve(0.02) as hold:
            hold.settle(0.01)
        return int(inner.run(n).state)

    result = outer.run(0)
    assert set(kinds) == {StoreLedger}
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert result.cost_usd <= 0.25 + 1e-9
    assert store.shared_view(result.run_id)[0] == pytest.approx(result.cost_usd)
    assert store.shared_view(result.run_id)[1] == pytest.approx(0.0, abs=1e-9)

    plain: list[type] = []

    @loop(checkpoint=make_store("p"), budget=Budget(iterations=1), name="plain")
    def plain_loop(n: int) -> int:
        plain.append(type(current_ledger()))
        return n + 1

    plain_loop.run(0)
    assert plain == [TreeLedger]


def test_a_charge_past_a_shared_cap_is_refused_in_the_database(make_store: Callable[..., Any]) -> None:
    """The database refuses a hold that would cross the cap of the run or any run above it, naming the run
    whose cap it is; nothing is held then."""
    store = make_store("r")
    root_id = store.begin_run(NewRun(spec_hash="h", name="pool", budget=Budget(usd=0.1).to_dict()))
    parent = seams.open_shared_parent(store, root_id)
    assert isinstance(parent, StoreLedger)
    parent.reserve(0.06)
    with pytest.raises(BudgetExhausted) as info:
        parent.reserve(0.05)
    assert info.value.owner == root_id
    assert store.shared_view(root_id) == (0.0, pytest.approx(0.06), 0.1)


def test_open_shared_parent_refuses_an_unknown_run(make_store: Callable[..., Any]) -> None:
    """An unknown run id is a RunNotFound, not a ledger of nothing."""
    store = make_store("n")
    store.open()
    with pytest.raises(loomc.RunNotFound):
        seams.open_shared_parent(store, "nope")
