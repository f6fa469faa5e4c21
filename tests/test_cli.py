"""The ``loomc`` command, run as a real subprocess against databases written by real loops."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from loomc import RunStatus, SQLiteStore
from tests import cli_subjects as subjects

MONEY = re.compile(r"^\$\d+\.\d{4}$")
ANSI = re.compile(r"\x1b\[")


def loomc(
    *args: str, db: Path | str | None = None, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m loomc ARGS`` (stdout and stderr are pipes, so output is plain)."""
    argv = [sys.executable, "-m", "loomc", *args]
    if db is not None:
        argv += ["--db", str(db)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env if env is not None else dict(os.environ), timeout=timeout)


def on_terminal(*args: str, db: Path) -> str:
    """Run ``loomc ARGS`` with stdout on a pseudo-terminal; its output with ANSI codes kept."""
    import pty

    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "140", "LINES": "50", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "loomc", *args, "--db", str(db)], stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=20) == 0
    assert proc.stderr is not None
    proc.stderr.close()
    return b"".join(chunks).decode()


def plain(text: str) -> str:
    """``text`` without ANSI escape sequences and carriage returns."""
    return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", text).replace("\r", "")


def assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str, code: int = 1) -> str:
    """One line on stderr starting ``loomc:``, no traceback, the given exit code."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr
    assert err.startswith("loomc: "), err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def table(stdout: str, first_header: str) -> tuple[list[str], list[str]]:
    """(header line, row lines) of the plain table whose header starts with ``first_header``."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [first_header])
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        rows.append(line)
    return lines[start], rows


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A database filled by real loops: errors, backtracks, convergence, budgets, nesting, a crash."""
    folder = tmp_path_factory.mktemp("cliworld")
    db = folder / "runs.db"
    results = subjects.build(str(db))
    subjects.crash_script(folder, db, after=2)
    store = SQLiteStore(db, create=False)
    crashed = next(r for r in store.list_runs() if r.status is RunStatus.CRASHED)
    ids = {k: r.run_id for k, r in results.items()}
    ids["crashed"] = crashed.id
    return {"db": db, "ids": ids, "results": results, "store": store, "folder": folder}


# ---------------------------------------------------------------------------------
# runs


def test_runs_lists_root_runs_newest_first(world: dict[str, Any]) -> None:
    """`runs` shows root runs newest first with ID STATUS STEPS COST CREATED, crashed ones as crashed."""
    proc = loomc("runs", db=world["db"])
    assert proc.returncode == 0, proc.stderr
    assert not ANSI.search(proc.stdout)
    header, rows = table(proc.stdout, "ID")
    assert header.split()[:5] == ["ID", "STATUS", "STEPS", "COST", "CREATED"]
    ids = world["ids"]
    listed = [r.split()[0] for r in rows]
    # Newest first: the crash ran last, the refine loop first; nested runs are not listed.
    expected = ["crashed", "twin2", "twin1", "parent", "capped", "refine", "graph"]
    assert listed == [ids[k] for k in expected]
    by_id = {r.split()[0]: r.split() for r in rows}
    store = world["store"]
    for rid, cells in by_id.items():
        info = store.get_run(rid)
        assert cells[1] == info.status.value
        assert int(cells[2]) == info.steps
        assert MONEY.match(cells[3])
        assert cells[3] == f"${info.cost_usd:.4f}"
        assert re.match(r"^\d{4}-\d\d-\d\d$", cells[4])
    assert by_id[ids["crashed"]][1] == "crashed"
    assert by_id[ids["capped"]][1:4] == ["budget_exhausted", "3", "$0.4500"]
    assert by_id[ids["refine"]][3] == "$0.3000"


def test_runs_all_status_limit_and_json(world: dict[str, Any]) -> None:
    """--all adds nested runs, --status filters (crashed included), --limit caps, --json is the same data."""
    store, ids = world["store"], world["ids"]
    every = loomc("runs", "--all", "--limit", "0", db=world["db"])
    _, rows = table(every.stdout, "ID")
    assert len(rows) == len(store.list_runs()) == 7 + 2 + 4 + 2  # roots, children, leaves, graph nodes
    assert {r.split()[0] for r in rows} >= {c.id for c in store.children(ids["parent"])}

    crashed = loomc("runs", "--status", "crashed", db=world["db"])
    _, rows = table(crashed.stdout, "ID")
    assert [r.split()[0] for r in rows] == [ids["crashed"]]

    limited = loomc("runs", "--limit", "2", "--json", db=world["db"])
    data = json.loads(limited.stdout)
    assert [d["id"] for d in data] == [ids["crashed"], ids["twin2"]]
    done = json.loads(loomc("runs", "--status", "completed", "--json", db=world["db"]).stdout)
    assert {d["id"] for d in done} == {ids["refine"], ids["parent"], ids["twin1"], ids["twin2"]}
    refine = next(d for d in done if d["id"] == ids["refine"])
    assert refine["steps"] == 7
    assert refine["cost_usd"] == pytest.approx(0.30)
    assert refine["budget"]["iterations"] == {"limit": 12, "used": 7, "left": 5}
    assert refine["name"] == "subjects:refine"

    failed = json.loads(loomc("runs", "--status", "failed", "--json", db=world["db"]).stdout)
    assert [(d["id"], d["kind"]) for d in failed] == [(ids["graph"], "graph")]

    empty = loomc("runs", "--status", "stalled", db=world["db"])
    assert empty.returncode == 0
    assert empty.stdout == ""
    assert "no stalled runs" in empty.stderr


# ---------------------------------------------------------------------------------
# show


def test_show_step_table_with_markers_and_header(world: dict[str, Any]) -> None:
    """`show` prints the budget header, why it stopped, and STEP COST CUMUL SCORE ERROR with markers."""
    rid = world["ids"]["refine"]
    proc = loomc("show", rid[:5], db=world["db"])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    head = dict(
        line.split(None, 1) if " " in line else (line, "")
        for line in out.split("\n\n")[0].splitlines()
        if not line.startswith(("wall", "iterations"))
    )
    assert head["run"] == rid
    assert head["name"] == "subjects:refine"
    assert head["status"] == "completed"
    assert head["stopped"] == "converged"
    assert head["usd"] == "$0.3000 of $1.0000 ($0.7000 left)"
    assert re.search(r"^iterations\s+7 of 12 \(5 left\)$", out, re.M)
    assert re.search(r"^wall clock\s+\S+ of 10m00s \(\S+ left\)$", out, re.M)

    header, rows = table(out, "STEP")
    assert header.split() == ["STEP", "COST", "CUMUL", "SCORE", "ERROR"]
    assert len(rows) == 7
    cells = [r.split() for r in rows]
    assert [c[0] for c in cells] == [str(i) for i in range(7)]
    assert cells[0][1:4] == ["$0.0500", "$0.0500", "0.200"]
    assert cells[2][1:4] == ["$0.0000", "$0.1000", "-"]
    assert "RuntimeError: rate limit" in rows[2]
    assert rows[2].endswith("<- backtrack to step 1")
    assert rows[3].endswith("<- backtrack to step 1")  # score 0.4 < best 0.5: BestScore
    assert "RuntimeError" not in rows[3]
    assert rows[6].endswith("<- converged")
    assert cells[6][2] == "$0.3000"  # CUMUL ends at the run's cost
    assert "<-" not in rows[4]


def test_show_json_and_nested_rows(world: dict[str, Any]) -> None:
    """--json carries the steps and children; a parent's show lists its nested runs."""
    ids, store = world["ids"], world["store"]
    data = json.loads(loomc("show", ids["refine"], "--json", db=world["db"]).stdout)
    assert data["id"] == ids["refine"]
    assert data["stop_reason"] == "converged"
    assert [s["step"] for s in data["history"]] == list(range(7))
    assert data["history"][2]["error"] == "RuntimeError: rate limit"
    assert data["history"][3]["events"] == ["backtrack to step 1"]
    assert data["history"][6]["events"] == ["converged"]
    assert data["history"][6]["cumul_usd"] == pytest.approx(0.30)
    assert data["children"] == []

    proc = loomc("show", ids["parent"], db=world["db"])
    kids = store.children(ids["parent"])
    _, rows = table(proc.stdout, "ID")
    assert [r.split()[0] for r in rows] == [k.id for k in kids]
    assert f"loomc show {ids['parent']} --tree" in proc.stdout


