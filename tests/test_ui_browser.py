"""``loomc ui`` in a real headless Chromium (Debian's ``chromium`` package, driven by Playwright).

The browser is the system's: when it is missing and the tests run as root, the session
installs it with apt (as ``.ci/run`` does); otherwise the tests fail saying what to install.
Playwright's own browser downloads are never used. Screenshots go to
``$LOOMC_TEST_ARTIFACTS`` (default ``tests/artifacts/``).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright import sync_api as playwright_sync

from loomc import BestScore, Budget, LastGood, SQLiteStore, loop
from tests.ui_support import ROOT, SCRIPT_ERROR, SCRIPT_NAME, SCRIPT_STATE, build_many_runs, child_env, ui_process

# Installing the browser on a fresh machine takes a while; the tests themselves are quick.
pytestmark = pytest.mark.timeout(900)

#: The issue's acceptance check for the runs list of a 100,000-run database: a page in under a second.
PAGE_BUDGET_MS = 1000.0


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's chromium: found on PATH, else installed with apt when running as root."""
    path = _find_chromium()
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], check=True, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "chromium"], check=True, env=env, capture_output=True)
        path = _find_chromium()
    if path is None:
        pytest.fail("the loomc ui browser tests need Debian's chromium package: apt-get install chromium (as root)")
    return path


@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[Any]:
    """A headless Chromium for this module's tests.

    Playwright's sync API keeps an asyncio loop running in this thread while it is
    started: it is stopped when the module ends, so async tests after it run as usual.
    """
    with playwright_sync.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=chromium_path, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where screenshots are saved (``$LOOMC_TEST_ARTIFACTS``, else ``tests/artifacts/``)."""
    path = Path(os.environ.get("LOOMC_TEST_ARTIFACTS") or ROOT / "tests" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


class Page:
    """A browser tab that records dialogs, console messages and errors, and whether the page reloaded."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.dialogs: list[str] = []
        self.console: list[str] = []
        self.errors: list[str] = []

        def on_dialog(dialog: Any) -> None:
            self.dialogs.append(dialog.message)
            dialog.dismiss()

        self.page.on("dialog", on_dialog)
        self.page.on("console", lambda m: self.console.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def goto(self, url: str) -> Any:
        response = self.page.goto(url)
        assert response is not None
        return response

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser: Any) -> Iterator[Page]:
    """A fresh tab (its own cookies) closed after the test."""
    t = Page(browser)
    yield t
    t.close()


def _refine(db: Path, name: str = "examples.refine:refine", steps: int = 12) -> str:
    """A real loop with scores, costs, a failed step and backtracks; its run id."""
    calls = itertools.count()
    scores = [0.21, 0.35, None, 0.48, 0.44, 0.62, 0.7, 0.66, 0.81, 0.79, 0.88, 0.9]

    @loop(checkpoint=str(db), budget=Budget(usd=0.50, iterations=steps), scorer=lambda s: s["score"],
          backtrack=[BestScore(), LastGood(max_consecutive_errors=3)], cost_fn=lambda s: 0.012 + 0.004 * (s["n"] % 3),
          name=name)
    def refine(state: dict[str, Any]) -> dict[str, Any]:
        n = next(calls)
        if scores[n % len(scores)] is None:
            raise TimeoutError("the model did not answer within 30s")
        return {"n": n, "score": scores[n % len(scores)], "draft": f"draft {n}"}

    return refine.run({"n": 0, "score": 0.0, "draft": ""}).run_id


def _marked(db: Path) -> str:
    """A run whose name, step error, stop reason and state hold markup that would run if not escaped."""
    calls = itertools.count()

    @loop(checkpoint=str(db), budget=Budget(iterations=5), name=SCRIPT_NAME)
    def marked(state: dict[str, Any]) -> dict[str, Any]:
        if next(calls) == 2:
            raise RuntimeError(SCRIPT_ERROR)
        return {"note": SCRIPT_STATE}

    return marked.run({"note": SCRIPT_STATE}).run_id


