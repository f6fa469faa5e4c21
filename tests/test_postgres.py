"""The PostgreSQL store under real loops, nested loops, graphs, the CLI and ``loomc db``, on a real server.

The store conformance suite (``test_store_conformance.py``) runs every store method on
PostgreSQL; these tests run what users run on it: the same loops as on SQLite must leave
the same runs behind, every CLI command reads it through ``--db`` and ``LOOMC_DB``, and
``loomc db copy`` moves runs both ways without loss.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import loomc
from loomc import Budget, LoomcError, PostgresStore, RunStatus, SchemaTooNew, SQLiteStore, StoreError, loop, predicate
from loomc.store.postgres import sql as pg_sql
from loomc.store.protocol import NewRun, Question, StepRow, WaitRow
from loomc.store.transfer import copy_runs, db_info
from orchestration import Graph
from tests.postgres_fixtures import PgServer

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    env.pop("LOOMC_DB", None)
    env.update(extra)
    return env


def loomc_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m loomc ARGS`` in a subprocess (plain output)."""
    return subprocess.run(
        [sys.executable, "-m", "loomc", *args], capture_output=True, text=True, cwd=cwd, env=env or _env(), timeout=60
    )


def nested_pair(checkpoint: Any, tag: str) -> Any:
    """An outer loop whose steps each run an inner loop; large inner states (stored compressed)."""

    @loop(budget=Budget(iterations=3), name=f"inner-{tag}", checkpoint=checkpoint)
    def inner(s: dict[str, Any]) -> dict[str, Any]:
        loomc.charge(0.01)
        return {"m": s["m"] + 1, "doc": ("tide " * 900) + str(s["m"])}

    @loop(budget=Budget(usd=5.0, iterations=6), name=f"outer-{tag}", checkpoint=checkpoint,
          converge_on=predicate(lambda h: h[-1].state["n"] >= 4), scorer=lambda s: s["n"] / 10)
    def outer(s: dict[str, Any]) -> dict[str, Any]:
        loomc.charge(0.1)
        res = inner.run({"m": s["n"]})
        return {"n": s["n"] + 1, "inner": res.state["m"]}

    return outer


def tree_view(store: Any, run_id: str) -> dict[str, Any]:
    """A run tree as stored, without ids and times: what must be equal across stores."""
    info = store.get_run(run_id)
    assert info is not None
    return {
        "info": (info.name.split("-")[0], info.kind, info.status, info.steps, round(info.cost_usd, 9), info.stop_reason,
                 info.budget, info.parent_step, info.call_index, info.max_step_cost),
        "input": store.load_state(run_id, -1),
        "steps": [(s.step_n, s.state, s.cost_usd, s.score, s.error, s.event) for s in store.load_steps(run_id)],
        "kids": [tree_view(store, k.id) for k in store.children(run_id)],
    }


def test_nested_loops_leave_the_same_runs_as_on_sqlite(pg_dsn: str, tmp_path: Path) -> None:
    """The same loops on SQLite and PostgreSQL: equal trees (steps, states, totals, scores, events)."""
    results = {}
    for tag, checkpoint in (("pg", pg_dsn), ("lite", str(tmp_path / "same.db"))):
        outer = nested_pair(checkpoint, tag)
        res = outer.run({"n": 0})
        assert res.status is RunStatus.COMPLETED
        results[tag] = (outer.store(), res.run_id)
    pg_store, pg_run = results["pg"]
    assert isinstance(pg_store, PostgresStore)
    assert tree_view(pg_store, pg_run) == tree_view(*results["lite"])
    assert pg_store.get_run(pg_run).cost_usd == pytest.approx(4 * 0.1 + 4 * 3 * 0.01)


