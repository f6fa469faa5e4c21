"""How fast ``loomc ui`` answers on a large database: the runs list and a run page.

Builds (once, with ``benchmarks/bench_cli.py``'s builder) a database of 100,000 runs and 1,000,000
steps and a 10,000-step run, starts a real ``loomc ui`` process on 127.0.0.1, and times
each page over HTTP: the wall time seen by the client and the server's own time (its
``Server-Timing`` header), median of several requests::

    python benchmarks/bench_ui.py                  # build if missing, then time
    python benchmarks/bench_ui.py --repeat 21

Target (the issue's acceptance check): every page of the list in well under a second.
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_cli import build, build_long_run  # noqa: E402


def fetch(url: str) -> tuple[float, float]:
    """(client wall ms, server ms) of one GET."""
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as resp:
        resp.read()
        server = re.search(r"app;dur=([0-9.]+)", resp.headers.get("server-timing", ""))
    return (time.perf_counter() - t) * 1000, float(server.group(1)) if server else float("nan")


def serve(db: Path) -> tuple[subprocess.Popen[str], str]:
    """A ``loomc ui`` process over ``db`` on a free port, and its address."""
    proc = subprocess.Popen([sys.executable, "-m", "loomc", "ui", "--db", str(db), "--port", "0"],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    return proc, line.split(" at ", 1)[1].split()[0].rstrip("/")


def main() -> None:
    """Build the databases if needed, then print the page timings."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", default="/tmp/loomc-bench-ui.db")
    ap.add_argument("--repeat", type=int, default=11)
    args = ap.parse_args()
    db = Path(args.db)
    if not db.exists():
        build(db, 100_000, 1_000_000)
    long_db = db.with_name(db.stem + "-10k.db")
    long_id = build_long_run(long_db, 10_000)
    with sqlite3.connect(db) as c:
        some_root = c.execute("SELECT id FROM runs WHERE parent_run_id IS NULL ORDER BY created_at DESC LIMIT 1 OFFSET 3").fetchone()[0]
        deep = c.execute("SELECT created_at || '|' || id FROM runs WHERE parent_run_id IS NULL "
                         "ORDER BY created_at LIMIT 1 OFFSET 100").fetchone()[0]
    cases = {
        "/ (newest 50 runs)": "/",
        "/?status=failed": "/?status=failed",
        "/?status=crashed": "/?status=crashed",
        "/?name=agent_16": "/?name=agent_16",
        "/?id=<5 hex>": f"/?id={some_root[:5]}",
        "/?before=<near the oldest>": "/?" + urllib.parse.urlencode({"before": deep}),
        "/?n=500": "/?n=500",
        "/runs/<id> (a run with 10 steps)": f"/runs/{some_root}",
    }
    proc, base = serve(db)
    try:
        width = max(map(len, cases))
        for label, path in cases.items():
            times = [fetch(base + path) for _ in range(args.repeat)]
            wall = statistics.median(t[0] for t in times)
            server = statistics.median(t[1] for t in times)
            print(f"{label.ljust(width)}  client {wall:7.1f} ms   server {server:7.1f} ms")
    finally:
        proc.terminate()
        proc.wait()
    proc, base = serve(long_db)
    try:
        for label, path in {"/runs/<a 10,000-step run> (last 500)": f"/runs/{long_id}",
                            "/runs/<a 10,000-step run>/live": f"/runs/{long_id}/live"}.items():
            times = [fetch(base + path) for _ in range(args.repeat)]
            print(f"{label.ljust(width)}  client {statistics.median(t[0] for t in times):7.1f} ms   "
                  f"server {statistics.median(t[1] for t in times):7.1f} ms")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