@pytest.fixture
def filled(tmp_path: Path) -> tuple[Path, str, str]:
    """A database with a refining run and a run full of markup: ``(db, refine, marked)``."""
    db = tmp_path / "ui.db"
    refine = _refine(db)
    marked = _marked(db)
    SQLiteStore(db).close()
    return db, refine, marked


def test_runs_list_loads(filled: tuple[Path, str, str], tab: Page, artifacts: Path) -> None:
    """The runs list shows each run's id, status, name, steps and cost; a click opens the run page."""
    db, refine, marked = filled
    with ui_process(db) as server:
        response = tab.goto(server.url)
        assert response.status == 200
        rows = tab.page.locator("tr.run")
        assert rows.count() == 2
        assert rows.nth(0).get_attribute("data-run") == marked
        second = rows.nth(1).inner_text()
        assert refine in second
        assert "budget_exhausted" in second
        assert "examples.refine:refine" in second
        assert "12" in second
        tab.page.screenshot(path=str(artifacts / "ui-runs.png"), full_page=True)
        tab.page.select_option("select[name=status]", "failed")
        tab.page.click("form.filters button")
        tab.page.wait_for_url(re.compile(r"status=failed"))
        assert [r.get_attribute("data-run") for r in tab.page.locator("tr.run").all()] == [marked]
        tab.page.click(f"a[href='/runs/{marked}']")
        tab.page.wait_for_url(re.compile(f"/runs/{marked}$"))
        assert tab.page.locator("h1").inner_text() == f"Run {marked}"
    assert tab.errors == []


def test_run_page_shows_the_rows_and_the_chart(filled: tuple[Path, str, str], tab: Page, artifacts: Path) -> None:
    """Every step with cost, cumulative cost, score, error and events; the chart draws score and cost over them."""
    db, refine, _ = filled
    with ui_process(db) as server:
        tab.goto(f"{server.base}/runs/{refine}")
        rows = tab.page.locator("#steps tbody tr")
        assert rows.count() == 12
        cells = [rows.nth(i).locator("td").all_inner_texts() for i in range(12)]
        assert [c[0] for c in cells] == [str(i) for i in range(12)]
        assert cells[0][1:4] == ["$0.0120", "$0.0120", "0.210"]
        assert cells[1][1:4] == ["$0.0160", "$0.0280", "0.350"]
        assert cells[2][4] == "TimeoutError: the model did not answer within 30s"
        assert cells[2][3] == "-"
        assert "failed" in (rows.nth(2).get_attribute("class") or "")
        assert "backtrack to step 3" in cells[4][5]
        total = sum(float(c[1].lstrip("$")) for c in cells)
        assert cells[-1][2] == f"${total:.4f}"
        chart = tab.page.locator("svg#chart")
        assert chart.get_attribute("data-steps") == "12"
        assert chart.get_attribute("data-scored") == "11"
        assert len((chart.locator("polyline.cost").get_attribute("points") or "").split()) == 12
        assert sum(len((p.get_attribute("points") or "").split()) for p in chart.locator("polyline.score").all()) == 11
        assert chart.locator("line.error-mark").count() == 1
        box = chart.bounding_box()
        assert box is not None
        assert box["width"] > 300
        assert box["height"] > 100
        budget = tab.page.locator("#budget").inner_text()
        assert "usd" in budget
        assert "$0.5000" in budget
        assert "iterations" in budget
        tab.page.screenshot(path=str(artifacts / "ui-run.png"), full_page=True)
    assert tab.errors == []
    assert not [m for m in tab.console if "Content Security Policy" in m]


