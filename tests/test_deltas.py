"""Large states stored as zstd keyframes and deltas: compact on disk, every state read back exactly."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loomc import AsyncSQLiteStore, Budget, MemoryStore, SQLiteStore, StateError, loop
from loomc.store.codec import StateEncoder, decode, delta_base, encode
from loomc.store.sqlite.sync import expand_rows

WORDS = ["agent", "loop", "budget", "state", "draft", "review", "plan", "score", "token", "answer", "tool"]


def text(size: int, seed: int) -> str:
    """About ``size`` characters of words."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(size // 6))


def edit(doc: str, seed: int) -> str:
    """Overwrite three words at random places."""
    rng = random.Random(seed)
    for _ in range(3):
        at = rng.randrange(0, len(doc) - 20)
        doc = doc[:at] + rng.choice(WORDS) + doc[at + 6 :]
    return doc


def stored(db: Path) -> list[tuple[int, Any]]:
    """(step_n, stored state) of every step, in order."""
    with sqlite3.connect(db) as c:
        return c.execute(
            "SELECT s.step_n, COALESCE(s.state_blob, (SELECT data FROM blobs WHERE id = s.blob_id)) "
            "FROM steps s ORDER BY s.step_n"
        ).fetchall()


def editing_loop(db: Any, steps: int) -> Any:
    """A loop whose 30 KB state changes three words a step (and counts its steps)."""

    @loop(checkpoint=db, durability="process", budget=Budget(iterations=steps), name="editor")
    def step(s: dict[str, Any]) -> dict[str, Any]:
        return {"doc": edit(s["doc"], s["n"]), "n": s["n"] + 1}

    return step


def expected_states(steps: int, start: str) -> list[dict[str, Any]]:
    out, s = [], {"doc": start, "n": 0}
    for _ in range(steps):
        s = {"doc": edit(s["doc"], s["n"]), "n": s["n"] + 1}
        out.append(s)
    return out


def test_a_slowly_changing_state_is_stored_as_small_deltas(tmp_path: Path) -> None:
    """Most steps are deltas of a few hundred bytes; every state loads back exactly."""
    db = tmp_path / "d.db"
    start = text(30_000, 1)
    res = editing_loop(str(db), 60).run({"doc": start, "n": 0})
    assert res.steps == 60
    rows = stored(db)
    kinds = [bytes(b[:1]) for _, b in rows]
    assert kinds[0] == b"Z"
    assert kinds.count(b"D") >= 50, kinds
    whole = len(json.dumps(expected_states(1, start)[0]))
    per_step = sum(len(b) for _, b in rows) / len(rows)
    assert per_step < 0.1 * whole, (per_step, whole)
    for _, b in rows:  # every delta names a keyframe of the same run, stored before it
        base = delta_base(b)
        if base is not None:
            assert bytes(dict(rows)[base][:1]) == b"Z"
    store = SQLiteStore(db)
    want = expected_states(60, start)
    assert [r.state for r in store.load_steps(res.run_id)] == want
    assert [store.load_state(res.run_id, n) for n in (0, 17, 59)] == [want[0], want[17], want[59]]
    assert [r.state for r in res.history] == want  # the lazily loaded history too


def test_resume_continues_from_a_delta_state(tmp_path: Path) -> None:
    """A run stopped on a delta resumes from exactly that state and ends where an unbroken run does."""
    db = tmp_path / "r.db"
    start = text(30_000, 2)
    first = editing_loop(str(db), 25).run({"doc": start, "n": 0})
    assert delta_base(stored(db)[-1][1]) is not None  # it stopped on a delta
    again = editing_loop(str(db), 25).resume_run(first.run_id, budget=Budget(iterations=40))
    assert again.steps == 40
    assert again.state == expected_states(40, start)[-1]
    assert [r.state for r in SQLiteStore(db).load_steps(first.run_id)] == expected_states(40, start)


def test_memory_and_async_stores_read_deltas(tmp_path: Path) -> None:
    """The memory store and the async store write and read the same encodings."""
    start = text(20_000, 3)
    mem = MemoryStore()
    res = editing_loop(mem, 30).run({"doc": start, "n": 0})
    assert [r.state for r in mem.load_steps(res.run_id)] == expected_states(30, start)
    assert mem.load_state(res.run_id, 29) == expected_states(30, start)[-1]

    @loop(checkpoint=str(tmp_path / "a.db"), durability="process", budget=Budget(iterations=30), name="async-editor")
    async def step(s: dict[str, Any]) -> dict[str, Any]:
        return {"doc": edit(s["doc"], s["n"]), "n": s["n"] + 1}

    async def main() -> Any:
        res = await step.run({"doc": start, "n": 0})
        async with AsyncSQLiteStore(tmp_path / "a.db") as astore:
            return res, await astore.load_steps(res.run_id), await astore.load_state(res.run_id, 13)

    ares, steps, s13 = asyncio.run(main())
    assert ares.steps == 30
    assert [r.state for r in steps] == expected_states(30, start)
    assert s13 == expected_states(30, start)[13]
    assert [bytes(b[:1]) for _, b in stored(tmp_path / "a.db")].count(b"D") >= 20


