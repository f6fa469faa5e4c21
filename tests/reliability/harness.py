"""Helpers shared by the reliability tests: warm worker processes and database probes."""

from __future__ import annotations

import hashlib
import queue
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from loomc.store.sqlite.sql import STATE_OF

WORKER = Path(__file__).with_name("worker.py")


class Worker:
    """A worker process that has already imported loomc and waits for its ``go`` line."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, bufsize=1, env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def next_line(self, timeout: float = 30.0) -> str | None:
        """The next line the worker printed (``None`` once it exited)."""
        return self.lines.get(timeout=timeout)

    def go(self, db: Path, run_id: str, target: int, jitter: float = 0.004, flavor: str = "sync-power") -> None:
        """Wait until warm, then start (or resume) ``run_id``."""
        assert self.next_line() == "ready"
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"go {db} {run_id} {target} {jitter} {flavor}\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 60.0) -> str:
        """Wait for the ``done`` line and the exit; returns the line's JSON."""
        while True:
            line = self.next_line(timeout)
            if line is None:
                self.proc.wait()
                assert self.proc.stderr is not None
                raise AssertionError(f"worker exited without finishing: {self.proc.stderr.read()[-2000:]}")
            if line.startswith("done "):
                self.proc.wait(timeout)
                return line[5:]

    def kill(self, sig: int) -> None:
        """Send ``sig`` and reap the process."""
        self.proc.send_signal(sig)
        self.proc.wait(30)

    def close(self) -> None:
        """Kill the worker if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._reader.join(10)  # the pipe reaches EOF once the process is gone
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


def committed(db: Path, run_id: str) -> dict[int, tuple[float, str]]:
    """step_n -> (cost, fingerprint of the stored state) for every committed step of ``run_id``."""
    with sqlite3.connect(db) as c:
        # the stored state, inline or in the blobs table
        rows = c.execute(f"SELECT s.step_n, s.cost_usd, {STATE_OF} FROM steps s WHERE s.run_id = ?", (run_id,)).fetchall()
    out: dict[int, tuple[float, str]] = {}
    for n, cost, blob in rows:
        raw = blob.encode() if isinstance(blob, str) else bytes(blob or b"")
        out[n] = (cost, hashlib.sha256(raw).hexdigest()[:16])
    return out


def stored_kinds(db: Path) -> dict[bytes, int]:
    """How many stored large states are keyframes (``b"Z"``) and deltas (``b"D"``)."""
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT substr(data, 1, 1), count(*) FROM blobs GROUP BY 1").fetchall()
    return {bytes(k): n for k, n in rows}


def integrity(db: Path) -> str:
    """``PRAGMA integrity_check`` of the database (``ok`` when sound)."""
    with sqlite3.connect(db) as c:
        return str(c.execute("PRAGMA integrity_check").fetchone()[0])


def run_row(db: Path, run_id: str) -> tuple[Any, ...]:
    """(status, steps, cost_usd) of a run as stored."""
    with sqlite3.connect(db) as c:
        row = c.execute("SELECT status, steps, cost_usd FROM runs WHERE id = ?", (run_id,)).fetchone()
    assert row is not None
    return tuple(row)
