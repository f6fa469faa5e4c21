"""The budget ledger is a seam: a store that makes its own ledgers changes how money is capped, the engine unchanged."""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import loomc
from loomc import Budget, BudgetExhausted, MemoryStore, RunStatus, SQLiteStore, loop
from loomc._core import seams
from loomc._core.context import current_ledger
from loomc._core.ledger import LedgerStore, Reservation, RunLedger, TreeLedger
from loomc._core.policy import Headroom
from orchestration import Graph

ROOT = Path(__file__).resolve().parent.parent


# -- a ledger whose cap is shared by processes (a row in a SQLite file) --------------------
def make_pool(path: Path, cap: float) -> None:
    """A pool of ``cap`` USD that every ledger opened on ``path`` draws from."""
    with contextlib.closing(sqlite3.connect(path)) as con, con:
        con.execute("CREATE TABLE pool (cap REAL NOT NULL, spent REAL NOT NULL)")
        con.execute("INSERT INTO pool VALUES (?, 0.0)", (cap,))


def pool_spent(path: Path) -> float:
    """What the runs drew from the pool."""
    with contextlib.closing(sqlite3.connect(path)) as con:
        return float(con.execute("SELECT spent FROM pool").fetchone()[0])


class PooledLedger(TreeLedger):
    """The in-process tree, plus a cap shared by every process: a conditional UPDATE draws each amount once."""

    def __init__(self, pool: str, run_id: str, **kwargs: Any) -> None:
        super().__init__(run_id, **kwargs)
        self.pool = pool

    def _draw(self, usd: float, *, enforce: bool) -> None:
        with contextlib.closing(sqlite3.connect(self.pool, timeout=30, isolation_level=None)) as con:
            cur = con.execute(
                "UPDATE pool SET spent = spent + ? WHERE ? = 0 OR spent + ? <= cap + 1e-9", (usd, int(enforce), usd)
            )
            if cur.rowcount == 0:
                spent, cap = con.execute("SELECT spent, cap FROM pool").fetchone()
                raise BudgetExhausted("usd", spent, cap, run_id=self.run_id, owner=self.run_id, requested=usd)

    def charge(self, usd: float, *, enforce: bool = True) -> None:
        """Draw ``usd`` from the shared pool, then record it on the run tree (refund the pool if that refuses)."""
        if usd:
            self._draw(usd, enforce=enforce)
        try:
            super().charge(usd, enforce=enforce)
        except BaseException:
            if usd:
                self._draw(-usd, enforce=False)
            raise

    def reserve(self, usd: float) -> Reservation:
        """Hold ``usd`` in the pool too."""
        self._draw(usd, enforce=True)
        return super().reserve(usd)

    def settle(self, hold: Reservation, actual: float) -> None:
        """Replace the pool's hold by the real cost."""
        if hold.settled is None:
            self._draw(actual - hold.usd, enforce=False)
        super().settle(hold, actual)


class PooledStore(SQLiteStore):
    """A SQLite store whose runs draw from one pool shared by processes (a :class:`LedgerStore`)."""

    def __init__(self, pool: str, path: str) -> None:
        super().__init__(path)
        self.pool = pool

    def open_ledger(
        self, run_id: str, *, parent: RunLedger | None, usd_cap: float | None, spent: float, prepaid: float,
        deadline: float | None, context: Any,
    ) -> RunLedger:
        """A :class:`PooledLedger` for every run of this store."""
        return PooledLedger(
            self.pool, run_id, parent=parent, usd_cap=usd_cap, spent=spent, prepaid=prepaid, deadline=deadline,
            context=context,
        )


def spend_in_process(pool: str, db: str) -> None:
    """One process's share: a loop charging $0.07 a step for 40 steps (far past the pool) on the pooled store."""

    @loop(budget=Budget(iterations=40), checkpoint=PooledStore(pool, db), name="spender")
    def spender(n: int) -> int:
        loomc.charge(0.07)
        return n + 1

    result = spender.run(0)
    print(json.dumps({"status": result.status.value, "cost": result.cost_usd}))