def test_a_stopped_run_resumes_on_postgres(pg_dsn: str) -> None:
    """A run that ran out of budget resumes with more, from its last step, on the same store object."""
    store = PostgresStore(pg_dsn, durability="process")

    @loop(budget=Budget(iterations=3), checkpoint=store, converge_on=predicate(lambda h: h[-1].state["n"] >= 5))
    def count(s: dict[str, int]) -> dict[str, int]:
        loomc.charge(0.25)
        return {"n": s["n"] + 1}

    with pytest.raises(loomc.BudgetExhausted) as caught:
        count({"n": 0})
    rid = caught.value.run_id
    assert count.resume(rid, budget=Budget(iterations=10)) == {"n": 5}
    info = store.get_run(rid)
    assert (info.status, info.steps, info.cost_usd) == (RunStatus.COMPLETED, 5, 1.25)
    assert [s.state["n"] for s in store.load_steps(rid)] == [1, 2, 3, 4, 5]
    store.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_async_nested_loops_on_postgres(pg_dsn: str, anyio_backend: str) -> None:
    """Async loops (psycopg's async pool on asyncio, worker threads on trio) and their nested runs."""

    @loop(budget=Budget(iterations=2), checkpoint=pg_dsn)
    async def leaf(s: dict[str, int]) -> dict[str, int]:
        loomc.charge(0.5)
        return {"k": s["k"] + 1}

    @loop(budget=Budget(iterations=3), checkpoint=pg_dsn)
    async def top(s: dict[str, int]) -> dict[str, int]:
        r = await leaf.run({"k": 0})
        return {"n": s["n"] + r.state["k"]}

    res = await top.run({"n": 0})
    assert (res.status, res.state, res.cost_usd) == (RunStatus.BUDGET_EXHAUSTED, {"n": 6}, 3.0)
    store = top.store()
    kids = await anyio.to_thread.run_sync(store.children, res.run_id)
    assert [(k.steps, k.cost_usd) for k in kids] == [(2, 1.0)] * 3


def test_a_graph_runs_and_resumes_on_postgres(pg_dsn: str) -> None:
    """A graph on PostgreSQL: nodes and their child loops land in one tree; a resume re-runs nothing."""
    calls: list[str] = []

    def research(s: dict[str, Any]) -> dict[str, Any]:
        calls.append("research")
        loomc.charge(0.01)
        return {"notes": s["topic"] * 2}

    @loop(budget=Budget(iterations=3))
    def draft(s: dict[str, Any]) -> dict[str, Any]:
        calls.append("draft")
        loomc.charge(0.02)
        return {**s, "v": s.get("v", 0) + 1}

    g = Graph("pg-graph", checkpoint=pg_dsn, budget=Budget(usd=1.0))
    g.add(research)
    g.add(draft, after=research)
    res = g.run({"topic": "ab"})
    assert res.status is RunStatus.COMPLETED
    assert res.outputs["draft"]["v"] == 3
    store = g.store()
    assert isinstance(store, PostgresStore)
    info = store.get_run(res.run_id)
    assert (info.kind, info.cost_usd) == ("graph", pytest.approx(0.07))
    nodes = store.children(res.run_id)
    assert sorted(n.name.rsplit(".", 1)[-1] for n in nodes) == ["draft", "research"]
    before = len(calls)
    again = g.resume(res.run_id)
    assert again.status is RunStatus.COMPLETED
    assert len(calls) == before


def test_sessions_are_configured_for_durability_and_idle_transactions(pg_dsn: str) -> None:
    """synchronous_commit follows ``durability``; an idle transaction is ended by the server; statements are prepared."""
    for durability, setting in (("power", "on"), ("process", "off")):
        store = PostgresStore(pg_dsn, durability=durability, idle_in_transaction_s=7)
        rid = store.begin_run(NewRun(spec_hash="h"))
        for _ in range(3):
            store.get_run(rid)
        with store.pool.connection() as conn:
            assert conn.execute("SHOW synchronous_commit").fetchone() == (setting,)
            assert conn.execute("SHOW idle_in_transaction_session_timeout").fetchone() == ("7s",)
            prepared = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()
            assert prepared is not None
            assert prepared[0] > 0
        store.close()


