"""``loomc graph run`` / ``graph show``: a pipeline file run for real, killed with SIGKILL, resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from loomc import RunStatus, SQLiteStore
from orchestration._cli import graph_run, graph_show

PIPELINE = textwrap.dedent(
    """
    import os
    import time

    import loomc
    from loomc import Budget, loop, predicate
    from orchestration import Graph

    def mark(text):
        # One line per executed step, synced, so the test can count executions.
        with open(os.environ["GRAPH_SIDE_FILE"], "a") as f:
            f.write(text + "\\n")
            f.flush()
            os.fsync(f.fileno())

    def research(s):
        mark("research")
        loomc.charge(0.01)
        return {"topic": s["topic"], "notes": 3}

    def fact_check(s):
        mark("fact_check")
        return {"ok": True}

    @loop(budget=Budget(iterations=10), converge_on=predicate(lambda h: h[-1].state["v"] >= 4))
    def draft(s):
        v = s.get("v", 0)
        mark(f"draft:{v}")
        loomc.charge(0.02)
        time.sleep(float(os.environ.get("DRAFT_SLEEP", "0")))
        return {**s, "v": v + 1}

    def final(up):
        mark("final")
        return {"v": up["draft"]["v"], "ok": up["fact_check"]["ok"]}

    graph = Graph("killme", budget=Budget(usd=1.0))
    graph.add(research)
    graph.add(draft, after=research)
    graph.add(fact_check, after=research)
    graph.add(final, after=[draft, fact_check])
    """
)

def _cli(pipeline: Path, input_json: str | None, resume: str | None, env: dict[str, str]) -> subprocess.Popen[str]:
    """The real command: ``loomc graph run PIPELINE [--input JSON] [--resume ID]``."""
    args = [sys.executable, "-m", "loomc", "graph", "run", str(pipeline)]
    if input_json is not None:
        args += ["--input", input_json]
    if resume is not None:
        args += ["--resume", resume]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, line: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and line in path.read_text().splitlines():
            return
        time.sleep(0.01)
    raise AssertionError(f"{line!r} never appeared in {path}: {path.read_text() if path.exists() else '(missing)'}")


def test_sigkill_mid_node_then_resume_runs_only_what_is_left(tmp_path: Path) -> None:
    """SIGKILL of `graph run` mid-node, then --resume: done nodes do not run again, the killed node continues."""
    pipeline = tmp_path / "pipeline.py"
    pipeline.write_text(PIPELINE)
    side = tmp_path / "steps.log"
    db = tmp_path / "graph.db"
    env = {**os.environ, "LOOMC_DB": str(db), "GRAPH_SIDE_FILE": str(side), "DRAFT_SLEEP": "0.5"}

    proc = _cli(pipeline, '{"topic": "tides"}', None, env)
    try:
        _wait_for(side, "draft:2")  # draft's steps 0 and 1 are committed, step 2 is in flight
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)  # reap it and close its pipes
    assert proc.returncode == -signal.SIGKILL
    before = Counter(side.read_text().splitlines())
    assert before == Counter({"research": 1, "fact_check": 1, "draft:0": 1, "draft:1": 1, "draft:2": 1})

    store = SQLiteStore(db)
    (graph_info,) = store.list_runs(roots_only=True)
    assert graph_info.kind == "graph"
    assert graph_info.status is RunStatus.CRASHED
    kids = {k.meta["node"]: k for k in store.children(graph_info.id)}
    assert kids["draft"].status is RunStatus.CRASHED
    assert kids["draft"].steps == 2
    assert kids["research"].status is RunStatus.COMPLETED
    assert "final" not in kids
    store.close()

    env["DRAFT_SLEEP"] = "0"
    resumed = _cli(pipeline, None, graph_info.id[:8], env)
    out, err = resumed.communicate(timeout=60)
    assert resumed.returncode == 0, err
    after = Counter(side.read_text().splitlines())
    # Nothing that had finished ran again; draft redid only the step that was in flight.
    assert after == Counter({
        "research": 1, "fact_check": 1, "draft:0": 1, "draft:1": 1, "draft:2": 2, "draft:3": 1, "final": 1,
    })
    assert graph_info.id in out
    assert f"--resume {graph_info.id}" in out

    store = SQLiteStore(db)
    info = store.get_run(graph_info.id)
    assert info is not None
    assert info.status is RunStatus.COMPLETED
    kids_after = {k.meta["node"]: k for k in store.children(graph_info.id)}
    assert kids_after["draft"].id == kids["draft"].id  # the same node run, continued from its checkpoint
    assert kids_after["draft"].steps == 4
    assert kids_after["final"].status is RunStatus.COMPLETED
    # research $0.01 + four committed draft steps at $0.02 (the killed step's charge was never committed)
    assert info.cost_usd == pytest.approx(0.09)
    assert sum(k.cost_usd for k in kids_after.values()) == pytest.approx(info.cost_usd)
    assert [s.state for s in store.load_steps(kids_after["final"].id)] == [{"v": 4, "ok": True}]

    # `loomc runs` lists the graph as one root; `loomc show --tree` draws it with its nodes.
    runs = subprocess.run([sys.executable, "-m", "loomc", "runs", "--db", str(db)], capture_output=True, text=True,
                          timeout=30, check=True).stdout
    assert graph_info.id in runs
    assert not any(k.id in runs for k in kids_after.values())
    tree = subprocess.run([sys.executable, "-m", "loomc", "show", graph_info.id, "--tree", "--db", str(db)],
                          capture_output=True, text=True, timeout=30, check=True).stdout
    assert all(k.id in tree for k in kids_after.values())


def test_sigterm_interrupts_every_node_cleanly_and_resume_finishes(tmp_path: Path) -> None:
    """SIGTERM during `graph run`: exit 130, the graph and the running node are `interrupted`; resume completes."""
    pipeline = tmp_path / "pipeline.py"
    pipeline.write_text(PIPELINE)
    side = tmp_path / "steps.log"
    db = tmp_path / "graph.db"
    env = {**os.environ, "LOOMC_DB": str(db), "GRAPH_SIDE_FILE": str(side), "DRAFT_SLEEP": "0.4"}
    proc = _cli(pipeline, '{"topic": "tides"}', None, env)
    try:
        _wait_for(side, "draft:1")
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "interrupted; resume with: loomc graph run" in err
    store = SQLiteStore(db)
    (graph_info,) = store.list_runs(roots_only=True)
    assert graph_info.status is RunStatus.INTERRUPTED
    kids = {k.meta["node"]: k for k in store.children(graph_info.id)}
    assert kids["draft"].status is RunStatus.INTERRUPTED
    assert kids["draft"].steps == 2  # the step in flight finished and was kept; no new one started
    store.close()
    env["DRAFT_SLEEP"] = "0"
    resumed = _cli(pipeline, None, graph_info.id, env)
    out, err = resumed.communicate(timeout=60)
    assert resumed.returncode == 0, err
    assert "completed" in out
    lines = Counter(side.read_text().splitlines())
    assert lines == Counter({"research": 1, "fact_check": 1, "draft:0": 1, "draft:1": 1, "draft:2": 1, "draft:3": 1,
                             "final": 1})


# -- in-process command tests (fast) -----------------------------------------------


def _write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_graph_run_prints_progress_summary_and_resume_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`graph run` prints each node's progress, a summary table, the run id and the resume command."""
    path = _write(tmp_path, "pipe_ok", """
        from orchestration import Graph
        g = Graph("ok")
        g.add(lambda s: {"n": s["n"] + 1}, name="inc")
        g.add(lambda s: {"n": s["n"] * 2}, name="dbl", after="inc")
    """)
    db = tmp_path / "chosen.db"
    assert graph_run(str(path), None, '{"n": 1}', None, None, str(db)) == 0
    out = capsys.readouterr().out
    assert "  inc: running" in out
    assert "  dbl: completed" in out
    store = SQLiteStore(db)
    (info,) = store.list_runs(roots_only=True)
    assert f"run id: {info.id}" in out
    assert f"loomc graph run {path} --resume {info.id}" in out
    assert "dbl" in out.split("NODE")[1]
    assert (info.kind, info.status) == ("graph", RunStatus.COMPLETED)
    assert not (tmp_path / "default-checkpoints.db").exists()  # --db wins over $LOOMC_DB