def test_a_step_committed_while_the_page_is_open_appears_without_reload(tmp_path: Path, tab: Page, artifacts: Path) -> None:
    """A running loop commits a step: its row, the chart and the totals update in the open page, which never reloads."""
    db = tmp_path / "live.db"
    gate = threading.Semaphore(2)  # two steps commit before the page opens
    started = threading.Event()
    run_ids: list[str] = []

    @loop(checkpoint=str(db), budget=Budget(iterations=4), scorer=lambda s: s["n"] / 4, cost_fn=lambda s: 0.01, name="live")
    def live(state: dict[str, int]) -> dict[str, int]:
        started.set()
        assert gate.acquire(timeout=60)
        return {"n": state["n"] + 1}

    worker = threading.Thread(target=lambda: run_ids.append(live.run({"n": 0}).run_id), daemon=True)
    worker.start()
    try:
        assert started.wait(30)
        store = SQLiteStore(db, create=False)
        for _ in range(300):  # the first two steps commit
            runs = store.list_runs()
            if runs and runs[0].steps == 2:
                break
            threading.Event().wait(0.05)
        rid = store.list_runs()[0].id
        with ui_process(db) as server:
            tab.goto(f"{server.base}/runs/{rid}")
            assert tab.page.locator("#steps tbody tr").count() == 2
            assert tab.page.locator("#status").inner_text() == "running"
            tab.page.evaluate("window.stillHere = 'yes'")
            gate.release()  # step 2 commits while the page is open
            tab.page.wait_for_selector("#steps tr[data-step='2']", timeout=20_000)
            assert tab.page.evaluate("window.stillHere") == "yes"  # the same document: no reload
            assert tab.page.locator("svg#chart").get_attribute("data-steps") == "3"
            assert tab.page.locator("#steps-count").inner_text() == "3"
            gate.release()  # the last step: the run completes
            playwright_sync.expect(tab.page.locator("#status")).to_have_text("budget_exhausted", timeout=20_000)
            assert tab.page.locator("#steps tbody tr").count() == 4
            assert tab.page.evaluate("window.stillHere") == "yes"
            tab.page.screenshot(path=str(artifacts / "ui-live.png"), full_page=True)
    finally:
        for _ in range(4):
            gate.release()
        worker.join(timeout=30)
    assert run_ids == [rid]
    assert tab.errors == []


def test_script_stored_in_a_name_error_or_state_does_not_execute(filled: tuple[Path, str, str], tab: Page, artifacts: Path) -> None:
    """Markup stored in a run's name, a step's error, the stop reason and a state shows as text and never runs."""
    db, _, marked = filled
    with ui_process(db) as server:
        for path in ("/", f"/runs/{marked}", f"/runs/{marked}/steps/2", f"/runs/{marked}/steps/1", f"/?name={SCRIPT_NAME[:10]}"):
            tab.goto(server.base + path)
            tab.page.wait_for_load_state("load")
            assert tab.page.evaluate("window.pwned") is None, path
            # nothing stored became an element: the page's own script is the only one, and no image or handler
            assert tab.page.locator("script").count() == 1, path
            assert tab.page.locator("img, [onerror], [onload]").count() == 0, path
            if path == f"/runs/{marked}":
                assert tab.page.locator("#run-name").inner_text() == SCRIPT_NAME
                assert SCRIPT_ERROR in tab.page.locator("#steps tr[data-step='2'] td.error").inner_text()
                assert SCRIPT_ERROR in tab.page.locator(".summary .stop").inner_text()
                assert '"note": "' + SCRIPT_STATE.replace('"', '\\"') in tab.page.locator("#state").inner_text()
                tab.page.screenshot(path=str(artifacts / "ui-escaped.png"), full_page=True)
        tab.page.wait_for_timeout(1500)  # a poll of the live part has replaced it by now
        assert tab.page.evaluate("window.pwned") is None
    assert tab.dialogs == []
    assert tab.errors == []
    assert not [m for m in tab.console if "Content Security Policy" in m]  # nothing even tried to run


def test_a_token_link_signs_the_browser_in(filled: tuple[Path, str, str], tab: Page) -> None:
    """With --token, the page without it says what to do; the printed link sets a cookie and every page then opens."""
    db, refine, _ = filled
    with ui_process(db, "--token", "tok-123") as server:
        response = tab.goto(server.base + "/")
        assert response.status == 401
        assert "needs the token" in tab.page.inner_text("body")
        response = tab.goto(server.url)  # http://127.0.0.1:PORT/?token=tok-123
        assert response.status == 200
        assert "token" not in tab.page.url
        tab.page.click(f"a[href='/runs/{refine}']")
        tab.page.wait_for_selector("#steps")
        tab.page.wait_for_timeout(1500)  # the live poll carries the cookie too
        assert tab.page.locator("#steps tbody tr").count() == 12