def test_a_newer_or_foreign_schema_is_refused_untouched(pg_server: PgServer) -> None:
    """A schema from a newer loomc, or with a ``runs`` table loomc did not make, is refused and not changed."""
    import psycopg

    newer = pg_server.new_schema()
    with PostgresStore(newer) as made:
        made.open()
    with psycopg.connect(newer, autocommit=True) as conn:
        conn.execute("UPDATE loomc_schema SET version = 99")
    with pytest.raises(SchemaTooNew, match="newer loomc"):
        PostgresStore(newer).open()
    with psycopg.connect(newer, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM loomc_schema").fetchone() == (99,)

    foreign = pg_server.new_schema()
    with psycopg.connect(foreign, autocommit=True) as conn:
        conn.execute("CREATE TABLE runs (x int)")
    with pytest.raises(StoreError, match="did not make"):
        PostgresStore(foreign).open()
    with psycopg.connect(foreign, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('loomc_schema')").fetchone() == (None,)

    empty = pg_server.new_schema()
    with pytest.raises(StoreError, match="holds no loomc runs yet"):
        PostgresStore(empty, create=False).open()


def test_migrations_are_the_sqlite_versions(pg_dsn: str) -> None:
    """Same versions and keys as the SQLite schema; a fresh schema is created at the current one."""
    from loomc.store.sqlite import sql as lite_sql

    assert pg_sql.SCHEMA_VERSION == lite_sql.SCHEMA_VERSION
    assert set(pg_sql.MIGRATIONS) == set(lite_sql.MIGRATIONS)
    with PostgresStore(pg_dsn) as store:
        assert store.schema_info().version == lite_sql.SCHEMA_VERSION


def test_a_v4_schema_is_migrated_to_fenced_leases_caps_and_questions(pg_dsn: str) -> None:
    """A schema a v4 loomc wrote: the migration adds the lease, cap and fork columns (caps read from the stored
    budgets, ``Infinity`` too), the questions table and the fence; its runs read, resume and ask as new ones."""
    import psycopg

    with psycopg.connect(pg_dsn, autocommit=True) as conn, conn.transaction():
        conn.execute(pg_sql.CREATE_VERSION)
        conn.execute("INSERT INTO loomc_schema (version) VALUES (4)")
        for version in range(4):
            pg_sql.migrate(conn, version)
        insert = (
            "INSERT INTO runs (id, spec_hash, status, created_at, updated_at, budget, owner, heartbeat) "
            "VALUES (%s, 'h', %s, %s, %s, %s, %s, %s)"
        )
        now = pg_sql.now_iso()
        conn.execute(insert, ("capped", "completed", now, now, json.dumps({"usd": 2.5, "iterations": 3}), None, None))
        conn.execute(insert, ("endless", "running", now, now, json.dumps({"usd": float("inf")}), "far-host:1:1", 100.0))
    with PostgresStore(pg_dsn, shared_budget=True) as store:
        assert store.schema_info().version == pg_sql.SCHEMA_VERSION
        assert store.shared_view("capped") == (0.0, 0.0, 2.5)
        assert store.shared_view("endless") == (0.0, 0.0, None)
        assert store.get_run("endless").status is RunStatus.CRASHED  # its lease ended long ago (heartbeat + 30 s)
        store.acquire("endless", "here:2:2")
        assert store.epoch_of("endless") == 1
        store.wait_for_input("endless", WaitRow(0.0, 0.0, "waiting: ok?", Question("endless", 0, 0, "ok?", None, None, "")))
        assert [q.text for q in store.questions("endless")] == ["ok?"]


def test_bad_dsns_and_unreachable_servers_are_one_line_without_the_password(tmp_path: Path) -> None:
    """A server that is not there and a DSN that does not parse: a StoreError, no password, on the CLI one line."""
    with pytest.raises(StoreError, match="cannot open PostgreSQL") as caught:
        PostgresStore("postgresql://ann:hunter2@127.0.0.1:1/db", connect_timeout=2).open()
    assert "hunter2" not in str(caught.value)
    for dsn in ("postgresql://ann:hunter2@127.0.0.1:1/db", "postgresql://ann:hunter2@[bad/db"):
        out = loomc_cli("runs", "--db", dsn)
        assert out.returncode == 1
        assert out.stderr.startswith("loomc: "), out.stderr
        assert out.stderr.count("\n") == 1, out.stderr
        assert "hunter2" not in out.stderr + out.stdout
        assert "Traceback" not in out.stderr


def test_without_the_extra_the_error_names_it(tmp_path: Path) -> None:
    """Without psycopg, a postgresql:// checkpoint is a LoomcError naming ``pip install 'loomc[postgres]'``."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["psycopg"] = None  # as if the extra were not installed
        import loomc
        from loomc import Budget, loop
        @loop(budget=Budget(iterations=1), checkpoint="postgresql://nobody@127.0.0.1:1/x")
        def f(s):
            return s
        try:
            f({})
        except loomc.LoomcError as exc:
            print(type(exc).__name__, exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert "pip install 'loomc[postgres]'" in out.stdout, out.stderr
    cli = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['psycopg'] = None; from loomc.cli import main; main()",
         "runs", "--db", "postgresql://nobody@127.0.0.1:1/x"],
        capture_output=True, text=True, env=_env(), timeout=60,
    )
    assert cli.returncode == 1
    assert "pip install 'loomc[postgres]'" in cli.stderr
    assert "Traceback" not in cli.stderr


# -- the CLI ----------------------------------------------------------------------------------

SUBJECT = textwrap.dedent(
    """
    import loomc
    from loomc import Budget, loop, predicate

    @loop(budget=Budget(iterations=4))
    def polish(s):
        loomc.charge(0.01)
        return {"p": s["p"] + 1}

    @loop(budget=Budget(usd=1.0, iterations=3), converge_on=predicate(lambda h: h[-1].state["n"] >= 5))
    def refine(s):
        loomc.charge(0.05)
        polish.run({"p": 0})
        return {"n": s["n"] + 1, "text": "x" * 3000}

    def start():
        res = refine.run({"n": 0})
        print(res.run_id)
    """
)

PIPELINE = textwrap.dedent(
    """
    import loomc
    from loomc import Budget, loop
    from orchestration import Graph

    def fetch(s):
        loomc.charge(0.01)
        return {"got": s["q"]}

    @loop(budget=Budget(iterations=2))
    def write(s):
        loomc.charge(0.02)
        return {**s, "w": s.get("w", 0) + 1}

    graph = Graph("pg-pipeline", budget=Budget(usd=1.0))
    graph.add(fetch)
    graph.add(write, after=fetch)
    """
)


def test_every_cli_command_reads_and_writes_postgres(pg_dsn: str, tmp_path: Path) -> None:
    """runs, show (--tree, --json), watch, export, resume (and --run), graph run/show, db info: via --db and LOOMC_DB."""
    (tmp_path / "pgsubject.py").write_text(SUBJECT)
    (tmp_path / "pipeline.py").write_text(PIPELINE)
    with_env = _env(LOOMC_DB=pg_dsn)
    made = subprocess.run(
        [sys.executable, "-c", "import pgsubject; pgsubject.start()"], capture_output=True, text=True,
        cwd=tmp_path, env=with_env, timeout=60,
    )
    assert made.returncode == 0, made.stderr
    rid = made.stdout.strip()

    def ok(*args: str, env: dict[str, str] | None = None) -> str:
        out = loomc_cli(*args, cwd=tmp_path, env=env)
        assert out.returncode == 0, (args, out.stderr)
        return out.stdout

    for args, env in ((("--db", pg_dsn), None), ((), with_env)):
        listed = ok("runs", *args, env=env)
        assert rid in listed
        assert "budget_exhausted" in listed
        assert ok("show", rid, "--tree", *args, env=env).count("pgsubject:polish") == 3
        exported = json.loads(ok("export", rid, *args, env=env))
        assert exported["run"]["history"][-1]["state"]["n"] == 3
        assert len(exported["run"]["children"]) == 3
    db = ("--db", pg_dsn)
    assert ok("runs", "--all", *db).count("pgsubject:polish") == 3
    shown = ok("show", rid[:6], *db)
    assert "pgsubject:refine" in shown
    assert "$0.0900" in shown
    assert len(json.loads(ok("show", rid, "--json", *db))["history"]) == 3
    assert "loomc resume" in ok("resume", rid, *db)
    assert "pgsubject:refine" in ok("watch", rid, "--interval", "0.05", *db)
    info = ok("db", "info", *db)
    assert "postgresql" in info
    assert f"v{pg_sql.SCHEMA_VERSION}" in info
    ok("resume", rid, "--run", "--iterations", "10", "--db", pg_dsn)
    store = PostgresStore(pg_dsn)
    done = store.get_run(rid)
    assert (done.status, done.steps) == (RunStatus.COMPLETED, 5)
    assert [s.state["n"] for s in store.load_steps(rid)] == [1, 2, 3, 4, 5]

    ok("graph", "show", "pipeline.py")
    ok("graph", "run", "pipeline.py", "--input", '{"q": 1}', "--db", pg_dsn)
    ok("graph", "run", "pipeline.py", "--input", '{"q": 2}', env=with_env)
    graphs = [r for r in store.list_runs(roots_only=True) if r.kind == "graph"]
    assert [(g.status, g.cost_usd) for g in graphs] == [(RunStatus.COMPLETED, pytest.approx(0.05))] * 2
    resumed = loomc_cli("graph", "run", "pipeline.py", "--resume", graphs[0].id, "--db", pg_dsn, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    missing = loomc_cli("show", "nosuchrun", "--db", pg_dsn)
    assert missing.returncode == 1
    assert missing.stderr.startswith("loomc: ")
    assert "Traceback" not in missing.stderr
    store.close()


# -- loomc db copy ---------------------------------------------------------------------------------


def raw_dump(store: Any) -> dict[str, Any]:
    """Every row of every run, step (state as stored) and hold, the blob ids left out."""
    from loomc.store import transfer

    d = transfer._dialect(store)
    runs = store.run_read(lambda: transfer._dump_runs(d))
    steps, questions = store.run_read(lambda: transfer._dump_tree(d, [r[0] for r in runs]))
    holds = store.run_read(lambda: transfer._dump_holds(d))
    as_bytes = [tuple(bytes(v) if isinstance(v, (bytes, memoryview)) else v for v in r) for r in runs]
    return {
        "runs": {r[0]: r[:19] + r[21:] for r in as_bytes},  # leases (owner, heartbeat) are not copied
        "leases": {r[0]: (r[2], r[19]) for r in as_bytes},
        "steps": {k: [tuple(bytes(v) if isinstance(v, memoryview) else v for v in s) for s in v] for k, v in steps.items()},
        "holds": [tuple(h) for h in holds],
        "questions": {k: [tuple(q) for q in v] for k, v in questions.items() if v},
    }


def fill(store: Any, tag: str) -> list[str]:
    """Runs of every kind in ``store``: nested, a crashed one holding a reservation, large states as deltas."""
    outer = nested_pair(store, tag)
    ids = [outer.run({"n": 0}).run_id]

    @loop(budget=Budget(iterations=6), checkpoint=store)
    def grow(s: dict[str, Any]) -> dict[str, Any]:
        return {"doc": s["doc"] + f" line {len(s['doc'])}"}

    rng = random.Random(7)
    doc = " ".join(rng.choice(["plan", "draft", "check", "fix", "score", "tool"]) for _ in range(3000))
    ids.append(grow.run({"doc": doc}).run_id)
    crashed = store.begin_run(NewRun(spec_hash="c", name="crashed", owner=f"{loomc.store.lease.owner_token().split(':')[0]}:1:0"))
    store.put_hold(crashed, 4242, 0.75)
    ids.append(crashed)
    waiting = store.begin_run(NewRun(spec_hash="w", name="waiting"))
    store.wait_for_input(waiting, WaitRow(0.0, 0.5, "waiting: ok?", Question(waiting, 0, 0, "ok?", None, None, "")))
    ids.append(waiting)
    return ids


@pytest.mark.parametrize("direction", ["sqlite-to-postgres", "postgres-to-sqlite"])
def test_db_copy_moves_every_run_step_state_and_hold(pg_dsn: str, tmp_path: Path, direction: str) -> None:
    """Whole trees, states byte for byte (keyframes, deltas), holds; leases cleared; an existing id refused."""
    lite = SQLiteStore(tmp_path / "src.db")
    pg = PostgresStore(pg_dsn)
    src, dst = (lite, pg) if direction == "sqlite-to-postgres" else (pg, lite)
    ids = fill(src, "copy")
    seen: list[tuple[int, int]] = []
    report = copy_runs(src, dst, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (4, 4)
    before, after = raw_dump(src), raw_dump(dst)
    assert after["runs"] == before["runs"]
    assert after["steps"] == before["steps"]
    assert after["holds"] == before["holds"] == [(4242, ids[2], 0.75, before["holds"][0][3], 0)]
    assert after["questions"] == before["questions"]
    assert [q[3] for q in after["questions"][ids[3]]] == ["ok?"]  # a waiting run's question travels with it
    assert report.runs == len(before["runs"])
    assert report.steps == sum(len(s) for s in before["steps"].values())
    kinds = {s[1][:1] for steps in after["steps"].values() for s in steps if isinstance(s[1], bytes)}
    assert {b"Z", b"D"} <= kinds  # compressed keyframes and deltas travelled as stored
    for rid in before["runs"]:
        if rid != ids[2]:  # (the crashed run reads as crashed in both, under another owner)
            assert dst.get_run(rid) == dataclasses.replace(src.get_run(rid), owner=None)
        assert dst.load_steps(rid) == src.load_steps(rid)
        assert dst.stored_input(rid) == src.stored_input(rid)
    assert {rid: lease for rid, lease in after["leases"].items() if lease[1] is not None} == {ids[2]: ("running", "loomc-db-copy")}
    assert dst.get_run(ids[2]).status is RunStatus.CRASHED  # it names no live owner in the copy
    assert dst.charge_holds(ids[2]).usd == 0.75  # its reservation is charged when it is taken over
    with pytest.raises(LoomcError, match=f"already has {len(before['runs'])} of the run ids"):
        copy_runs(src, dst)
    again = copy_runs(src, dst, skip_existing=True)
    assert (again.runs, len(again.skipped)) == (0, 4)
    lite.close()
    pg.close()


def test_db_copy_and_info_on_the_cli(pg_dsn: str, tmp_path: Path) -> None:
    """``loomc db copy`` SQLite → PostgreSQL → SQLite ends with the same runs; ``db info`` counts them."""
    first = tmp_path / "first.db"
    ids = fill(SQLiteStore(first), "cli")
    runs = len(SQLiteStore(first).list_runs())
    out = loomc_cli("db", "copy", str(first), pg_dsn)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"copied {runs} runs")
    back = tmp_path / "back.db"
    assert loomc_cli("db", "copy", pg_dsn, str(back)).returncode == 0
    assert raw_dump(SQLiteStore(back))["steps"] == raw_dump(SQLiteStore(first))["steps"]
    info = json.loads(loomc_cli("db", "info", "--db", str(back), "--json").stdout)
    assert (info["kind"], info["schema_version"], info["runs"]) == ("sqlite", pg_sql.SCHEMA_VERSION, runs)
    with PostgresStore(pg_dsn) as pg:
        assert db_info(pg).steps == info["steps"] > 0
    refused = loomc_cli("db", "copy", str(first), pg_dsn)
    assert refused.returncode == 1
    assert "--skip-existing" in refused.stderr
    assert ids[0] in refused.stderr
    same = loomc_cli("db", "copy", str(first), str(first))
    assert same.returncode == 1
    assert "same database" in same.stderr


# -- the server restarted under a running loop -----------------------------------------------------


def test_the_server_restarted_under_a_running_loop_loses_and_repeats_no_step(pg_server: PgServer) -> None:
    """Stop and start the server while a loop commits steps: it reconnects (or stops with a StoreError and resumes);
    no committed step is lost, none is written twice."""
    dsn = pg_server.new_schema()
    target = 40
    store = PostgresStore(dsn)
    started = threading.Event()

    @loop(budget=Budget(iterations=200), checkpoint=store, converge_on=predicate(lambda h: h[-1].state["n"] >= target))
    def tick(s: dict[str, int]) -> dict[str, int]:
        if s["n"] == 5:
            started.set()
        import time

        time.sleep(0.03)
        loomc.charge(0.01)
        return {"n": s["n"] + 1}

    outcome: list[Any] = []

    def drive() -> None:
        try:
            outcome.append(tick.run({"n": 0}, run_id="restart-run"))
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=drive)
    worker.start()
    assert started.wait(30)
    pg_server.restart()
    worker.join(120)
    first = outcome[0]
    if not isinstance(first, loomc.RunResult) or first.status is not RunStatus.COMPLETED:
        # the loop stopped on the lost server: that is said clearly, and the run resumes
        err = first if isinstance(first, BaseException) else first.error
        assert isinstance(err, StoreError), repr(err)
        assert "PostgreSQL" in str(err)
        first = tick.resume_run("restart-run")
        print("server restart: the loop stopped with a StoreError and resumed")
    else:
        print("server restart: the loop reconnected and went on")
    assert first.status is RunStatus.COMPLETED
    steps = store.load_steps("restart-run")
    assert [s.step_n for s in steps] == list(range(target))
    assert [s.state["n"] for s in steps] == list(range(1, target + 1))
    info = store.get_run("restart-run")
    assert (info.steps, info.cost_usd) == (target, pytest.approx(0.01 * target))
    store.close()


def test_a_forked_child_opens_its_own_connections(pg_dsn: str) -> None:
    """A process forked from one using a store gets fresh connections; the parent's keep working."""
    import multiprocessing

    from loomc.store.open import open_store

    store = open_store(pg_dsn)
    rid = store.begin_run(NewRun(spec_hash="h"))
    assert store.get_run(rid).steps == 0

    def child() -> None:
        mine = open_store(pg_dsn)  # the parent's cached store object, inherited by the fork
        mine.add_cost(rid, 0.5)
        mine.set_meta(rid, {"from": "child"})

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    info = store.get_run(rid)  # the parent's pooled connection was not disturbed
    assert (info.cost_usd, info.meta) == (0.5, {"from": "child"})


def test_the_shared_postgres_example_runs(pg_dsn: str) -> None:
    """examples/shared_postgres.py: three worker processes, one database, every run there."""
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "shared_postgres.py"), "--dsn", pg_dsn],
        capture_output=True, text=True, env=_env(LOOMC_EXAMPLE_DELAY="0"), timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("completed after 5 steps") == 6
    assert "6 runs in postgresql://" in out.stdout
    assert "30 steps" in out.stdout