def test_graph_run_input_file_and_named_graph(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--input-file feeds the graph; --graph picks one of several graphs by name."""
    path = _write(tmp_path, "pipe_two", """
        from orchestration import Graph
        first = Graph("first")
        first.add(lambda s: s, name="a")
        second = Graph("second")
        second.add(lambda s: {"got": s}, name="b")
    """)
    inp = tmp_path / "in.json"
    inp.write_text(json.dumps({"k": [1, 2]}))
    assert graph_run(str(path), None, None, str(inp), None, None) == 1
    assert "several graphs (first, second); pick one with --graph NAME" in capsys.readouterr().err
    assert graph_run(str(path), "second", None, str(inp), None, None) == 0
    store = SQLiteStore(os.environ["LOOMC_DB"])
    (info,) = store.list_runs(roots_only=True)
    (kid,) = store.children(info.id)
    assert [s.state for s in store.load_steps(kid.id)] == [{"got": {"k": [1, 2]}}]


@pytest.mark.parametrize(
    ("body", "args", "message"),
    [
        ("x = 1", {}, "defines no Graph"),
        ("raise RuntimeError('boom')", {}, "cannot import"),
        ("from orchestration import Graph\ng = Graph('g')\ng.add(lambda s: s, name='a')", {"input_json": "{nope"},
         "--input is not valid JSON"),
        ("from orchestration import Graph\ng = Graph('g')\ng.add(lambda s: s, name='a')", {"graph_name": "zzz"},
         "no graph named 'zzz'"),
        ("from orchestration import Graph\ng = Graph('g')\ng.add(lambda s: s, name='a')", {"resume": "ffffffffffff"},
         "no run"),
    ],
)
def test_graph_run_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, args: dict[str, str], message: str
) -> None:
    """Bad files, bad input, unknown graphs and runs: exit 1 and one line on stderr, no traceback."""
    path = _write(tmp_path, f"pipe_err_{abs(hash(body + str(args))) % 10**8}", body)
    # A database must exist for --resume to look a run up in.
    SQLiteStore(os.environ["LOOMC_DB"]).list_runs()
    code = graph_run(str(path), args.get("graph_name"), args.get("input_json"), None, args.get("resume"), None)
    err = capsys.readouterr().err
    assert code == 1
    assert message.lower() in err.lower()
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_graph_run_of_a_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    """A path that does not exist is a one-line error."""
    assert graph_run("/nonexistent/pipeline.py", None, None, None, None, None) == 1
    assert "no pipeline file at /nonexistent/pipeline.py" in capsys.readouterr().err


def test_graph_resume_never_creates_a_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--resume against a database that does not exist is one line, and neither file nor folder is created."""
    path = _write(tmp_path, "pipe_nodb", """
        from orchestration import Graph
        g = Graph("nodb")
        g.add(lambda s: s, name="only")
    """)
    missing = tmp_path / "sub" / "none.db"
    assert graph_run(str(path), None, None, None, "abc123", str(missing)) == 1
    err = capsys.readouterr().err
    assert err.startswith("loomc: no loomc database at ")
    assert str(missing) in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sub").exists()


def test_graph_resume_never_creates_the_graphs_own_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --db or $LOOMC_DB, --resume reads the graph's own checkpoint file, and never creates it."""
    missing = tmp_path / "own" / "graph.db"
    path = _write(tmp_path, "pipe_own", f"""
        from orchestration import Graph
        g = Graph("own", checkpoint={str(missing)!r})
        g.add(lambda s: s, name="only")
    """)
    monkeypatch.delenv("LOOMC_DB")
    assert graph_run(str(path), None, None, None, "abc123", None) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"loomc: no loomc database at {missing}")
    assert not (tmp_path / "own").exists()