def test_show_tree_draws_nested_runs_with_own_and_total_cost(world: dict[str, Any]) -> None:
    """--tree draws parent -> children -> grandchildren, each with status, steps, own and total cost."""
    ids, store = world["ids"], world["store"]
    proc = loomc("show", ids["parent"], "--tree", db=world["db"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 + 2 + 4
    assert lines[0].startswith(ids["parent"])
    assert "completed" in lines[0]
    assert "steps 2" in lines[0]
    assert "own $0.2000" in lines[0]
    assert "total $0.2440" in lines[0]
    for child in store.children(ids["parent"]):
        at = next(i for i, line in enumerate(lines) if child.id in line)
        depth = lines[at].index(child.id)
        assert "budget_exhausted" in lines[at]
        assert "own $0.0200" in lines[at]
        assert "total $0.0220" in lines[at]
        for leaf in store.children(child.id):
            leaf_line = next(line for line in lines if leaf.id in line)
            assert leaf_line.index(leaf.id) > depth  # drawn under its parent
            assert "own $0.0010  total $0.0010" in leaf_line

    tree = json.loads(loomc("show", ids["parent"], "--tree", "--json", db=world["db"]).stdout)
    assert tree["own_cost_usd"] == pytest.approx(0.2)
    assert [len(c["children"]) for c in tree["children"]] == [2, 2]
    assert tree["children"][0]["children"][0]["cost_usd"] == pytest.approx(0.001)


def test_show_graph_lists_every_node_and_tree_names_them(world: dict[str, Any]) -> None:
    """A graph run shows one row per node (pending ones included); --tree labels node runs by node."""
    gid = world["ids"]["graph"]
    proc = loomc("show", gid, db=world["db"])
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^kind\s+graph$", proc.stdout, re.M)
    assert re.search(r"^stopped\s+.*summarise.*RuntimeError: rate limit", proc.stdout, re.M)
    header, rows = table(proc.stdout, "NODE")
    assert header.split() == ["NODE", "STATUS", "STEPS", "COST", "RUN", "AFTER"]
    cells = {r.split()[0]: r.split() for r in rows}
    assert list(cells) == ["gather", "summarise", "publish"]
    assert cells["gather"][1:4] == ["budget_exhausted", "2", "$0.0400"]
    assert cells["summarise"][1] == "failed"
    assert cells["summarise"][5] == "gather"
    assert cells["publish"][1:5] == ["pending", "0", "$0.0000", "-"]

    tree = loomc("show", gid[:6], "--tree", db=world["db"]).stdout.splitlines()
    assert tree[0].startswith(f"{gid}  graph subjects-report  failed")
    assert "total $0.0400" in tree[0]
    assert any("node gather (subjects:gather)  budget_exhausted  steps 2" in line for line in tree[1:])
    assert len(tree) == 3

    data = json.loads(loomc("show", gid, "--json", db=world["db"]).stdout)
    assert [(n["node"], n["status"], n["after"]) for n in data["nodes"]] == [
        ("gather", "budget_exhausted", []),
        ("summarise", "failed", ["gather"]),
        ("publish", "pending", ["summarise"]),
    ]


def test_show_crashed_run_says_so(world: dict[str, Any]) -> None:
    """A run whose process was SIGKILLed shows as crashed, with how to continue."""
    proc = loomc("show", world["ids"]["crashed"], db=world["db"])
    assert re.search(r"^status\s+crashed$", proc.stdout, re.M)
    assert re.search(r"^stopped\s+its process died", proc.stdout, re.M)
    _, rows = table(proc.stdout, "STEP")
    assert len(rows) >= 2


def test_terminal_output_is_drawn_with_rich(world: dict[str, Any]) -> None:
    """On a terminal the same rows are drawn by rich, with colour and a rule under the header."""
    ids = world["ids"]
    shown = on_terminal("show", ids["refine"], db=world["db"])
    assert ANSI.search(shown)
    text = plain(shown)
    assert "─" in text
    assert re.search(r"RuntimeError: rate limit\s+<- backtrack to step 1", text)
    assert re.search(r"^\s*6\s+\$0\.0500\s+\$0\.3000\s+0\.800\s+<- converged", text, re.M)

    tree = plain(on_terminal("show", ids["parent"], "--tree", db=world["db"]))
    for child in world["store"].children(ids["parent"]):
        assert child.id in tree

    runs = plain(on_terminal("runs", db=world["db"]))
    assert re.search(rf"^{ids['crashed']}\s+crashed\s+\d+\s+\$", runs, re.M)

    watched = plain(on_terminal("watch", ids["refine"], db=world["db"]))
    assert "<- converged" in watched
    assert f"run {ids['refine']} completed: converged (7 steps, $0.3000)" in watched


# ---------------------------------------------------------------------------------
# resume (instructions), export, watch


def test_resume_prints_snippet_budget_left_and_function(world: dict[str, Any]) -> None:
    """`resume` (no --run) names the function and prints the snippet and what is left of each budget."""
    ids = world["ids"]
    out = loomc("resume", ids["capped"], db=world["db"]).stdout
    assert re.search(r"^function\s+subjects:capped$", out, re.M)
    assert re.search(r"^usd\s+\$0\.0500 left of \$0\.5000 \(\$0\.4500 used\)$", out, re.M)
    assert re.search(r"^iterations\s+0 left of 3 \(3 used\)$", out, re.M)
    assert re.search(r"^wall clock\s+no limit \(\S+ used\)$", out, re.M)
    assert f"capped.resume({ids['capped']!r})" in out
    assert "budget=Budget(" in out
    assert f"loomc resume {ids['capped']} --run" in out

    crashed = loomc("resume", ids["crashed"], db=world["db"]).stdout
    assert re.search(r"^function\s+__main__:work$", crashed, re.M)
    assert "from agent import work" in crashed  # a script's function is imported from its file's module

    nested = loomc("resume", world["store"].children(ids["parent"])[0].id, db=world["db"]).stdout
    assert f"loomc resume {ids['parent']}" in nested


def test_export_whole_subtree_with_states(world: dict[str, Any]) -> None:
    """`export --json` holds the run, every step's state, its input and its nested runs recursively."""
    ids = world["ids"]
    data = json.loads(loomc("export", ids["parent"], "--json", db=world["db"]).stdout)
    run = data["run"]
    assert run["id"] == ids["parent"]
    assert run["input"] == 0
    assert [s["state"] for s in run["history"]] == [2, 4]  # each parent step runs a child to +2
    assert len(run["children"]) == 2
    first, second = run["children"]
    assert (first["input"], second["input"]) == (0, 2)
    assert [s["state"] for s in first["history"]] == [1, 2]
    assert [len(c["children"]) for c in run["children"]] == [2, 2]
    assert first["children"][0]["history"][0]["state"] == 1

    refine = json.loads(loomc("export", ids["refine"], db=world["db"]).stdout)["run"]
    states = [s["state"] for s in refine["history"]]
    assert states[0] == {"n": 1, "score": 0.2}
    assert refine["history"][2]["error"] == "RuntimeError: rate limit"

    target = world["folder"] / "export.json"
    written = loomc("export", ids["crashed"], "-o", str(target), db=world["db"])
    assert written.returncode == 0
    assert written.stdout == ""
    crashed = json.loads(target.read_text())["run"]
    assert crashed["state_type"] == "__main__:Draft"
    assert crashed["history"][0]["state"] == {"n": 1, "text": "x"}


def test_watch_streams_steps_as_they_commit(tmp_path: Path) -> None:
    """`watch` prints each step while the run is still going and ends when the run ends."""
    db = tmp_path / "watch.db"
    loop_proc = subjects.start_script(tmp_path, db, steps=6, sleep=0.15)
    try:
        subjects.wait_for_steps(db, 1)
        run_id = SQLiteStore(db, create=False).list_runs()[0].id
        watcher = subprocess.Popen(
            [sys.executable, "-m", "loomc", "watch", run_id[:6], "--interval", "0.05", "--db", str(db)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert watcher.stdout is not None
        assert watcher.stderr is not None
        seen: list[tuple[float, str]] = []
        with watcher.stdout, watcher.stderr:
            for line in watcher.stdout:
                seen.append((time.monotonic(), line.rstrip("\n")))
            err = watcher.stderr.read()
        watcher.wait(timeout=20)
        loop_proc.wait(timeout=20)
    finally:
        loop_proc.kill()
    assert watcher.returncode == 0, err
    text = [line for _, line in seen]
    rows = [line for line in text if re.match(r"^\s*\d+\s+\$", line)]
    assert [int(r.split()[0]) for r in rows] == list(range(6))
    assert rows[-1].endswith("<- converged")
    assert text[-1].startswith(f"run {run_id} completed")
    # The last steps arrived one by one, well apart (a step takes 0.15 s), not all at the end.
    times = [t for t, line in seen if re.match(r"^\s*\d+\s+\$", line)]
    assert times[-1] - times[-3] > 0.15


def test_watch_ends_at_once_on_a_finished_or_crashed_run(world: dict[str, Any]) -> None:
    """Watching a run that already ended (crashed included) prints its steps and returns."""
    ids = world["ids"]
    proc = loomc("watch", ids["crashed"], db=world["db"], timeout=10)
    assert proc.returncode == 0
    assert proc.stdout.splitlines()[-1].startswith(f"run {ids['crashed']} crashed")
    graph = loomc("watch", ids["graph"], db=world["db"], timeout=10).stdout.splitlines()
    assert any(re.match(r"^  node gather \(\w{12}\): budget_exhausted \(2 steps, \$0\.0400\)$", line) for line in graph)
    assert any(re.match(r"^  node summarise \(\w{12}\): failed", line) for line in graph)
    assert graph[-1].startswith(f"run {ids['graph']} failed: ")
    done = loomc("watch", ids["refine"], db=world["db"], timeout=10)
    assert done.stdout.splitlines()[-1] == f"run {ids['refine']} completed: converged (7 steps, $0.3000)"


# ---------------------------------------------------------------------------------
# resume --run


def test_resume_run_continues_a_crashed_script(tmp_path: Path) -> None:
    """`resume ID --run` loads the script a crashed run came from and finishes it, state type intact."""
    db = tmp_path / "crash.db"
    subjects.crash_script(tmp_path, db, after=2)
    store = SQLiteStore(db, create=False)
    info = store.list_runs()[0]
    assert info.status is RunStatus.CRASHED
    before = subjects.committed_steps(db, info.id)
    env = {k: v for k, v in os.environ.items() if k != "LOOMC_DB"}
    env["STEPS"], env["STEP_SLEEP"] = "6", "0.01"
    proc = loomc("resume", info.id[:7], "--run", db=db, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    after = store.get_run(info.id)
    assert after is not None
    assert after.status is RunStatus.COMPLETED
    steps = subjects.committed_steps(db, info.id)
    assert steps[: len(before)] == before
    assert steps == list(range(len(steps)))
    assert after.cost_usd == pytest.approx(0.01 * len(steps))
    assert proc.stdout.splitlines()[-1] == f"run {info.id} completed: converged ({len(steps)} steps, ${after.cost_usd:.4f})"
    assert "Traceback" not in proc.stderr


def test_resume_run_of_a_script_that_exits_while_imported_is_one_error_line(tmp_path: Path) -> None:
    """A run's script that exits at import (unguarded script part) is a one-line error, exit 1, not a silent exit."""
    script = tmp_path / "exits.py"
    db = tmp_path / "exits.db"
    script.write_text(textwrap.dedent(f"""
        from loomc import Budget, loop

        @loop(budget=Budget(iterations=1), checkpoint={str(db)!r})
        def work(state):
            return state

        if __name__ == "__main__":
            work.run({{}})
    """))
    subprocess.run([sys.executable, str(script)], check=True, cwd=tmp_path)
    info = SQLiteStore(db, create=False).list_runs()[0]
    script.write_text(script.read_text() + "\nraise SystemExit(3)\n")
    proc = loomc("resume", info.id, "--run", db=db, cwd=tmp_path)
    assert_user_error(proc, "exited while being imported (code 3)", "if __name__")


def test_resume_run_imports_a_module_from_the_working_directory(tmp_path: Path) -> None:
    """A loop defined in an importable module is imported from the cwd; elsewhere it is a clear error."""
    (tmp_path / "agentmod.py").write_text(subjects.SCRIPT)
    db = tmp_path / "mod.db"
    env = {**os.environ, "LOOMC_DB": str(db), "STEPS": "30", "STEP_SLEEP": "0.05"}
    proc = subprocess.Popen([sys.executable, "-c", "import agentmod; agentmod.work.run(agentmod.Draft())"], cwd=tmp_path, env=env)
    try:
        subjects.wait_for_steps(db, 2)
    finally:
        proc.kill()
        proc.wait()
    info = SQLiteStore(db, create=False).list_runs()[0]
    assert info.name == "agentmod:work"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert_user_error(loomc("resume", info.id, "--run", db=db, cwd=elsewhere), "cannot import agentmod")

    env["STEPS"], env["STEP_SLEEP"] = "5", "0.01"
    ok = loomc("resume", info.id, "--run", db=db, cwd=tmp_path, env=env)
    assert ok.returncode == 0, ok.stderr
    assert SQLiteStore(db, create=False).get_run(info.id).status is RunStatus.COMPLETED  # type: ignore[union-attr]

    again = loomc("resume", info.id, "--run", db=db, cwd=tmp_path, env=env)
    assert again.returncode == 0  # resuming a completed run runs no step
    assert subjects.committed_steps(db, info.id) == list(range(5))


def test_resume_run_with_new_limits_continues_a_budget_exhausted_run(tmp_path: Path) -> None:
    """A run stopped by its iteration cap resumes only with a larger cap, given on the command line."""
    db = tmp_path / "cap.db"
    proc = subjects.start_script(tmp_path, db, steps=100, sleep=0.0)
    assert proc.wait(timeout=30) == 0
    store = SQLiteStore(db, create=False)
    info = store.list_runs()[0]
    assert (info.status, info.steps) == (RunStatus.BUDGET_EXHAUSTED, 40)
    env = {**os.environ, "STEPS": "43", "STEP_SLEEP": "0"}
    hint = loomc("resume", info.id, db=db)
    assert f"loomc resume {info.id} --run --usd ... --iterations ..." in hint.stdout

    same = loomc("resume", info.id, "--run", db=db, cwd=tmp_path, env=env)
    assert same.returncode == 1
    assert "give it more" in same.stderr
    assert "Traceback" not in same.stderr
    assert store.get_run(info.id).steps == 40  # type: ignore[union-attr]

    assert loomc("resume", info.id, "--iterations", "45", db=db).returncode == 2  # limits need --run
    more = loomc("resume", info.id, "--run", "--iterations", "45", db=db, cwd=tmp_path, env=env)
    assert more.returncode == 0, more.stderr
    after = store.get_run(info.id)
    assert after is not None
    assert (after.status, after.steps) == (RunStatus.COMPLETED, 43)
    assert after.budget["iterations"] == 45
    assert after.budget["usd"] == 1.0  # limits not given keep their value


def test_resume_run_refuses_what_it_cannot_import(world: dict[str, Any]) -> None:
    """Loops defined inside a function, or nested runs, are refused with what to do instead."""
    ids = world["ids"]
    nested = world["store"].children(ids["parent"])[0].id
    assert_user_error(loomc("resume", nested, "--run", db=world["db"]), "resume the root run")
    # subjects:* names a module that does not exist
    assert_user_error(loomc("resume", ids["capped"], "--run", db=world["db"], cwd=world["folder"]), "cannot import subjects")


# ---------------------------------------------------------------------------------
# errors


def test_unknown_and_ambiguous_ids(world: dict[str, Any]) -> None:
    """An unknown id lists the nearest ids; an ambiguous prefix lists the matches; both exit 1."""
    err = assert_user_error(loomc("show", "abcd00000003", db=world["db"]), "no run 'abcd00000003'", "nearest:")
    assert "abcd00000001" in err or "abcd00000002" in err
    assert_user_error(loomc("show", "abcd", db=world["db"]), "ambiguous", "abcd00000001", "abcd00000002")
    for cmd in (["resume"], ["export"]):
        assert_user_error(loomc(*cmd, "ffffffffffff", db=world["db"]), "no run")
    # A unique prefix works everywhere.
    prefix = world["ids"]["refine"][:8]
    assert json.loads(loomc("export", prefix, db=world["db"]).stdout)["run"]["id"] == world["ids"]["refine"]


def test_no_database_is_reported_and_never_created(tmp_path: Path) -> None:
    """No database: one line, exit 1, and neither the file nor its directory is created."""
    missing = tmp_path / "sub" / "none.db"
    for args in (["runs"], ["show", "abc"], ["watch", "abc"]):
        assert_user_error(loomc(*args, db=missing), "no loomc database", str(missing))
    assert not (tmp_path / "sub").exists()

    env = {k: v for k, v in os.environ.items() if k != "LOOMC_DB"}
    assert_user_error(loomc("runs", cwd=tmp_path, env=env), "no loomc database", ".loomc/checkpoints.db")
    assert not (tmp_path / ".loomc").exists()
    env["LOOMC_DB"] = str(tmp_path / "env.db")
    assert_user_error(loomc("runs", cwd=tmp_path, env=env), str(tmp_path / "env.db"))
    assert not (tmp_path / "env.db").exists()
    assert_user_error(loomc("runs", db=tmp_path), "is a directory")


def test_bad_files_are_refused_and_left_untouched(tmp_path: Path) -> None:
    """Random bytes, a foreign SQLite file, a newer or older schema: one clear line each, the file unchanged."""
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(4096))
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as c:
        c.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as c:
        c.execute("CREATE TABLE runs (id TEXT PRIMARY KEY)")
        c.execute("PRAGMA user_version=99")
    older = tmp_path / "older.db"  # a loomc 0.3.0 database: schema v0
    with sqlite3.connect(older) as c:
        c.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, spec_hash TEXT, status TEXT, created_at TEXT, updated_at TEXT)")
        c.execute("INSERT INTO runs VALUES ('abc123def456', 'h', 'completed', '2025-01-01', '2025-01-01')")
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (junk, foreign, newer, older)}

    assert_user_error(loomc("runs", db=junk), "not a usable loomc database")
    assert_user_error(loomc("show", "abc", db=foreign), "not a loomc one", "invoices")
    assert_user_error(loomc("runs", db=newer), "newer loomc", "v99", "upgrade loomc")
    assert_user_error(loomc("show", "abc", db=older), "older loomc", "schema v0", "loomc.SQLiteStore(")
    for path, digest in digests.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert not (tmp_path / "newer.db-wal").exists() or (tmp_path / "newer.db-wal").stat().st_size == 0


def test_usage_errors_exit_2(world: dict[str, Any]) -> None:
    """Bad options are usage errors (exit 2), not tracebacks."""
    for args in (["runs", "--status", "sideways"], ["show"], ["runs", "--limit", "-1"], ["frobnicate"]):
        proc = loomc(*args, db=world["db"])
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_graph_commands_delegate_or_say_they_are_missing(tmp_path: Path) -> None:
    """`graph run/show` hand over to orchestration; without it, one line and exit 1."""
    proc = loomc("graph", "show", str(tmp_path / "nope.py"))
    assert_user_error(proc, "nope.py")
    # An `orchestration` package without `_cli` shadows the real one when run from this folder.
    (tmp_path / "orchestration").mkdir()
    (tmp_path / "orchestration" / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for args in (["graph", "run", "p.py"], ["graph", "show", "p.py", "--mermaid"]):
        assert_user_error(loomc(*args, cwd=tmp_path, env=env), "graph commands are not available")
    both = loomc("graph", "run", "p.py", "--input", "{}", "--input-file", "x.json", cwd=tmp_path, env=env)
    assert both.returncode == 2


def test_cli_module_keeps_heavy_imports_lazy() -> None:
    """Importing the CLI does not import rich, networkx or orchestration (fast --help)."""
    code = "import sys, loomc.cli; print(sorted(m for m in ('rich', 'networkx', 'orchestration') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    helped = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "loomc", "runs", "--help"], capture_output=True, text=True, check=True
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in helped.stderr.splitlines() if "|" in line}
    assert "rich" not in imported  # piped help is plain click text
    assert "networkx" not in imported
    assert "--status" in helped.stdout
    assert "--all" in helped.stdout
