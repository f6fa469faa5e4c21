"""The examples run as a user would run them: real processes, the default SQLite store."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loomc import RunStatus, SQLiteStore

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a command with the default database under ``cwd``."""
    full_env = {k: v for k, v in os.environ.items() if k != "LOOMC_DB"} | env
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=full_env, timeout=120, check=True)


def test_code_fixer_killed_mid_run_resumes_to_completion(tmp_path: Path) -> None:
    """examples/code_fixer.py: kill -9 it mid-run, run it again with the run id, and every test passes."""
    env = {k: v for k, v in os.environ.items() if k != "LOOMC_DB"} | {"FIXER_STEP_DELAY": "0.2"}
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / "code_fixer.py")], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = tmp_path / ".loomc" / "checkpoints.db"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with sqlite3.connect(db) as c:
                if c.execute("SELECT COUNT(*) FROM steps").fetchone()[0] >= 2:
                    break
        except sqlite3.Error:
            pass
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(db) as c:
        run_id, done = c.execute("SELECT id, steps FROM runs").fetchone()
    assert 2 <= done < 5

    out = run([sys.executable, str(EXAMPLES / "code_fixer.py"), "--resume", run_id[:6]], tmp_path, FIXER_STEP_DELAY="0")
    assert f"run {run_id}: completed after 5 steps, $0.25" in out.stdout
    assert "return max(lo, min(hi, x))" in out.stdout
    with sqlite3.connect(db) as c:
        assert [n for (n,) in c.execute("SELECT step_n FROM steps ORDER BY step_n")] == [0, 1, 2, 3, 4]


def test_llm_refiner_runs_offline_on_the_real_sdk(tmp_path: Path) -> None:
    """examples/llm_refiner.py: the real anthropic client against the local fake API, a retried 429, a judge."""
    out = run([sys.executable, str(EXAMPLES / "llm_refiner.py")], tmp_path)
    match = re.search(r"run (\w+): completed after 3 steps, \$0\.012000", out.stdout)
    assert match, out.stdout
    show = run([sys.executable, "-m", "loomc", "show", match.group(1)], tmp_path)
    assert "retry 1 in" in show.stdout
    assert "RateLimitError" in show.stdout
    assert "<- converged" in show.stdout


def test_pipeline_example_runs_through_the_cli(tmp_path: Path) -> None:
    """README's main job: the pipeline example under `loomc graph run`."""
    out = run([sys.executable, "-m", "loomc", "graph", "run", str(EXAMPLES / "pipeline.py")], tmp_path,
              LOOMC_EXAMPLE_DELAY="0")
    assert re.search(r"graph report: run \w{12} completed", out.stdout), out.stdout
    for node in ("research", "draft", "fact_check", "critique", "final"):
        assert re.search(rf"^{node}\s+completed", out.stdout, re.M), node


def _first_line_id(stdout: str, prefix: str = "run") -> str:
    first = stdout.splitlines()[0]
    match = re.match(rf"{prefix} ([0-9a-f]{{12}}): starting", first)
    assert match, first
    return match.group(1)


def test_examples_print_their_run_id_before_the_first_step(tmp_path: Path) -> None:
    """Every example's first line names its run, and it is the run the example ends with."""
    fixer = run([sys.executable, str(EXAMPLES / "code_fixer.py")], tmp_path, FIXER_STEP_DELAY="0").stdout
    rid = _first_line_id(fixer)
    assert f"continue with: python examples/code_fixer.py --resume {rid}" in fixer.splitlines()[0]
    assert f"run {rid}: completed after 5 steps" in fixer

    planner = run([sys.executable, str(EXAMPLES / "planner_worker.py")], tmp_path).stdout
    rid = _first_line_id(planner)
    assert f"run {rid}: completed" in planner

    refiner = run([sys.executable, str(EXAMPLES / "llm_refiner.py")], tmp_path).stdout
    rid = _first_line_id(refiner)
    assert f"run {rid}: completed after 3 steps" in refiner

    pipeline = run([sys.executable, str(EXAMPLES / "pipeline.py")], tmp_path).stdout
    rid = _first_line_id(pipeline, "graph run")
    assert f"graph run {rid}: completed" in pipeline
    resumed = run([sys.executable, str(EXAMPLES / "pipeline.py"), "--resume", rid], tmp_path).stdout
    assert resumed.splitlines()[0].startswith(f"graph run {rid}: resuming")


def test_code_fixer_ctrl_c_prints_the_command_that_resumes_it(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) mid-run: exit 130, the run is interrupted, and the printed command finishes it."""
    env = {k: v for k, v in os.environ.items() if k != "LOOMC_DB"} | {"FIXER_STEP_DELAY": "0.2"}
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / "code_fixer.py")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    rid = _first_line_id(first)
    assert proc.stdout.readline().startswith("  step 0:")  # a step committed-or-running: the loop is live
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err
    command = f"python examples/code_fixer.py --resume {rid}"
    assert command in err.strip().splitlines()[-1]
    info = SQLiteStore(tmp_path / ".loomc" / "checkpoints.db", create=False).get_run(rid)
    assert info is not None
    # (interrupted, or crashed when the signal lands inside a commit: either way resumable)
    assert info.status in (RunStatus.INTERRUPTED, RunStatus.CRASHED)
    assert info.steps < 5

    again = run([sys.executable, str(EXAMPLES / "code_fixer.py"), "--resume", rid], tmp_path, FIXER_STEP_DELAY="0")
    assert f"run {rid}: completed after 5 steps, $0.25" in again.stdout


def test_llm_refiner_live_without_a_key_fails_in_one_line(tmp_path: Path) -> None:
    """`llm_refiner.py --live` with no ANTHROPIC_API_KEY: one clear line on stderr, non-zero exit, no traceback."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOOMC_DB", "ANTHROPIC_API_KEY")}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "llm_refiner.py"), "--live"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "ANTHROPIC_API_KEY" in lines[0]
    assert "without --live" in lines[0]
    assert not (tmp_path / ".loomc").exists()  # nothing ran


