"""``loomc ui`` over HTTP: the real server (a ``loomc ui`` process, or uvicorn in a thread), real runs.

What a browser does with the pages (scripts, live updates, the chart) is tests/test_ui_browser.py's.
"""

from __future__ import annotations

import html
import itertools
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from markupsafe import escape
from pydantic import BaseModel

import loomc
from loomc import BestScore, Budget, LastGood, MemoryStore, PostgresStore, RunStatus, SQLiteStore, loop
from loomc.store.postgres import is_dsn
from loomc.ui._chart import chart
from loomc.ui._guard import check_bind, is_loopback
from tests.test_store_conformance import TinyStore
from tests.ui_support import ROOT, SCRIPT_ERROR, SCRIPT_NAME, SCRIPT_STATE, child_env, ui_process, ui_thread


def _refine(checkpoint: Any, steps: int = 6, name: str = "refine") -> str:
    """A real loop: scores, a failed step (kept going by LastGood), a backtrack; its run id."""
    calls = itertools.count()

    @loop(checkpoint=checkpoint, budget=Budget(usd=1.0, iterations=steps), scorer=lambda s: s["score"],
          backtrack=[BestScore(), LastGood(max_consecutive_errors=3)], cost_fn=lambda s: 0.01, name=name)
    def refine(state: dict[str, Any]) -> dict[str, Any]:
        n = next(calls)
        if n == 2:
            raise RuntimeError(SCRIPT_ERROR)
        return {"n": n, "score": [0.2, 0.5, 0, 0.4, 0.8, 0.9][n % 6], "note": SCRIPT_STATE}

    return refine.run({"n": 0, "score": 0.0}).run_id


@pytest.fixture
def filled(tmp_path: Path) -> tuple[Path, str, str]:
    """A database with a plain run and a run whose name, error and state hold markup: ``(db, plain, marked)``."""
    db = tmp_path / "ui.db"
    plain = _refine(str(db))
    marked = _refine(str(db), name=SCRIPT_NAME)
    SQLiteStore(db).close()
    return db, plain, marked


