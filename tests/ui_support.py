"""What the ``loomc ui`` tests share: a real server (a ``loomc ui`` process, or uvicorn in a thread), runs to show."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from loomc.store.sqlite import sql as _sql

ROOT = Path(__file__).resolve().parents[1]

#: Stored text that would run if the page did not escape it.
SCRIPT_NAME = '<script>window.pwned = "name"</script>agent'
SCRIPT_ERROR = '<img src=x onerror="window.pwned = \'error\'"> boom </td><script>window.pwned = "error2"</script>'
SCRIPT_STATE = '"><svg onload="window.pwned = \'state\'"></svg><script>window.pwned = "state2"</script>'


@dataclass
class Server:
    """A running ``loomc ui``: its address and, when it is a process, the process."""

    url: str
    proc: subprocess.Popen[str] | None = None

    @property
    def base(self) -> str:
        """``http://host:port`` (the printed address without its path and token)."""
        return self.url.split("?")[0].rstrip("/")

    def get(self, path: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> tuple[int, dict[str, str], str]:
        """``(status, headers, body)`` of one request, redirects not followed."""
        req = urllib.request.Request(self.base + path, headers=headers or {}, data=data)
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(req, timeout=30) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read().decode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a ``loomc`` child process: this checkout's code."""
    env = {k: v for k, v in os.environ.items() if k != "LOOMC_UI_TOKEN"}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


@contextmanager
def ui_process(db: Path | str, *args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """``loomc ui --db DB --port 0 ARGS`` as a process; its address is read from the line it prints."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "loomc", "ui", "--db", str(db), "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or child_env(),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"loomc ui did not start: {proc.stderr.read() if proc.stderr else ''}")
        url = line.split(" at ", 1)[1].split()[0]
        yield Server(url, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


@contextmanager
def ui_thread(store: Any, token: str | None = None) -> Iterator[Server]:
    """``create_app(store)`` served by uvicorn in a thread of this process, on 127.0.0.1 and a free port."""
    import uvicorn

    from loomc.ui import create_app
    from loomc.ui._serve import bind

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(store, token), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise AssertionError("the ui server did not start")
            time.sleep(0.02)
        yield Server(f"http://127.0.0.1:{sock.getsockname()[1]}/")
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def build_many_runs(path: Path, n_runs: int, seed: int = 11) -> list[str]:
    """A database of ``n_runs`` runs (a fifth nested, some crashed) written with the real schema; their ids."""
    rng = random.Random(seed)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    for version in range(_sql.SCHEMA_VERSION):
        for stmt in _sql.MIGRATIONS[version].split(";"):
            if stmt.strip() and "loomc_events_v4" not in stmt:
                conn.execute(stmt)
    conn.execute(f"PRAGMA user_version={_sql.SCHEMA_VERSION}")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    statuses = ["completed"] * 6 + ["budget_exhausted", "stalled", "failed", "interrupted", "running"]
    budget = json.dumps({"usd": 5.0, "iterations": 50, "wall_clock": 600.0})
    ids: list[str] = []
    rows = []
    for i in range(n_runs):
        rid = f"{rng.getrandbits(48):012x}"
        ids.append(rid)
        nested = i % 5 == 4
        parent = ids[i - 1] if nested else None
        status = rng.choice(statuses)
        created = (t0 + timedelta(seconds=i * 7)).isoformat(timespec="microseconds")
        rows.append((
            rid, "many0000", status, created, created, f"agents:agent_{i % 17}", "loop", parent, 0 if nested else None,
            0 if nested else None, parent or rid, "json", '{"n":0}', budget, 0.01 * (i % 9), i % 9, 1.0, 0.01, None,
            None if status == "running" else "converged", "elsewhere-host:1:0" if status == "running" else None, None, 1,
        ))
    conn.executemany(
        "INSERT INTO runs (id, spec_hash, status, created_at, updated_at, name, kind, parent_run_id, parent_step, call_index, "
        "root_run_id, state_type, input_blob, budget, cost_usd, steps, wall_s, max_step_cost, next_from, stop_reason, owner, "
        "heartbeat, attempts) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        rows,
    )
    conn.execute("COMMIT")
    conn.close()
    return ids