def test_graph_run_names_a_directory_given_as_db_like_every_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`graph run --db DIR` says what `loomc show --db DIR` says: it is a directory, pass --db FILE."""
    path = _write(tmp_path, "pipe_dir", """
        from orchestration import Graph
        g = Graph("dirdb")
        g.add(lambda s: s, name="only")
    """)
    assert graph_run(str(path), None, "{}", None, None, str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"loomc: {tmp_path} is a directory, not a loomc database; pass --db FILE"


def test_failed_graph_exits_non_zero_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A graph that ends failed prints its summary, then exits 1 naming the failed node."""
    path = _write(tmp_path, "pipe_fail", """
        from orchestration import Graph
        def bad(s):
            raise ValueError("no data")
        g = Graph("fails")
        g.add(bad)
        g.add(lambda s: s, name="after_bad", after=bad)
    """)
    assert graph_run(str(path), None, "{}", None, None, None) == 1
    cap = capsys.readouterr()
    assert "after_bad  skipped" in cap.out
    assert "ended failed: failed: node 'bad'" in cap.err
    assert len(cap.err.strip().splitlines()) == 1


def test_graph_show_text_and_mermaid(capsys: pytest.CaptureFixture[str]) -> None:
    """`graph show` draws the example pipeline as stages, and as mermaid."""
    example = Path(__file__).resolve().parents[1] / "examples" / "pipeline.py"
    assert graph_show(str(example), None, False) == 0
    text = capsys.readouterr().out
    assert "graph report: 5 nodes" in text
    assert "stage 2  (in parallel)" in text
    assert "final" in text.split("stage 4")[1]
    assert graph_show(str(example), None, True) == 0
    mermaid = capsys.readouterr().out.splitlines()
    assert mermaid[0] == "flowchart TD"
    assert '    n0["research"]' in mermaid
    assert "    n3 --> n4" in mermaid
    assert "    n2 --> n4" in mermaid