@pytest.fixture(params=["sqlite", "postgres"])
def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database as ``--db`` names it: a SQLite file, or a PostgreSQL DSN (a schema of its own)."""
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_dsn"))
    return str(tmp_path / "ui.db")


def test_runs_list_and_run_page_over_a_real_process(any_db: str) -> None:
    """The list shows every root run; the run page its steps with cost, cumulative cost, score, error, events, budget
    (a SQLite file, and PostgreSQL: ``loomc ui --db postgresql://...``)."""
    db, plain, marked = any_db, _refine(any_db), _refine(any_db, name=SCRIPT_NAME)
    with ui_process(db) as server:
        status, headers, body = server.get("/")
        assert status == 200
        assert re.findall(r'<tr class="run" data-run="([0-9a-f]{12})"', body) == [marked, plain]
        assert "default-src 'none'" in headers["content-security-policy"]
        status, _, page = server.get(f"/runs/{plain}")
        assert status == 200
        rows = re.findall(r'<tr class="step( failed)?" data-step="(\d+)"', page)
        assert [int(n) for _, n in rows] == list(range(6))
        assert [bool(f) for f, _ in rows] == [False, False, True, False, False, False]
        assert "$0.0500" in page  # the cumulative cost after five paid steps
        assert "backtrack to step" in page
        assert "RuntimeError: " + escape(SCRIPT_ERROR) in page
        assert 'data-steps="6"' in page
        assert 'data-scored="5"' in page
        assert "$0.0500" in page
        assert "$0.9500" in page


def test_stored_markup_is_escaped_everywhere(filled: tuple[Path, str, str]) -> None:
    """A name, an error and a state holding tags come back as text on every page, never as markup."""
    db, _, marked = filled
    with ui_process(db) as server:
        pages = [server.get("/")[2], server.get(f"/runs/{marked}")[2], server.get(f"/runs/{marked}/steps/2")[2],
                 server.get(f"/runs/{marked}/steps/1")[2], server.get(f"/?name={SCRIPT_NAME[:8]}")[2]]
    for page in pages:
        assert "<script>window" not in page
        assert "<img" not in page
        assert "<svg onload" not in page
        assert page.count("<script") == 1  # the page's own /static/ui.js
    assert escape(SCRIPT_NAME) in pages[0]
    assert escape(SCRIPT_ERROR) in pages[2]
    assert escape(SCRIPT_STATE.replace('"', '\\"')) in pages[3]  # inside the state's JSON


def test_prefix_redirects_to_the_full_id_and_unknown_ids_are_404(filled: tuple[Path, str, str]) -> None:
    """``/runs/<prefix>`` redirects to the shareable full id; an unknown id is a 404 naming the nearest ids."""
    db, plain, _ = filled
    with ui_process(db) as server:
        status, headers, _ = server.get(f"/runs/{plain[:7]}?from=2")
        assert status == 307
        assert headers["location"].endswith(f"/runs/{plain}?from=2")
        status, _, body = server.get("/runs/ffffffffffff")
        assert status == 404
        assert "no run" in body
        assert server.get(f"/runs/{plain}/steps/99")[0] == 404
        assert server.get("/nowhere")[0] == 404
        assert server.get("/?status=nonsense")[0] == 400
        assert server.get("/?before=garbage")[0] == 400


class Approval(BaseModel):
    approve: bool


def test_a_waiting_run_shows_its_question_and_takes_the_reply_from_the_form(any_db: str) -> None:
    """A run waiting on ``loomc.ask``: the page shows the question (escaped); the form stores a valid answer only."""
    db = any_db

    @loop(checkpoint=db, budget=Budget(iterations=2), name="approve")
    def drafting(state: dict[str, Any]) -> dict[str, Any]:
        ok = state.get("ok")
        if state["n"] == 0:
            ok = loomc.ask("Send <b>this</b> email?", schema=Approval).approve
        return {"n": state["n"] + 1, "ok": ok}

    waiting = drafting.run({"n": 0})
    assert waiting.status is RunStatus.WAITING
    run_id = waiting.run_id
    store = SQLiteStore(db) if not is_dsn(db) else PostgresStore(db)

    def post(server: Any, answer: str, **headers: str) -> tuple[int, dict[str, str], str]:
        got: tuple[int, dict[str, str], str] = server.get(
            f"/runs/{run_id}/reply", data=urlencode({"answer": answer}).encode(), headers=headers,
        )
        return got

    with ui_process(db) as server:
        status, _, page = server.get(f"/runs/{run_id}")
        assert status == 200
        assert "Waiting for an answer" in page
        assert "Send &lt;b&gt;this&lt;/b&gt; email?" in page
        assert "<b>this</b>" not in page
        assert f'action="/runs/{run_id}/reply"' in page
        assert post(server, "yes please")[0] == 400  # not JSON
        status, _, body = post(server, '{"approve": "perhaps"}')
        assert status == 422  # JSON, but not what the schema asks
        assert "approve" in html.unescape(body)
        assert post(server, '{"approve": true}', Origin="http://evil.example")[0] == 403
        assert [q.answer for q in store.questions(run_id, True)] == [None]  # nothing stored so far
        status, headers, _ = post(server, '{"approve": true}')
        assert status == 303
        assert headers["location"].endswith(f"/runs/{run_id}#question")
        assert [q.answer for q in store.questions(run_id, True)] == ['{"approve":true}']
        page = server.get(f"/runs/{run_id}")[2]
        assert "Answered, waiting to be resumed" in page
        assert f"loomc resume {run_id} --run" in page
        status, _, body = post(server, '{"approve": false}')
        assert status == 409  # answered already: the first answer stays
        assert [q.answer for q in store.questions(run_id, True)] == ['{"approve":true}']
    done = drafting.resume_run(run_id)
    assert done.status is RunStatus.BUDGET_EXHAUSTED
    assert done.state == {"n": 2, "ok": True}
    store.close()


def test_a_foreign_host_header_is_refused_without_a_token(filled: tuple[Path, str, str]) -> None:
    """Bound to loopback with no token, a request naming another host (DNS rebinding) is refused."""
    db, _, _ = filled
    with ui_process(db) as server:
        assert server.get("/", headers={"Host": "evil.example:8765"})[0] == 421
        assert server.get("/", headers={"Host": "localhost:8765"})[0] == 200
        assert server.get("/", headers={"Host": "[::1]:8765"})[0] == 200


def test_a_token_is_checked_on_every_request(filled: tuple[Path, str, str]) -> None:
    """With --token: no token 401; ?token= sets a cookie and redirects without it; the cookie or a Bearer header pass."""
    db, plain, _ = filled
    with ui_process(db, "--token", "s3cret-token") as server:
        assert server.url.endswith("/?token=s3cret-token")
        assert server.get("/")[0] == 401
        assert server.get(f"/runs/{plain}")[0] == 401
        assert server.get("/static/ui.css")[0] == 401
        assert server.get("/?token=wrong")[0] == 401
        assert server.get("/", headers={"Authorization": "Bearer wrong"})[0] == 401
        status, headers, _ = server.get(f"/runs/{plain}?token=s3cret-token&from=1")
        assert status == 303
        assert headers["location"] == f"/runs/{plain}?from=1"
        cookie = headers["set-cookie"].split(";")[0]
        assert "HttpOnly" in headers["set-cookie"]
        assert server.get(f"/runs/{plain}?from=1", headers={"Cookie": cookie})[0] == 200
        assert server.get("/", headers={"Authorization": "Bearer s3cret-token"})[0] == 200
        # with a token, the Host header does not matter: the token is the guard
        assert server.get("/", headers={"Authorization": "Bearer s3cret-token", "Host": "box.lan"})[0] == 200


def test_non_loopback_bind_without_a_token_is_refused(tmp_path: Path, filled: tuple[Path, str, str]) -> None:
    """``loomc ui --host 0.0.0.0`` without --token: one line on stderr, exit 1, nothing listening."""
    db, _, _ = filled
    for host in ("0.0.0.0", "192.0.2.7", "example.com", "::"):
        proc = subprocess.run([sys.executable, "-m", "loomc", "ui", "--db", str(db), "--host", host],
                              capture_output=True, text=True, env=child_env(), timeout=60)
        assert proc.returncode == 1, proc.stderr
        assert proc.stdout == ""
        assert proc.stderr.startswith("loomc: --host")
        assert "--token" in proc.stderr
        assert "127.0.0.1" in proc.stderr
        assert len(proc.stderr.splitlines()) == 1
    proc = subprocess.run([sys.executable, "-m", "loomc", "ui", "--db", str(db), "--token", "has space"],
                          capture_output=True, text=True, env=child_env(), timeout=60)
    assert proc.returncode == 1
    assert "--token" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bind_rules() -> None:
    """Loopback addresses need no token; any other address does."""
    for host in ("127.0.0.1", "127.5.0.1", "localhost", "::1", "[::1]"):
        assert is_loopback(host)
        check_bind(host, None)
    for host in ("0.0.0.0", "", "10.0.0.1", "::", "box.lan"):
        assert not is_loopback(host)
        with pytest.raises(ValueError, match="--token"):
            check_bind(host, None)
        check_bind(host, "tok")


def test_token_from_the_environment(filled: tuple[Path, str, str]) -> None:
    """$LOOMC_UI_TOKEN stands for --token (and allows a non-loopback host)."""
    db, _, _ = filled
    with ui_process(db, env=child_env(LOOMC_UI_TOKEN="from-env")) as server:
        assert server.url.endswith("?token=from-env")
        assert server.get("/")[0] == 401
        assert server.get("/", headers={"Authorization": "Bearer from-env"})[0] == 200


def test_missing_database_and_busy_port_are_one_line_errors(tmp_path: Path, filled: tuple[Path, str, str]) -> None:
    """No database: one line, exit 1 (nothing created). A port in use: one line naming --port."""
    proc = subprocess.run([sys.executable, "-m", "loomc", "ui", "--db", str(tmp_path / "none.db")],
                          capture_output=True, text=True, env=child_env(), timeout=60)
    assert proc.returncode == 1
    assert "no loomc database" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "none.db").exists()
    db, _, _ = filled
    with ui_process(db) as server:
        port = server.url.rsplit(":", 1)[1].strip("/")
        proc = subprocess.run([sys.executable, "-m", "loomc", "ui", "--db", str(db), "--port", port],
                              capture_output=True, text=True, env=child_env(), timeout=60)
    assert proc.returncode == 1
    assert "in use" in proc.stderr
    assert "--port" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1


