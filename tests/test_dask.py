"""Graphs on real Dask clusters: a ``LocalCluster`` of worker processes, and a ``dask scheduler`` with
``dask worker`` processes started apart, all on 127.0.0.1, against the test PostgreSQL server.

The failures are real: a worker SIGKILLed in the middle of a node, the driver SIGKILLed,
a worker SIGSTOPped past its lease and continued, a graph budget spent by items on both
workers at once.
"""

from __future__ import annotations

import importlib.util
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

from loomc import RunStatus
from loomc._core.errors import LoomcError
from orchestration import DaskExecutor, Graph, GraphResult
from tests import dask_subjects as subjects

pytestmark = pytest.mark.dask

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(EXAMPLES)])
    env.update(extra)
    return env


# -- stores every worker reaches ----------------------------------------------------------
@pytest.fixture
def shared_store(pg_dsn: str) -> Iterator[Callable[..., Any]]:
    """``make(lease_ttl=None)``: a PostgreSQL store on this test's schema (closed after the test)."""
    from loomc.store.postgres.sync import PostgresStore

    opened: list[Any] = []

    def make(lease_ttl: float | None = None) -> Any:
        store = PostgresStore(pg_dsn, lease_ttl=lease_ttl, shared_budget=True)
        opened.append(store)
        return store

    make.dsn = pg_dsn  # type: ignore[attr-defined]
    yield make
    for store in opened:
        store.close()