def test_unrelated_large_states_are_keyframes(tmp_path: Path) -> None:
    """States that share nothing are stored whole (and deltas are not retried on every step)."""
    db = tmp_path / "u.db"

    @loop(checkpoint=str(db), durability="process", budget=Budget(iterations=20), name="noise")
    def step(s: dict[str, Any]) -> dict[str, Any]:
        return {"noise": random.Random(s["n"]).randbytes(8000).hex(), "n": s["n"] + 1}

    res = step.run({"noise": "", "n": 0})
    kinds = [bytes(b[:1]) for _, b in stored(db)]
    assert kinds == [b"Z"] * 20
    assert [r.state["n"] for r in SQLiteStore(db).load_steps(res.run_id)] == list(range(1, 21))


def test_cli_export_writes_whole_states(tmp_path: Path) -> None:
    """`loomc export --json` of a run stored as deltas gives every state in full."""
    db = tmp_path / "e.db"
    start = text(20_000, 4)
    res = editing_loop(str(db), 12).run({"doc": start, "n": 0})
    out = subprocess.run([sys.executable, "-m", "loomc", "export", res.run_id, "--json", "--db", str(db)],
                         capture_output=True, text=True, check=True).stdout
    assert [s["state"] for s in json.loads(out)["run"]["history"]] == expected_states(12, start)


def test_a_missing_keyframe_is_reported(tmp_path: Path) -> None:
    """A delta whose keyframe is gone gives a StateError that says the database is damaged."""
    db = tmp_path / "m.db"
    res = editing_loop(str(db), 5).run({"doc": text(20_000, 5), "n": 0})
    with sqlite3.connect(db) as c:
        c.execute("DELETE FROM steps WHERE step_n = 0")
    with pytest.raises(StateError, match="keyframe that is missing; the database is damaged"):
        SQLiteStore(db).load_state(res.run_id, 3)


def test_0_4_0_zlib_states_still_load(tmp_path: Path) -> None:
    """A state compressed the 0.4.0 way (b"z" + zlib) decodes."""
    state = {"doc": "tide " * 3000}
    assert decode(b"z" + zlib.compress(json.dumps(state).encode()), "json") == state
    assert decode(encode(state), "json") == state


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["edit", "append", "replace", "shrink"]), st.integers(0, 10**6)), min_size=1, max_size=40))
def test_any_sequence_of_states_round_trips(ops: list[tuple[str, int]]) -> None:
    """Whatever the states do (small edits, growth, wholesale change, shrinking below the
    compression threshold), each step's stored form expands back to exactly its JSON."""
    enc = StateEncoder()
    doc = text(8000, 6)
    rows, want = [], []
    for n, (op, seed) in enumerate(ops):
        if op == "edit":
            doc = edit(doc, seed) if len(doc) > 40 else text(8000, seed)
        elif op == "append":
            doc += text(300, seed)
        elif op == "replace":
            doc = random.Random(seed).randbytes(3000).hex()
        else:
            doc = doc[: seed % 3000]
        state = {"doc": doc, "n": n}
        rows.append((n, enc.encode(state, n)))
        want.append(state)
    assert [decode(b, "json") for _, b in expand_rows(rows)] == want


def test_threads_encode_and_read_large_states_at_once(tmp_path: Path) -> None:
    """Eight threads, each running a loop with large states on one file, then reading them back."""
    import threading

    db = tmp_path / "t.db"
    errors: list[BaseException] = []
    results: dict[int, Any] = {}

    def worker(i: int) -> None:
        try:
            start = text(10_000, 100 + i)
            res = editing_loop(str(db), 15).run({"doc": start, "n": 0})
            got = [r.state for r in SQLiteStore(db).load_steps(res.run_id)]
            results[i] = got == expected_states(15, start)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == dict.fromkeys(range(8), True)


def test_a_store_without_delta_support_gets_whole_states() -> None:
    """A store that does not declare supports_deltas is only ever given stand-alone states."""

    class PlainStore(MemoryStore):
        supports_deltas = False

    store = PlainStore()
    start = text(20_000, 8)
    res = editing_loop(store, 10).run({"doc": start, "n": 0})
    blobs = [row.state_blob for row in store._steps[res.run_id].values()]
    assert all(isinstance(b, bytes) and b[:1] == b"Z" for b in blobs)
    assert [r.state for r in store.load_steps(res.run_id)] == expected_states(10, start)