def test_example_shared_budget_workers_on_postgres(pg_dsn: str) -> None:
    """examples/shared_budget_workers.py --db postgresql://...: three worker processes stop together at one cap."""
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "shared_budget_workers.py"), "--workers", "3", "--cap", "0.20",
         "--db", pg_dsn], capture_output=True, text=True, env=_env(), timeout=120,
    )
    assert out.returncode == 0, out.stderr
    match = re.search(r"run (\w+): 3 workers spent \$([0-9.]+) of \$0\.20", out.stdout)
    assert match, out.stdout
    with PostgresStore(pg_dsn) as store:
        spent, reserved, cap = store.shared_view(match.group(1))
        assert (cap, reserved) == (0.20, pytest.approx(0.0, abs=1e-9))
        assert spent == pytest.approx(float(match.group(2)), abs=1e-6)
        assert spent <= 0.20 + 1e-9
        children = store.children(match.group(1))
        assert [c.status for c in children] == [RunStatus.BUDGET_EXHAUSTED] * 3
        assert sum(c.cost_usd for c in children) == pytest.approx(spent, abs=1e-9)


def test_a_write_commits_whole_or_not_at_all(pg_dsn: str) -> None:
    """A pipelined write whose later statement fails, or whose operation raises, leaves nothing behind."""
    from loomc.store.core import EXEC, QUERY, Op

    def failing_late(beat: float) -> Op:
        yield EXEC, pg_sql.LOAD_HOLD, (1, "r", 0.5, "t", 0)
        yield EXEC, pg_sql.LOAD_HOLD, (1, "r", 0.5, "t", 0)  # the same key: the server refuses it

    def raising(beat: float) -> Op:
        yield EXEC, pg_sql.LOAD_HOLD, (2, "r", 0.5, "t", 0)
        raise LoomcError("changed my mind")

    def reading(beat: float) -> Op:
        yield EXEC, pg_sql.LOAD_HOLD, (3, "r", 0.5, "t", 0)
        rows = yield QUERY, "SELECT count(*) FROM holds", ()
        assert rows == [(1,)]  # its own insert, seen inside its transaction
        raise LoomcError("after a read")

    with PostgresStore(pg_dsn) as store:
        with pytest.raises(StoreError, match="refused a write"):
            store.run_write(failing_late)
        with pytest.raises(LoomcError, match="changed my mind"):
            store.run_write(raising)
        with pytest.raises(LoomcError, match="after a read"):
            store.run_write(reading)
        assert store.run_read(lambda: (yield QUERY, "SELECT count(*) FROM holds", ())) == [(0,)]
        store.begin_run(NewRun(spec_hash="h", run_id="r"))
        store.put_hold("r", 4, 0.25)  # and the connections are fine afterwards
        assert store.charge_holds("r").usd == 0.25