# -- clusters ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local() -> Iterator[DaskExecutor]:
    """A LocalCluster of two worker processes (two threads each) bound to 127.0.0.1."""
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "LOOMC_EXAMPLE_DELAY")}
    os.environ.update(_env(LOOMC_EXAMPLE_DELAY="0"))
    added = str(EXAMPLES) not in sys.path
    if added:  # worker processes start with this process's sys.path: the examples import there
        sys.path.append(str(EXAMPLES))
    executor = DaskExecutor(n_workers=2, threads_per_worker=2)
    try:
        executor.open()
        yield executor
    finally:
        executor.close()
        if added:
            sys.path.remove(str(EXAMPLES))
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class External:
    """A ``dask scheduler`` and ``dask worker`` processes (no nanny: a killed worker stays dead)."""

    def __init__(self, tmp: Path) -> None:
        self.file = tmp / "scheduler.json"
        # a worker that stops answering is given up after 3 s (the test SIGSTOPs one)
        self.env = _env(DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL="3s")
        self.scheduler = subprocess.Popen(
            ["dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--dashboard-address", "127.0.0.1:0",
             "--scheduler-file", str(self.file)],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.workers: list[subprocess.Popen[bytes]] = []
        deadline = time.monotonic() + 30
        while not self.file.exists() or not self.file.read_text().strip():
            assert time.monotonic() < deadline, "the dask scheduler did not start"
            time.sleep(0.1)
        self.address = json.loads(self.file.read_text())["address"]
        assert self.address.startswith("tcp://127.0.0.1:")
        self.executor = DaskExecutor(self.address)

    def start_workers(self, n: int) -> None:
        for _ in range(n):
            self.workers.append(subprocess.Popen(
                ["dask", "worker", "--scheduler-file", str(self.file), "--host", "127.0.0.1", "--nthreads", "1",
                 "--no-nanny", "--no-dashboard", "--dashboard-address", "127.0.0.1:0"],
                env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))

    def live_workers(self) -> list[subprocess.Popen[bytes]]:
        return [w for w in self.workers if w.poll() is None]

    def ensure_workers(self, n: int) -> None:
        """Exactly ``n`` live workers, all known to the scheduler."""
        for w in self.live_workers()[n:]:
            w.kill()
            w.wait()
        self.start_workers(n - len(self.live_workers()))
        self.executor.client.wait_for_workers(n, timeout=60)
        deadline = time.monotonic() + 30
        while len(self.executor.client.scheduler_info()["workers"]) != n:
            assert time.monotonic() < deadline, "the scheduler still counts a dead worker"
            time.sleep(0.1)

    def close(self) -> None:
        self.executor.close()
        for p in [*self.workers, self.scheduler]:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.fixture(scope="module")
def external(tmp_path_factory: pytest.TempPathFactory) -> Iterator[External]:
    cluster = External(tmp_path_factory.mktemp("dask"))
    try:
        cluster.ensure_workers(2)
        yield cluster
    finally:
        cluster.close()


# -- helpers ----------------------------------------------------------------------------
def _in_thread(fn: Callable[[], GraphResult]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def main() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    return thread, out


def _node_run(store: Any, graph_run_id: str, name: str) -> Any:
    for child in store.children(graph_run_id):
        if child.meta.get("node") == name:
            return child
    return None


def _wait_for(cond: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _owner_pid(info: Any) -> int:
    return int(str(info.owner).split(":")[1])


def _graph_run_id(store: Any) -> str | None:
    runs = [r for r in store.list_runs() if r.kind == "graph"]
    return runs[0].id if runs else None


def _steps_paid_once(store: Any, run_id: str, steps: int) -> list[Any]:
    """The run's stored steps are 0..steps-1, each once; their states."""
    stored = store.load_steps(run_id)
    assert [s.step_n for s in stored] == list(range(steps))
    return [s.state for s in stored]


def _load_example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the workers import it by this name (examples/ is on their path)
    spec.loader.exec_module(module)
    return module


# -- a store the workers cannot reach is refused -----------------------------------------
@pytest.mark.parametrize("checkpoint", ["file", "memory"])
def test_a_file_or_memory_store_is_refused_before_anything_runs(checkpoint: str, tmp_path: Path) -> None:
    path = tmp_path / "local.db"
    graph = subjects.long_graph(str(path) if checkpoint == "file" else "memory", steps=1, delay=0)
    executor = DaskExecutor("tcp://127.0.0.1:9")  # never contacted: the store is refused first
    with pytest.raises(LoomcError, match="PostgreSQL") as err:
        graph.run({}, executor=executor)
    assert "SQLite file" in str(err.value) if checkpoint == "file" else "in-memory" in str(err.value)
    assert "checkpoint='postgresql://" in str(err.value)
    assert not path.exists() or graph.store().list_runs() == []  # nothing was written
    assert executor._client is None  # nor the scheduler contacted


def test_executor_and_resources_are_checked() -> None:
    with pytest.raises(TypeError, match="DaskExecutor"):
        Graph("g", executor="dask")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="scheduler address"):
        DaskExecutor(8786)
    graph = Graph("g", checkpoint="memory")
    with pytest.raises(ValueError, match="resources"):
        graph.add(subjects.prepare, resources={"GPU": "one"})  # type: ignore[dict-item]


# -- LocalCluster: the same results as in process ----------------------------------------
@pytest.mark.parametrize(("example", "graph_input"), [
    ("pipeline", {"topic": "tides"}),
    ("research_fanout", {"topic": "tides", "questions": 5}),
])
def test_examples_give_the_results_they_give_in_process(
    example: str, graph_input: dict[str, Any], local: DaskExecutor, shared_store: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LOOMC_EXAMPLE_DELAY", "0")
    graph: Graph = _load_example(example).graph
    store = shared_store()
    here = graph.run(graph_input, store=store)
    there = graph.run(graph_input, store=store, executor=local)
    assert there.status is here.status
    assert there.outputs == here.outputs
    assert there.cost_usd == pytest.approx(here.cost_usd, abs=1e-9)
    assert {n: (i.status, i.steps, i.items) for n, i in there.nodes.items()} == {
        n: (i.status, i.steps, i.items) for n, i in here.nodes.items()
    }
    # the stored totals agree with what the result says; nodes and items ran in the workers
    # (a map node's own run, which hands its items out, is the driver's)
    stored = store.get_run(there.run_id)
    assert stored.cost_usd == pytest.approx(there.cost_usd, abs=1e-9)
    assert stored.status is there.status
    ran = [c for c in store.children(there.run_id) if c.steps]
    ran += [i for c in ran if c.name.endswith("[map]") for i in store.children(c.id)]
    workers = {_owner_pid(r) for r in ran if not r.name.endswith("[map]")}
    assert workers
    assert os.getpid() not in workers


def test_graph_budget_is_never_crossed_by_items_on_both_workers(
    local: DaskExecutor, shared_store: Callable[..., Any]
) -> None:
    store = shared_store()
    graph = subjects.fan_graph(store, items=24, delay=0.03, usd=0.25)
    result = graph.run({}, executor=local)
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    fan = result.nodes["fan"]
    assert fan.items is not None
    assert fan.items.pending > 0
    stored = store.get_run(result.run_id)
    assert stored.cost_usd <= 0.25 + 1e-9
    assert stored.cost_usd > 0.25 - 4 * subjects.PRICE  # it ran until the cap, not far short of it
    items = store.children(fan.run_id)
    assert sum(i.cost_usd for i in items) <= 0.25 + 1e-9
    pids = {step.state["pid"] for i in items for step in store.load_steps(i.id) if step.error is None}
    assert len(pids) == 2  # items ran on both workers at once
    # resumed with more money, every item finishes; items done are not run again
    before = {i.id: i.steps for i in items if i.status is RunStatus.COMPLETED}
    more = graph.resume(result.run_id, budget=subjects.Budget(usd=1.0), executor=local)
    assert more.status is RunStatus.COMPLETED
    assert more.nodes["fan"].items == subjects.ItemCounts(24, 24, 0)
    after = store.children(fan.run_id)
    assert {i.id: i.steps for i in after if i.id in before} == before
    total = store.get_run(more.run_id).cost_usd
    assert total == pytest.approx(sum(i.cost_usd for i in after), abs=1e-9)
    assert total <= 24 * 3 * subjects.PRICE + 1e-9


# -- a scheduler and workers started apart: failures -------------------------------------
def test_a_worker_killed_mid_node_is_resumed_from_its_checkpoint(
    external: External, shared_store: Callable[..., Any]
) -> None:
    external.ensure_workers(2)
    store = shared_store()
    graph = subjects.long_graph(store, steps=8, delay=0.3, usd=0.5)
    thread, out = _in_thread(lambda: graph.run({}, executor=external.executor))
    gid = _wait_for(lambda: _graph_run_id(store), "the graph run")
    node = _wait_for(lambda: (n := _node_run(store, gid, "long_node")) is not None and n.steps >= 2 and n, "2 steps")
    victim = _owner_pid(node)
    os.kill(victim, signal.SIGKILL)
    thread.join(120)
    result = out[0]
    assert isinstance(result, GraphResult), result
    assert result.status is RunStatus.COMPLETED
    states = _steps_paid_once(store, node.id, 8)
    pids = states[-1]["pids"]
    assert pids[0] == victim
    assert pids[-1] != victim
    assert pids == [s for s in pids if s == victim] + [s for s in pids if s != victim]
    # eight steps committed, each paid once; at most the step in flight when it died was paid too
    cost = store.get_run(node.id).cost_usd
    assert 8 * subjects.PRICE - 1e-9 <= cost <= 9 * subjects.PRICE + 1e-9
    assert store.get_run(gid).cost_usd == pytest.approx(cost, abs=1e-9)


def test_the_driver_killed_leaves_a_graph_that_resume_finishes(
    external: External, shared_store: Callable[..., Any]
) -> None:
    external.ensure_workers(2)
    store = shared_store()
    dsn = shared_store.dsn  # type: ignore[attr-defined]
    driver = subprocess.Popen(
        [sys.executable, "-m", "tests.dask_subjects", external.address, dsn, "6", "0.3"],
        env=_env(), stdout=subprocess.PIPE, text=True,
    )
    try:
        assert driver.stdout is not None
        gid = driver.stdout.readline().strip()
        _wait_for(lambda: (n := _node_run(store, gid, "long_node")) is not None and n.steps >= 1, "a node step")
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        if driver.stdout is not None:
            driver.stdout.close()
    assert store.get_run(gid).status is RunStatus.CRASHED  # nothing recorded its end: its owner is gone
    graph = subjects.long_graph(store, steps=6, delay=0.3)
    result = graph.resume(gid, executor=external.executor)
    assert result.status is RunStatus.COMPLETED
    node = _node_run(store, gid, "long_node")
    states = _steps_paid_once(store, node.id, 6)
    assert states[-1]["i"] == 6
    assert 6 * subjects.PRICE - 1e-9 <= store.get_run(gid).cost_usd <= 7 * subjects.PRICE + 1e-9


def test_a_paused_worker_is_fenced_and_writes_nothing_more(
    external: External, shared_store: Callable[..., Any]
) -> None:
    external.ensure_workers(2)
    store = shared_store(lease_ttl=2.0)
    graph = subjects.long_graph(store, steps=8, delay=0.6, usd=0.5)
    thread, out = _in_thread(lambda: graph.run({}, executor=external.executor))
    gid = _wait_for(lambda: _graph_run_id(store), "the graph run")
    node = _wait_for(lambda: (n := _node_run(store, gid, "long_node")) is not None and n.steps >= 1 and n, "a step")
    paused = _owner_pid(node)
    os.kill(paused, signal.SIGSTOP)
    try:
        # the scheduler gives the worker up, another takes the node over once its lease has expired
        _wait_for(lambda: (n := store.get_run(node.id)).owner and _owner_pid(n) != paused and n.steps >= node.steps + 1,
                  "the takeover", timeout=60)
    finally:
        os.kill(paused, signal.SIGCONT)
    thread.join(120)
    result = out[0]
    assert isinstance(result, GraphResult), result
    assert result.status is RunStatus.COMPLETED
    time.sleep(1.5)  # the paused worker's step ends and tries to commit: refused
    states = _steps_paid_once(store, node.id, 8)
    pids = states[-1]["pids"]
    # the paused worker's steps are a prefix: none of its writes landed after the takeover
    ran_paused = [p for p in pids if p == paused]
    assert ran_paused
    assert pids[: len(ran_paused)] == ran_paused
    assert all(s["pids"] == pids[: len(s["pids"])] for s in states)
    final = store.get_run(node.id)
    assert final.status is RunStatus.COMPLETED
    assert final.steps == 8
    assert final.cost_usd <= 9 * subjects.PRICE + 1e-9
    for w in external.live_workers():  # the continued worker may linger, given up by the scheduler
        if w.pid == paused:
            w.kill()
            w.wait()


# -- the command line ---------------------------------------------------------------------
PIPELINE = """
from tests.dask_subjects import long_graph
graph = long_graph(None, steps=2, delay=0.0)
"""


def _loomc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loomc", *args], env=_env(), capture_output=True, text=True,
                          timeout=120, check=False)


def test_cli_refuses_a_file_store_with_the_dask_executor(tmp_path: Path) -> None:
    pipeline = tmp_path / "pipe.py"
    pipeline.write_text(PIPELINE)
    db = tmp_path / "runs.db"
    done = _loomc("graph", "run", str(pipeline), "--executor", "dask", "--db", str(db))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "PostgreSQL" in lines[0]
    assert "Traceback" not in done.stderr
    usage = _loomc("graph", "run", str(pipeline), "--address", "tcp://127.0.0.1:9")
    assert usage.returncode == 2
    assert "--executor dask" in usage.stderr


def test_cli_runs_a_graph_on_a_scheduler(tmp_path: Path, external: External, shared_store: Callable[..., Any]) -> None:
    external.ensure_workers(2)
    pipeline = tmp_path / "pipe.py"
    pipeline.write_text(PIPELINE)
    dsn = shared_store.dsn  # type: ignore[attr-defined]
    done = _loomc("graph", "run", str(pipeline), "--input", "{}", "--executor", "dask", "--address", external.address,
                  "--db", dsn)
    assert done.returncode == 0, done.stderr
    store = shared_store()
    gid = _graph_run_id(store)
    assert gid is not None
    assert store.get_run(gid).status is RunStatus.COMPLETED
    node = _node_run(store, gid, "long_node")
    assert store.get_run(node.id).steps == 2
    assert _owner_pid(node) in {w.pid for w in external.live_workers()}


def test_ctrl_c_cancels_the_remote_node_and_the_graph_says_so(
    external: External, shared_store: Callable[..., Any]
) -> None:
    external.ensure_workers(2)
    store = shared_store()
    dsn = shared_store.dsn  # type: ignore[attr-defined]
    driver = subprocess.Popen(
        [sys.executable, "-m", "tests.dask_subjects", external.address, dsn, "10", "0.3"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert driver.stdout is not None
        gid = driver.stdout.readline().strip()
        _wait_for(lambda: (n := _node_run(store, gid, "long_node")) is not None and n.steps >= 1, "a node step")
        driver.send_signal(signal.SIGINT)
        driver.wait(60)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        if driver.stdout is not None:
            driver.stdout.close()
    graph = store.get_run(gid)
    assert graph.status is RunStatus.INTERRUPTED
    assert graph.stop_reason == "interrupted"
    # the node on its worker stops at its next step boundary and records why
    node = _wait_for(lambda: (n := _node_run(store, gid, "long_node")).status is not RunStatus.RUNNING and n,
                     "the remote node to stop", timeout=20)
    assert node.status is RunStatus.INTERRUPTED
    assert node.steps < 10
    result = subjects.long_graph(store, steps=10, delay=0.0).resume(gid, executor=external.executor)
    assert result.status is RunStatus.COMPLETED
    _steps_paid_once(store, node.id, 10)


def test_the_dask_fanout_example_runs(shared_store: Callable[..., Any]) -> None:
    """examples/dask_fanout.py: the research fan-out on a local cluster, its items in two worker processes."""
    dsn = shared_store.dsn  # type: ignore[attr-defined]
    done = subprocess.run([sys.executable, str(EXAMPLES / "dask_fanout.py"), "--dsn", dsn, "--questions", "8"],
                          env=_env(LOOMC_EXAMPLE_DELAY="0.05"), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ": completed, $" in done.stdout
    assert "8/8 items" in done.stdout
    store = shared_store()
    gid = _graph_run_id(store)
    assert gid is not None
    assert store.get_run(gid).status is RunStatus.COMPLETED


def test_importing_orchestration_does_not_import_dask() -> None:
    code = "import sys, orchestration; assert 'distributed' not in sys.modules and 'dask' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], env=_env(), check=True, timeout=60)