def test_research_fanout_routes_by_what_the_map_found_and_resumes(tmp_path: Path) -> None:
    """examples/research_fanout.py: a map of researchers, then the fact-checker only when an answer was shaky."""
    script = str(EXAMPLES / "research_fanout.py")
    checked = run([sys.executable, script, "--questions", "6"], tmp_path, LOOMC_EXAMPLE_DELAY="0").stdout
    assert re.search(r"^research\s+completed\s+steps=1 .* 6/6 items$", checked, re.M), checked
    assert re.search(r"^fact_check\s+completed", checked, re.M), checked
    assert "fact-checked: ['tides: open problems']" in checked
    rid = _first_line_id(checked, "graph run")
    again = run([sys.executable, script, "--resume", rid], tmp_path, LOOMC_EXAMPLE_DELAY="0").stdout
    assert f"graph run {rid}: completed" in again
    assert "sub-questions answered" not in again  # every researcher had finished: none ran again

    straight = run([sys.executable, script, "--questions", "4"], tmp_path, LOOMC_EXAMPLE_DELAY="0").stdout
    assert re.search(r"^fact_check\s+skipped .*\(not routed\)$", straight, re.M), straight
    assert re.search(r"^editor\s+completed", straight, re.M), straight
    cli = run([sys.executable, "-m", "loomc", "graph", "run", script, "--input", '{"questions": 3}'], tmp_path,
              LOOMC_EXAMPLE_DELAY="0")
    assert re.search(r"graph research: run \w{12} completed", cli.stdout), cli.stdout


def test_shared_budget_workers_stop_together_at_the_cap(tmp_path: Path) -> None:
    """examples/shared_budget_workers.py: three worker processes share a $0.20 cap held in the database."""
    out = run([sys.executable, str(EXAMPLES / "shared_budget_workers.py"), "--workers", "3", "--cap", "0.20"], tmp_path)
    match = re.search(r"run (\w+): 3 workers spent \$([0-9.]+) of \$0\.20", out.stdout)
    assert match, out.stdout
    spent = float(match.group(2))
    assert 0.20 - MAX_CALL_USD <= spent <= 0.20
    store = SQLiteStore(tmp_path / ".loomc" / "shared-budget.db")
    children = store.children(match.group(1))
    assert len(children) == 3
    assert sum(c.cost_usd for c in children) == pytest.approx(spent, abs=1e-6)
    assert {c.status for c in children} == {RunStatus.BUDGET_EXHAUSTED}


MAX_CALL_USD = 400 * 0.00001  # the example's largest reservation


def test_observe_prints_events_and_spans(tmp_path: Path) -> None:
    """examples/observe.py: a loop's and a graph's events, then the graph's spans on the console, offline."""
    root = str(EXAMPLES.parent)
    out = run([sys.executable, str(EXAMPLES / "observe.py")], tmp_path, PYTHONPATH=root).stdout
    assert re.search(r"^started  loop writer [0-9a-f]{12} \(resumed=False\)$", out, re.M), out
    assert re.search(r"^    started  loop critic ", out, re.M)
    assert re.search(r"^finished graph observe: completed", out, re.M)
    assert re.search(r"^loomc\.graph observe +\{'loomc\.run_id'", out, re.M)
    assert re.search(r"^loomc\.step critic ", out, re.M)


def test_approval_waits_for_a_person_and_resumes_with_the_cli_answer(tmp_path: Path) -> None:
    """examples/approval.py: waits with its question; a refused, a rejected and an approved reply from the CLI."""
    first = run([sys.executable, str(EXAMPLES / "approval.py")], tmp_path).stdout
    rid = re.match(r"run (\w{12}): starting", first)
    assert rid, first
    run_id = rid.group(1)
    assert f"run {run_id}: waiting for an answer ($0.02 spent so far)" in first
    assert "Send this email to Ada?" in first
    listed = run([sys.executable, "-m", "loomc", "runs", "--status", "waiting"], tmp_path).stdout
    assert run_id in listed
    env = {k: v for k, v in os.environ.items() if k != "LOOMC_DB"}
    refused = subprocess.run([sys.executable, "-m", "loomc", "reply", run_id, '{"approve": "sure"}'], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "nothing was stored" in refused.stderr
    run([sys.executable, "-m", "loomc", "reply", run_id, '{"approve": false, "feedback": "mention the date"}'], tmp_path)
    second = run([sys.executable, str(EXAMPLES / "approval.py"), "--resume", run_id], tmp_path).stdout
    assert "(As asked: mention the date.)" in second
    assert "waiting for an answer ($0.06 spent so far)" in second
    run([sys.executable, "-m", "loomc", "reply", run_id, '{"approve": true}'], tmp_path)
    done = run([sys.executable, "-m", "loomc", "resume", run_id, "--run"], tmp_path).stdout
    assert "completed: converged (2 steps, $0.0800)" in done