def test_example_pipeline_runs_as_a_script(tmp_path: Path) -> None:
    """`python examples/pipeline.py` runs the whole report pipeline offline and completes."""
    example = Path(__file__).resolve().parents[1] / "examples" / "pipeline.py"
    env = {**os.environ, "LOOMC_DB": str(tmp_path / "ex.db"), "LOOMC_EXAMPLE_DELAY": "0"}
    proc = subprocess.run([sys.executable, str(example), "--topic", "moons"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "graph run" in proc.stdout
    assert ": completed" in proc.stdout
    assert "report on 'moons'" in proc.stdout
    store = SQLiteStore(tmp_path / "ex.db")
    (info,) = store.list_runs(roots_only=True)
    assert (info.kind, info.name, info.status) == ("graph", "report", RunStatus.COMPLETED)
    assert 0 < info.cost_usd <= 0.5
    assert [k.meta["node"] for k in store.children(info.id)] == ["research", "draft", "fact_check", "critique", "final"]


def test_resume_of_a_changed_graph_needs_force(tmp_path: Path) -> None:
    """`graph run --resume` refuses a pipeline whose structure changed; `--force` continues with it."""
    db = tmp_path / "force.db"
    first = textwrap.dedent(
        """
        from loomc import Budget
        from orchestration import Graph

        def a(s):
            return {"a": 1}

        def b(s):
            return {"b": s["a"] + 1}

        graph = Graph("evolving", budget=Budget(usd=1.0))
        graph.add(a)
        graph.add(b, after=a)
        """
    )
    pipeline = tmp_path / "evolving.py"
    pipeline.write_text(first)
    loomc_cmd = [sys.executable, "-m", "loomc", "graph", "run", str(pipeline), "--db", str(db)]
    assert subprocess.run(loomc_cmd, capture_output=True, text=True, check=False).returncode == 0
    (run,) = SQLiteStore(db).list_runs(roots_only=True)

    pipeline.write_text(first + "\ndef c(s):\n    return {'c': s['b'] + 1}\n\ngraph.add(c, after=b)\n")
    refused = subprocess.run([*loomc_cmd, "--resume", run.id], capture_output=True, text=True, check=False)
    assert refused.returncode == 1
    assert "changed since run" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    forced = subprocess.run([*loomc_cmd, "--resume", run.id, "--force"], capture_output=True, text=True, check=False)
    assert forced.returncode == 0, forced.stderr
    names = sorted(r.name.split(":")[-1] for r in SQLiteStore(db).children(run.id))
    assert names == ["a", "b", "c"]
