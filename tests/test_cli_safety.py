"""What the ``loomc`` command prints from stored text is safe and bounded; long runs print a window."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from loomc import Budget, LastGood, SQLiteStore, loop
from loomc.cli import render as r
from tests.test_cli import assert_user_error, on_terminal, plain, table
from tests.test_cli import loomc as run_loomc

#: A name and an error an attacker could get stored: an OSC retitle ending in BEL, a screen
#: clear, a one-byte C1 CSI, a right-to-left override, rich markup and a zero-width joiner.
EVIL_NAME = "evil\x1b]0;pwned\x07[red]x[/red]\u202eabc"
EVIL_ERROR = "bad \x1b[2J\x1b[31mCLEAR\x9b31m [bold]markup[/bold] \u202eevil\u200d end"
RAW = ("\x1b]", "\x1b[2J", "\x1b[31m", "\x07", "\x9b", "\u202e", "\u200d")
HUGE = 20_000_000


def _no_raw_controls(text: str) -> None:
    for seq in RAW:
        assert seq not in text, (seq, text[:2000])


@pytest.fixture(scope="module")
def evil(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run named and failing with terminal escapes; one with a 20 MB error; scores that are not finite."""
    folder = tmp_path_factory.mktemp("evil")
    db = str(folder / "evil.db")
    calls = {"n": 0}

    @loop(checkpoint=db, budget=Budget(iterations=4), backtrack=LastGood(), scorer=lambda s: 0.5, name=EVIL_NAME)
    def bad(state: dict[str, int]) -> dict[str, int]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError(EVIL_ERROR)
        if calls["n"] == 3:
            raise RuntimeError("E" * HUGE)
        return {"n": state["n"] + 1}

    result = bad.run({"n": 0})
    child_name = "mod\x1b]0;x\x07:f.<locals>.g"

    @loop(checkpoint=db, budget=Budget(iterations=1), name=child_name)
    def local(state: int) -> int:
        return state + 1

    local_run = local.run(0)
    # A score written as infinity, as an older loomc (or another writer) could have stored it.
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE steps SET score = 9e999 WHERE run_id = ? AND step_n = 0", (result.run_id,))
        conn.execute("UPDATE steps SET score = -9e999 WHERE run_id = ? AND step_n = 3", (result.run_id,))
    return {"db": Path(db), "id": result.run_id, "local": local_run.run_id}


# ---------------------------------------------------------------------------------
# One escaping function


def test_visible_escapes_everything_a_terminal_acts_on() -> None:
    """C0, ESC, DEL, C1, bidi controls, zero-width characters and lone surrogates become visible escapes."""
    assert r.visible("a\x1b[31mb\x07c\x7f\x9b\u202e\u2066\u200b\ufeff\n\t\ud800") == (
        "a\\x1b[31mb\\x07c\\x7f\\x9b\\u202e\\u2066\\u200b\\ufeff\\x0a\\x09\\ud800"
    )
    assert r.visible("plain text, [red]markup[/red], é, 日本, emoji 🎉") == "plain text, [red]markup[/red], é, 日本, emoji 🎉"
    cut = r.clip("x" * 1000, 50)
    assert len(cut) == 50
    assert cut.endswith("...")


# ---------------------------------------------------------------------------------
# Every command, plain output


@pytest.mark.parametrize(
    "args",
    [("runs",), ("runs", "--all"), ("show", "{id}"), ("show", "{id}", "--tree"), ("resume", "{id}"), ("watch", "{id}")],
)
def test_stored_escapes_print_escaped(evil: dict[str, Any], args: tuple[str, ...]) -> None:
    """runs, show, show --tree, resume and watch print stored names and errors with escapes made visible."""
    proc = run_loomc(*(a.format(id=evil["id"]) for a in args), db=evil["db"])
    assert proc.returncode == 0, proc.stderr
    _no_raw_controls(proc.stdout + proc.stderr)
    assert r"evil\x1b]0;pwned\x07[red]x[/red]\u202eabc" in proc.stdout
    assert len(proc.stdout) < 20_000