def test_a_store_made_ledger_caps_runs_in_several_processes(tmp_path: Path) -> None:
    """Four processes run loops on a store whose ledgers share one cap: together they stop at it, never past it."""
    pool, db = tmp_path / "pool.db", tmp_path / "runs.db"
    make_pool(pool, 1.00)
    assert isinstance(PooledStore(str(pool), str(db)), LedgerStore)
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import test_ledger_seam as t; "
        f"t.spend_in_process({str(pool)!r}, {str(db)!r})"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert all(o["status"] == RunStatus.BUDGET_EXHAUSTED.value for o in outs), outs
    spent = pool_spent(pool)
    assert spent <= 1.00 + 1e-9
    assert spent > 1.00 - 0.07 - 1e-9  # the runs used the pool up (4 x 40 x $0.07 would be $11.20)
    assert abs(sum(o["cost"] for o in outs) - spent) < 1e-9  # each run's ledger recorded what it drew
    assert abs(sum(r.cost_usd for r in SQLiteStore(str(db)).list_runs()) - spent) < 1e-9


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_store_made_ledger_caps_a_graph_of_sync_async_and_nested_loops(tmp_path: Path, backend: str) -> None:
    """A graph (a sync node, an async node, a node whose step runs a nested loop) draws from the store's ledger."""
    pool, db = tmp_path / "pool.db", str(tmp_path / "runs.db")
    make_pool(pool, 0.50)

    @loop(budget=Budget(iterations=30), name="sync_node")
    def sync_node(n: int) -> int:
        loomc.charge(0.03)
        return n + 1

    @loop(budget=Budget(iterations=30), name="async_node")
    async def async_node(n: int) -> int:
        await anyio.sleep(0)
        loomc.charge(0.03)
        return n + 1

    @loop(budget=Budget(iterations=2), name="inner")
    def inner(n: int) -> int:
        loomc.charge(0.01)
        return n + 1

    @loop(budget=Budget(iterations=30), name="outer")
    def outer(n: int) -> int:
        return int(inner(n))

    graph = Graph("pooled", checkpoint=PooledStore(str(pool), db))
    graph.add(sync_node)
    graph.add(async_node)
    graph.add(outer)
    result = anyio.run(functools.partial(graph.arun, 0), backend=backend)
    spent = pool_spent(pool)
    assert spent <= 0.50 + 1e-9
    assert spent > 0.50 - 0.03 - 1e-9  # 30 steps of each node would be $2.40: the pool stopped them
    assert abs(result.cost_usd - spent) < 1e-9
    assert {n.status for n in result.nodes.values()} <= {RunStatus.BUDGET_EXHAUSTED, RunStatus.FAILED}


# -- a ledger written from the protocol alone -------------------------------------------------
class FlatLedger:
    """A top-level run's ledger written from :class:`RunLedger` alone: one cap, no tree, no lock."""

    def __init__(
        self, run_id: str, *, parent: RunLedger | None, usd_cap: float | None, spent: float, prepaid: float,
        deadline: float | None, context: Any,
    ) -> None:
        if parent is not None:
            raise TypeError("FlatLedger is for top-level runs")
        self.run_id, self.context, self.usd_cap = run_id, context, usd_cap
        self.spent, self.prepaid, self.deadline = spent, prepaid, deadline
        self.reserved = 0.0
        self.open: set[Reservation] = set()
        self.durable: set[int] = set()

    def chain(self) -> Any:
        """Only this run."""
        yield self

    def lineage(self) -> tuple[str, ...]:
        """Only this run."""
        return (self.run_id,)

    def deadline_in_chain(self) -> float | None:
        """This run's deadline."""
        return self.deadline

    def _left(self) -> float | None:
        return None if self.usd_cap is None else self.usd_cap - self.spent - self.reserved

    def headroom(self, now: float, *, include_self: bool = False) -> Headroom:
        """No enclosing runs; this run's own limits if asked."""
        if not include_self:
            return Headroom()
        wall = None if self.deadline is None else self.deadline - now
        return Headroom(self._left(), self.run_id, self.usd_cap, wall, self.run_id)

    def available(self) -> float | None:
        """What is left under the cap."""
        return self._left()

    def _check(self, usd: float) -> None:
        left = self._left()
        if left is not None and usd > left + 1e-9:
            raise BudgetExhausted("usd", self.spent, self.usd_cap or 0.0, run_id=self.run_id, owner=self.run_id,
                                  requested=usd)

    def charge(self, usd: float, *, enforce: bool = True) -> None:
        """Record ``usd``, refusing what would cross the cap."""
        if enforce and usd > 0:
            self._check(usd)
        self.spent += usd

    def carry(self, usd: float) -> None:
        """Earlier spending: from ``prepaid`` first."""
        take = min(self.prepaid, usd)
        self.prepaid -= take
        self.spent += usd - take

    def reserve(self, usd: float) -> Reservation:
        """Hold ``usd`` under the cap."""
        self._check(usd)
        self.reserved += usd
        hold = Reservation(self, usd)
        self.open.add(hold)
        return hold

    def settle(self, hold: Reservation, actual: float) -> None:
        """The hold becomes what the call cost."""
        if hold.settled is None:
            hold.settled = actual
            self.open.discard(hold)
            self.reserved -= hold.usd
            self.spent += actual

    def settle_open(self) -> float:
        """Open holds count in full."""
        holds = list(self.open)
        for hold in holds:
            self.settle(hold, hold.usd)
        return sum(h.usd for h in holds)

    def hold_step(self, usd: float) -> BudgetExhausted | None:
        """No enclosing runs to hold against."""
        return None

    def release_step(self) -> None:
        """Nothing held."""

    def expire(self) -> None:
        """The wall clock ends now."""
        self.deadline = float("-inf")

    def note_durable(self, hold_id: int) -> None:
        """A stored hold the next commit deletes."""
        self.durable.add(hold_id)

    def take_durable(self) -> tuple[int, ...] | None:
        """The stored holds the commit deletes."""
        ids, self.durable = tuple(self.durable), set()
        return ids or None

    def forget_durable(self, ids: tuple[int, ...]) -> None:
        """No ancestors to tell."""