@pytest.fixture(scope="module")
def many_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A database of 100,000 runs (a fifth nested, some crashed), written with executemany."""
    db = tmp_path_factory.mktemp("many") / "many.db"
    return db, build_many_runs(db, 100_000)


def _server_ms(response: Any) -> float:
    """The server's own time for a response, from its ``Server-Timing: app;dur=MS`` header."""
    m = re.search(r"app;dur=([0-9.]+)", response.headers.get("server-timing", ""))
    assert m, response.headers
    return float(m.group(1))


def test_a_page_of_100k_runs_takes_under_a_second(many_runs: tuple[Path, list[str]], tab: Page, artifacts: Path) -> None:
    """On 100,000 runs, each page of the list (filters, id and name search, older pages) is served in under a second."""
    db, ids = many_runs
    with ui_process(db) as server:
        timings: dict[str, float] = {}

        def visit(label: str, url: str, rows: int | None = 50) -> None:
            response = tab.goto(url)
            assert response.status == 200, label
            timings[label] = _server_ms(response)
            if rows is not None:
                assert tab.page.locator("tr.run").count() == rows, label

        visit("first page", server.base + "/")
        for st in ("completed", "failed", "crashed"):
            visit(f"status {st}", f"{server.base}/?status={st}")
        # every stored "running" run's owner is dead: all are crashed, and finding none reads them all
        visit("status running (none)", f"{server.base}/?status=running", rows=0)
        visit("nested too", f"{server.base}/?nested=1")
        visit("id prefix", f"{server.base}/?id={ids[77_777][:5]}", rows=None)
        assert tab.page.locator(f"tr.run[data-run='{ids[77_777]}']").count() == 1
        visit("name", f"{server.base}/?name=AGENT_16")
        visit("name, no match", f"{server.base}/?name=nobody", rows=0)
        visit("page of 500", f"{server.base}/?n=500", rows=500)
        visit("first page again", server.base + "/")
        shown = [r.get_attribute("data-run") for r in tab.page.locator("tr.run").all()]
        for k in range(5):
            tab.page.click("#older")
            tab.page.wait_for_load_state("load")
            response = tab.page.goto(tab.page.url)  # the same page again, to read its server time
            timings[f"older page {k + 1}"] = _server_ms(response)
            shown += [r.get_attribute("data-run") for r in tab.page.locator("tr.run").all()]
        roots_newest_first = [rid for i, rid in enumerate(ids) if i % 5 != 4][::-1]
        assert shown == roots_newest_first[:300]  # six pages that join up: none twice, none left out
        tab.page.screenshot(path=str(artifacts / "ui-100k.png"))
        slow = {label: ms for label, ms in timings.items() if ms >= PAGE_BUDGET_MS}
        assert not slow, f"pages over {PAGE_BUDGET_MS:.0f} ms: {slow} (all: {timings})"


def test_the_example_run_in_the_browser(tmp_path: Path, tab: Page, artifacts: Path) -> None:
    """examples/watch_in_browser.py, then ``loomc ui``: the editor's steps, its chart, and each critic run in the tree."""
    env = child_env(WATCH_STEP_DELAY="0")
    env.pop("LOOMC_DB", None)
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "watch_in_browser.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    run_id = re.search(r"run ([0-9a-f]{12}): completed after 13 steps", out)
    assert run_id, out
    with ui_process(tmp_path / ".loomc" / "checkpoints.db") as server:
        tab.goto(f"{server.base}/runs/{run_id.group(1)}")
        assert tab.page.locator("#steps tbody tr").count() == 13
        assert tab.page.locator("#status").inner_text() == "completed"
        tree = tab.page.locator("#tree")
        assert tree.locator("a.id").count() == 13  # the editor and twelve critic runs (the failed step called none)
        assert tree.locator("li.current > a.id").inner_text() == run_id.group(1)
        assert tab.page.locator("svg#chart").get_attribute("data-scored") == "12"
        tab.page.screenshot(path=str(artifacts / "ui-example-run.png"), full_page=True)