def test_missing_extra_names_the_install_command(filled: tuple[Path, str, str]) -> None:
    """Without Starlette installed, ``loomc ui`` says ``pip install 'loomc[ui]'`` in one line."""
    db, _, _ = filled
    code = ("import sys; sys.modules['starlette'] = None; from loomc.cli import main; "
            f"sys.argv = ['loomc', 'ui', '--db', {str(db)!r}]; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "loomc: loomc ui needs starlette, which is not installed: pip install 'loomc[ui]'"


def test_import_loomc_does_not_import_the_ui_stack() -> None:
    """``import loomc`` imports none of Starlette, uvicorn, Jinja2 or loomc.ui."""
    code = "import sys, loomc; print(sorted(m for m in ('starlette', 'uvicorn', 'jinja2', 'loomc.ui') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=60, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stderr


def test_any_store_without_search_runs_is_listed_and_paged(tmp_path: Path) -> None:
    """A store of the user's own (no ``search_runs``) is listed, filtered and paged from ``list_runs``."""
    tiny = TinyStore()
    ids = [_refine(tiny, steps=3, name=f"agent_{i}") for i in range(7)]
    tiny.update_run_status(ids[3], RunStatus.FAILED)
    with ui_thread(tiny) as server:
        body = server.get("/?n=3")[2]
        first = re.findall(r'data-run="([^"]+)"', body)
        assert first == ids[::-1][:3]
        older = html.unescape(re.search(r'href="([^"]+)" rel="next"', body).group(1))  # type: ignore[union-attr]
        second = re.findall(r'data-run="([^"]+)"', server.get(older)[2])
        assert second == ids[::-1][3:6]
        assert re.findall(r'data-run="([^"]+)"', server.get("/?status=failed")[2]) == [ids[3]]
        assert re.findall(r'data-run="([^"]+)"', server.get("/?name=AGENT_5")[2]) == [ids[5]]
        page = server.get(f"/runs/{ids[0]}")[2]
        assert len(re.findall(r'<tr class="step', page)) == 3


def test_a_memory_store_with_nested_runs_shows_the_tree() -> None:
    """The tree of a nested run: the root, each child, the current run marked; parent linked."""
    store = MemoryStore()

    @loop(checkpoint=store, budget=Budget(iterations=2), name="child")
    def child(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    @loop(checkpoint=store, budget=Budget(iterations=2), name="parent")
    def parent(state: dict[str, int]) -> dict[str, int]:
        child.run({"n": 0})
        return {"n": state["n"] + 1}

    root = parent.run({"n": 0}).run_id
    kids = store.children(root)
    assert len(kids) == 2
    with ui_thread(store) as server:
        page = server.get(f"/runs/{kids[1].id}")[2]
    tree = page[page.index('id="tree"'):]
    assert list(re.findall(r'href="/runs/([0-9a-f]{12})" class="id"', tree)) == [root, kids[0].id, kids[1].id]
    assert re.search(rf'<li class="current">\s*<a href="/runs/{kids[1].id}"', tree)
    assert f'<a href="/runs/{root}">{root}</a> (step 1)' in page


def test_window_of_a_long_run(tmp_path: Path) -> None:
    """A run page reads a window of steps: the last ones by default, ``?from=K`` from step K, with counts of the rest."""
    db = tmp_path / "long.db"

    @loop(checkpoint=str(db), budget=Budget(iterations=1200), durability="process", scorer=lambda s: s["n"] % 10 / 10,
          name="long")
    def long(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    rid = long.run({"n": 0}).run_id
    with ui_process(db) as server:
        page = server.get(f"/runs/{rid}")[2]
        steps = [int(n) for n in re.findall(r'<tr class="step[^"]*" data-step="(\d+)"', page)]
        assert steps == list(range(700, 1200))
        assert "700 earlier steps not shown" in page
        page = server.get(f"/runs/{rid}?from=100&n=50")[2]
        steps = [int(n) for n in re.findall(r'<tr class="step[^"]*" data-step="(\d+)"', page)]
        assert steps == list(range(100, 150))
        assert "100 earlier steps not shown" in page
        assert "1050 later steps not shown" in page
        assert 'data-steps="50"' in page


def test_chart_geometry() -> None:
    """The chart: one cost point per step, score lines broken at unscored steps, failed steps marked, axes labelled."""
    c = chart([0, 1, 2, 3, 4], [0.5, None, 1.0, float("nan"), 0.25], [0.1, 0.2, 0.2, 0.5, 0.6], [False, True, False, False, False])
    assert c is not None
    assert len(c.cost_points.split()) == 5
    assert [len(line.split()) for line in c.score_lines] == [1, 1, 1]
    assert len(c.errors) == 1
    assert c.scored == 3
    assert c.steps == 5
    x0, y0, x1, _y1 = c.box
    xs = [float(p.split(",")[0]) for p in c.cost_points.split()]
    ys = [float(p.split(",")[1]) for p in c.cost_points.split()]
    assert xs[0] == x0
    assert xs[-1] == x1
    assert xs == sorted(xs)
    assert ys[-1] == y0
    assert ys == sorted(ys, reverse=True)
    assert {t.text for t in c.ticks} >= {"$0.6000", "step 0", "step 4", "0", "1"}
    assert chart([], [], [], []) is None
    one = chart([7], [2.5], [0.0], [False])
    assert one is not None
    assert one.cost_points
    assert one.score_marks


def test_a_graph_page_draws_its_nodes_and_their_child_loops(tmp_path: Path) -> None:
    """A graph's run page: each node (by name) with its own loop under it, a failed node and the one it skipped."""
    from orchestration import Graph

    db = tmp_path / "graph.db"

    @loop(budget=Budget(iterations=2), cost_fn=lambda s: 0.01, name="agents:inner")
    def inner(s: dict[str, Any]) -> dict[str, Any]:
        return {"x": s.get("x", 0) + 1}

    @loop(budget=Budget(iterations=1), name="agents:research")
    def research(s: dict[str, Any]) -> dict[str, Any]:
        return inner.run({"x": 0}).state

    def broken(s: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("<b>no</b>")

    def final(s: dict[str, Any]) -> dict[str, Any]:
        return s

    g = Graph("report", checkpoint=str(db))
    g.add(research)
    g.add(broken, after=research)
    g.add(final, after=broken)
    result = g.run({})
    with ui_process(db) as server:
        page = server.get(f"/runs/{result.run_id}")[2]
    tree = page[page.index('id="tree"'):]
    labels = re.findall(r'<span class="kind">([^<]+)</span>\s*<span class="name">([^<]*)</span>\s*<span class="status st-(\w+)"', tree)
    assert ("graph", "report", "failed") in labels
    assert ("node research", "agents:research", "budget_exhausted") in labels  # its one iteration used
    assert any(kind == "node broken" and st == "failed" for kind, _, st in labels)
    assert ("loop", "agents:inner", "budget_exhausted") in labels
    assert "node final: not started" in tree
    assert "<b>no</b>" not in page