class FlatStore(MemoryStore):
    """A memory store whose runs get a :class:`FlatLedger`."""

    def open_ledger(
        self, run_id: str, *, parent: RunLedger | None, usd_cap: float | None, spent: float, prepaid: float,
        deadline: float | None, context: Any,
    ) -> RunLedger:
        """A :class:`FlatLedger`."""
        return FlatLedger(run_id, parent=parent, usd_cap=usd_cap, spent=spent, prepaid=prepaid, deadline=deadline,
                          context=context)


def test_a_ledger_written_from_the_protocol_alone_runs_a_sync_loop() -> None:
    """Charges, reservations (stored and settled) and the cap all go through the store's own ledger."""
    kinds: list[type] = []

    @loop(budget=Budget(usd=0.5, iterations=20), checkpoint=FlatStore())
    def step(n: int) -> int:
        kinds.append(type(current_ledger()))
        with loomc.reserve(0.1) as hold:
            hold.settle(0.08)
        loomc.charge(0.02)
        return n + 1

    result = step.run(0)
    assert kinds == [FlatLedger] * 5
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert result.steps == 5
    assert abs(result.cost_usd - 0.5) < 1e-9


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_ledger_written_from_the_protocol_alone_runs_an_async_loop(backend: str) -> None:
    """The async driver uses the store's ledger the same way (areserve written to the store, then settled)."""
    remaining: list[float | None] = []

    @loop(budget=Budget(usd=0.3, iterations=20), checkpoint=FlatStore())
    async def step(n: int) -> int:
        assert isinstance(current_ledger(), FlatLedger)
        hold = await loomc.areserve(0.1)
        assert hold.hold_id is not None  # committed to the store before the call
        hold.settle(0.1)
        view = loomc.current_run()
        assert view is not None
        remaining.append(view.usd_remaining)
        return n + 1

    result = anyio.run(step.run, 0, backend=backend)
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert result.steps == 3
    assert [round(r or 0.0, 9) for r in remaining] == [0.2, 0.1, 0.0]


def test_open_host_ledger_goes_through_the_store_ledger_factory(tmp_path: Path) -> None:
    """The graph layer's host ledger is made by the same factory as every run's: the store's kind here."""
    pool = tmp_path / "pool.db"
    make_pool(pool, 1.0)
    store = PooledStore(str(pool), str(tmp_path / "runs.db"))
    ledger = seams.open_host_ledger("g", "g", store, Budget(usd=0.5), spent=0.0, prepaid=0.0, deadline=None)
    assert isinstance(ledger, PooledLedger)
    plain = seams.open_host_ledger("h", "h", SQLiteStore(str(tmp_path / "b.db")), Budget(), spent=0.0, prepaid=0.0,
                                   deadline=None)
    assert type(plain) is TreeLedger


# -- the graph layer uses loomc through named seams ------------------------------------------
def test_the_graph_layer_imports_only_names_meant_for_it() -> None:
    """``orchestration/_graph.py`` imports loomc's public names and ``loomc._core.seams``'s, nothing private, no locks."""
    allowed = {"loomc": set(loomc.__all__), "loomc._core.seams": set(seams.__all__)}
    tree = ast.parse((ROOT / "orchestration" / "_graph.py").read_text())
    seen = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("loomc") for a in node.names), ast.unparse(node)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("loomc"):
            assert node.module in allowed, f"orchestration imports from {node.module}: {ast.unparse(node)}"
            for alias in node.names:
                assert alias.name in allowed[node.module], f"{alias.name} is not in {node.module}.__all__"
                assert not alias.name.startswith("_"), alias.name
                assert "lock" not in alias.name.lower(), alias.name
                seen.append(alias.name)
        elif isinstance(node, ast.Attribute) and node.attr in {"_run_child", "_child_protocol", "_seen_types"}:
            raise AssertionError(f"orchestration reaches into loomc's private {node.attr}")
    assert "open_host_ledger" in seen


def test_seams_lists_only_what_it_defines_or_means_to_pass_on() -> None:
    """Every name ``loomc._core.seams`` exports exists and is public."""
    for name in seams.__all__:
        assert not name.startswith("_")
        assert getattr(seams, name) is not None