def test_import_loomc_leaves_psycopg_alone() -> None:
    """``import loomc`` (and a SQLite loop) imports no psycopg; making a ``PostgresStore`` does."""
    code = textwrap.dedent(
        """
        import sys, tempfile, os
        import loomc
        from loomc import Budget, loop
        @loop(budget=Budget(iterations=1), checkpoint=os.path.join(tempfile.mkdtemp(), "x.db"))
        def f(s):
            return s
        f.run({})
        before = sorted(m for m in ("psycopg", "psycopg_pool") if m in sys.modules)
        loomc.PostgresStore("postgresql://nobody@127.0.0.1:1/x")  # connects at first use, not here
        print(before, "psycopg" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert out.stdout.split() == ["[]", "True"], out.stderr


def test_text_with_nul_characters_is_stored_made_visible(pg_dsn: str) -> None:
    """PostgreSQL text cannot hold NUL (SQLite's can): names, errors and stop reasons keep it as ``\\x00``."""

    @loop(budget=Budget(iterations=3), checkpoint=pg_dsn, name="nul\x00name")
    def boom(s: dict[str, int]) -> dict[str, int]:
        if s["n"] == 1:
            raise RuntimeError("bad\x00byte")
        return {"n": s["n"] + 1}

    res = boom.run({"n": 0})
    assert res.status is RunStatus.FAILED
    store = boom.store()
    info = store.get_run(res.run_id)
    assert info.name == "nul\\x00name"
    assert info.stop_reason is not None
    assert "bad\\x00byte" in info.stop_reason
    rid = store.begin_run(NewRun(spec_hash="h", name="a\x00b"))
    store.commit_step(rid, StepRow(0, '{"n":1}', 0.1, None, "2026-01-01T00:00:00+00:00", "err\x00or", None, 0, 0.0, 0.1, 1,
                                   0.0, 0.1, "running", None))
    assert store.step_window(rid)[0].error == "err\\x00or"
    with pytest.raises(loomc.RunNotFound):
        store.resolve("\x00")  # a read with NUL in its parameters is answered too


def test_starting_one_run_id_at_once_is_refused_as_on_sqlite(pg_dsn: str) -> None:
    """Eight stores (eight connections) begin one run id at once: one wins, the others get RunLocked, never a StoreError."""
    from loomc.store.lease import owner_token

    stores = [PostgresStore(pg_dsn) for _ in range(8)]
    for store in stores:
        store.open()
    barrier = threading.Barrier(len(stores))
    outcomes: list[Any] = []

    def start(store: PostgresStore) -> None:
        barrier.wait()
        try:
            outcomes.append(store.begin_run(NewRun(spec_hash="h", run_id="contested", owner=owner_token())))
        except LoomcError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=start, args=(store,)) for store in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert outcomes.count("contested") == 1
    assert [type(o).__name__ for o in outcomes if o != "contested"] == ["RunLocked"] * 7
    for store in stores:
        store.close()


def test_lease_renewals_hold_one_run_row_at_a_time(pg_dsn: str) -> None:
    """A renewal never holds one run's row while it waits for another's: with a commit that
    locks a parent's row and then its child's (a step's roll-up), renewing both leases closes
    no cycle, and the server detects no deadlock."""
    import psycopg

    from loomc.store.lease import owner_token
    from loomc.store.protocol import NewRun

    store = PostgresStore(pg_dsn)
    me = owner_token()
    parent = store.begin_run(NewRun(spec_hash="s", name="parent", owner=me))
    child = store.begin_run(NewRun(spec_hash="s", name="child", owner=me, parent_run_id=parent, parent_step=0,
                                   call_index=0))

    def deadlocks() -> int:
        with psycopg.connect(pg_dsn) as c:
            row = c.execute("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()").fetchone()
            return int(row[0]) if row else 0

    before = deadlocks()
    lost: list[list[str]] = []
    with psycopg.connect(pg_dsn) as other:  # another child's commit: the parent's row first, then (below) its own
        other.execute("UPDATE runs SET updated_at = updated_at WHERE id = %s", (parent,))
        renewal = threading.Thread(target=lambda: lost.append(store.renew_leases(me, [child, parent])))
        renewal.start()
        time.sleep(0.5)  # the renewal is under way: it has renewed the child's lease, and waits for the parent's row
        other.execute("UPDATE runs SET updated_at = updated_at WHERE id = %s", (child,))
        other.commit()
        renewal.join(30)
    assert lost == [[]]  # both leases renewed
    deadline = time.monotonic() + 3  # statistics reach other sessions within a second or so
    while time.monotonic() < deadline and deadlocks() == before:
        time.sleep(0.2)
    assert deadlocks() == before
    store.close()