def test_show_escapes_errors_and_cuts_a_huge_one(evil: dict[str, Any]) -> None:
    """The 20 MB error is cut in the table, with a note saying how to see it whole."""
    started = time.monotonic()
    proc = run_loomc("show", evil["id"], db=evil["db"])
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    _, rows = table(proc.stdout, "STEP")
    assert r"RuntimeError: bad \x1b[2J\x1b[31mCLEAR\x9b31m [bold]markup[/bold] ..." in rows[1]
    assert rows[2].split("RuntimeError: ")[1].startswith("EEEE")
    assert "..." in rows[2]
    assert max(len(row) for row in rows) < 200
    assert f"loomc show {evil['id']} --full" in proc.stdout
    assert elapsed < 15


def test_show_full_prints_the_whole_error(evil: dict[str, Any]) -> None:
    """`show --full` prints errors uncut (still escaped)."""
    proc = run_loomc("show", evil["id"], "--full", db=evil["db"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "E" * HUGE in proc.stdout
    _no_raw_controls(proc.stdout)


def test_show_on_a_terminal_neither_obeys_escapes_nor_markup(evil: dict[str, Any]) -> None:
    """On a terminal the rich output keeps stored ESC/BEL/C1/bidi out and shows "[red]" literally."""
    for args in (("show", evil["id"]), ("runs",), ("show", evil["id"], "--tree"), ("resume", evil["id"])):
        out = on_terminal(*args, db=evil["db"])
        _no_raw_controls(out)
        assert "[red]x[/red]" in plain(out), args
    shown = plain(on_terminal("show", evil["id"], db=evil["db"]))
    assert "[bold]markup[/bold]" in shown


def test_error_lines_on_stderr_are_escaped(evil: dict[str, Any]) -> None:
    """An error message quoting a stored name stays one escaped line on stderr."""
    proc = run_loomc("resume", evil["local"], "--run", db=evil["db"])
    err = assert_user_error(proc, "defined inside a function")
    _no_raw_controls(err)
    assert r"mod\x1b]0;x\x07" in err


# ---------------------------------------------------------------------------------
# JSON


def _strict(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"bare {constant} in JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    "args",
    [("show", "{id}", "--json"), ("show", "{id}", "--tree", "--json"), ("runs", "--json"), ("export", "{id}")],
)
def test_json_is_strictly_valid_and_terminal_safe(evil: dict[str, Any], args: tuple[str, ...]) -> None:
    """No bare NaN/Infinity: non-finite numbers are strings; C1 and bidi characters are \\u escapes."""
    proc = run_loomc(*(a.format(id=evil["id"]) for a in args), db=evil["db"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = _strict(proc.stdout)
    _no_raw_controls(proc.stdout)
    runs = data if isinstance(data, list) else [data.get("run", data)]
    assert EVIL_NAME in {d["name"] for d in runs}
    if "history" in runs[0]:
        history = runs[0]["history"]
        assert history[0]["score"] == "Infinity"
        assert history[3]["score"] == "-Infinity"
        assert history[1]["error"] == f"RuntimeError: {EVIL_ERROR}"


def test_dumps_refuses_nothing_and_emits_no_nan() -> None:
    """The CLI's JSON writer turns NaN and infinities into strings, everywhere in the data."""
    text = r.dumps({"a": float("nan"), "b": [float("inf"), {"c": -float("inf")}], "d": 1.5, "e": "x\x9by\u202e"})
    assert _strict(text) == {"a": "NaN", "b": ["Infinity", {"c": "-Infinity"}], "d": 1.5, "e": "x\x9by\u202e"}
    assert "\x9b" not in text
    assert "\u202e" not in text


# ---------------------------------------------------------------------------------
# Long runs


@pytest.fixture(scope="module")
def long_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 3,000-step run (costs 0.001 per step, an error every 500 steps)."""
    db = str(tmp_path_factory.mktemp("long") / "long.db")

    calls = {"n": 0}

    @loop(checkpoint=db, durability="process", budget=Budget(iterations=3000), backtrack=LastGood(), cost_fn=lambda s: 0.001)
    def count(state: dict[str, int]) -> dict[str, int]:
        calls["n"] += 1
        if calls["n"] % 500 == 0:
            raise ValueError(f"call {calls['n']}")
        return {"n": state["n"] + 1}

    result = count.run({"n": 0})
    assert result.steps == 3000
    return {"db": Path(db), "id": result.run_id}


def _step_rows(stdout: str) -> list[list[str]]:
    _, rows = table(stdout, "STEP")
    return [row.split() for row in rows if "not shown:" not in row]  # the notes under the table


def test_show_last_and_first_print_only_those_steps_with_true_cumulative_costs(long_run: dict[str, Any]) -> None:
    """--last N shows the last N steps (CUMUL as in the full table) and says how many were left out."""
    full = _step_rows(run_loomc("show", long_run["id"], db=long_run["db"]).stdout)
    assert len(full) == 3000  # not a terminal: every step by default

    last = run_loomc("show", long_run["id"], "--last", "5", db=long_run["db"])
    assert last.returncode == 0, last.stderr
    assert _step_rows(last.stdout) == full[-5:]
    assert "... 2995 earlier steps not shown" in last.stdout
    assert "--all" in last.stdout

    first = run_loomc("show", long_run["id"], "--first", "3", db=long_run["db"])
    assert _step_rows(first.stdout) == full[:3]
    assert "... 2997 later steps not shown" in first.stdout

    both = run_loomc("show", long_run["id"], "--first", "2", "--last", "2", db=long_run["db"])
    rows = _step_rows(both.stdout)
    assert rows[:2] == full[:2]
    assert rows[2] == ["...", "2996", "steps", "not", "shown"]
    assert rows[3:] == full[-2:]

    data = _strict(run_loomc("show", long_run["id"], "--last", "4", "--json", db=long_run["db"]).stdout)
    assert [h["step"] for h in data["history"]] == [2996, 2997, 2998, 2999]
    assert r.money(data["history"][-1]["cumul_usd"]) == full[-1][2]
    assert data["steps_not_shown"] == 2996


def test_show_on_a_terminal_defaults_to_the_last_steps(long_run: dict[str, Any]) -> None:
    """On a terminal `show` prints the last 50 steps and a note; --all prints them all."""
    out = plain(on_terminal("show", long_run["id"], db=long_run["db"]))
    steps = [int(m.group(1)) for m in re.finditer(r"^\s*(\d+)\s+\$", out, re.MULTILINE)]
    assert steps == list(range(2950, 3000))
    assert "2950 earlier steps not shown: --all shows every step" in out
    everything = plain(on_terminal("show", long_run["id"], "--all", db=long_run["db"]))
    assert len(re.findall(r"^\s*\d+\s+\$", everything, re.MULTILINE)) == 3000


def test_show_all_with_a_window_is_a_usage_error(long_run: dict[str, Any]) -> None:
    """--all and --last/--first contradict each other: exit 2, no traceback."""
    proc = run_loomc("show", long_run["id"], "--all", "--last", "3", db=long_run["db"])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_windowed_reads_never_load_the_whole_run(long_run: dict[str, Any]) -> None:
    """Every query a window makes on the steps table is LIMITed or an aggregate: rows not shown are not read."""
    from loomc.cli.app import _step_rows as window

    store = SQLiteStore(long_run["db"], create=False)
    seen: list[str] = []
    store.conn.set_trace_callback(seen.append)
    rows, before, at, gap, after = window(store, long_run["id"], 2, 3, full=False)
    assert [rec.step_n for rec, _ in rows] == [0, 1, 2997, 2998, 2999]
    assert (before, at, gap, after) == (0, 2, 2995, 0)
    on_steps = [sql for sql in seen if "FROM steps" in sql]
    assert on_steps
    for sql in on_steps:
        assert "LIMIT" in sql or "COUNT(*)" in sql, sql
    store.close()


def test_every_character_escaped_is_one_python_counts_unprintable() -> None:
    """``visible`` returns a printable string as it is: that is safe only if every character it escapes is unprintable."""
    unsafe = [chr(c) for c in range(0x110000) if r._UNSAFE.match(chr(c))]
    assert len(unsafe) > 2000  # C0, C1, bidi, zero-width, separators, surrogates
    assert not [hex(ord(c)) for c in unsafe if c.isprintable()]
    for c in unsafe:
        assert r.visible(f"ok {c} ok") != f"ok {c} ok"
    plain = "run a1b2c3 <- backtrack to step 2  $0.0500 café 日本"
    assert r.visible(plain) is plain
