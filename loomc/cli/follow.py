"""Following a run as it commits steps: ``loomc watch`` and ``loomc resume --run``.

The follower only reads the database (a separate connection; WAL lets it read while
the run's process writes). On a terminal it draws a rich ``Live`` view; otherwise it
prints each new step as one plain line, and each nested run when its status changes.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from loomc._core.errors import RunNotFound
from loomc._core.types import RunInfo, RunStatus
from loomc.cli import render as r

__all__ = ["Follower"]

#: Rows kept in the live view (older ones scroll away; ``loomc show`` has them all).
LIVE_ROWS = 30


class Follower:
    """Polls one run's steps and nested runs, and shows what is new."""

    def __init__(self, store: Any, run_id: str, out: r.Output | None = None) -> None:
        self.store = store
        self.run_id = run_id
        self.out = out if out is not None else r.Output()
        self.last_step = -1
        self.cumul = 0.0
        self.rows: list[list[str]] = []
        self.kids: dict[str, tuple[str, int]] = {}
        self.kid_infos: list[RunInfo] = []
        self.info: RunInfo | None = None
        self.skipped = 0  # steps before the first one read (never loaded)
        self._live: Any = None
        self._started = False
        self._header_printed = False

    # -- polling ------------------------------------------------------------------
    def poll(self) -> bool:
        """Read what committed since the last poll and show it; True once the run has ended."""
        # Status first, steps second: a run that reads as ended has committed every step.
        info = self.store.get_run(self.run_id)
        if info is None:
            raise RunNotFound(self.run_id, where=str(self.store.path))
        self.info = info
        if not self._started and self.out.tty:
            # A live view keeps only the last rows: read only those, and sum what comes before.
            new = r.read_steps(self.store, self.run_id, last=LIVE_ROWS, error_chars=r.ERROR_READ)
            if new:
                self.skipped, self.cumul = r.step_totals(self.store, self.run_id, new[0].step_n)
        else:
            new = r.read_steps(self.store, self.run_id, self.last_step, error_chars=r.ERROR_READ)
        kids = self.store.children(self.run_id)
        if not self._started:
            self._begin(info)
        for rec in new:
            self.cumul += rec.cost_usd
            cells = r.step_cells(rec, self.cumul)
            self.rows.append(cells)
            if len(self.rows) > 2 * LIVE_ROWS:  # only the live view reads them: keep memory flat
                self.skipped += len(self.rows) - LIVE_ROWS
                del self.rows[:-LIVE_ROWS]
            self.last_step = rec.step_n
            if not self.out.tty:
                if not self._header_printed:
                    self.out.line(r.stream_header())
                    self._header_printed = True
                self.out.line(r.stream_row(cells))
        changed = []
        for k in kids:
            key = (k.status.value, k.steps)
            old = self.kids.get(k.id)
            if old is None or old[0] != key[0]:
                changed.append(k)
            self.kids[k.id] = key
        self.kid_infos = kids
        if not self.out.tty:
            for k in changed:
                node = k.meta.get("node")
                what = f"node {node} ({k.id})" if k.kind == "node" and node else f"nested {k.id} {k.name}"
                self.out.line(f"  {what}: {k.status.value} ({k.steps} steps, {r.money(k.cost_usd)})")
            self.out.flush()
        elif self._live is not None:
            self._live.update(self._view())
        return info.status is not RunStatus.RUNNING

    def _begin(self, info: RunInfo) -> None:
        self._started = True
        if self.out.tty:
            from rich.live import Live

            self._live = Live(self._view(), console=self.out.console, refresh_per_second=8, transient=False)
            self._live.start()
        else:
            self.out.line(f"run {info.id} ({info.name}): {info.status.value}")
            self.out.flush()

    def _view(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        info = self.info
        assert info is not None
        head = Text()
        head.append(f"run {r.visible(info.id)} ", style="bold")
        head.append(f"{r.clip(info.name, 120)}  ")
        head.append(info.status.value, style=r.STATUS_STYLE.get(info.status, ""))
        head.append("\n" + "   ".join(f"{k} {v}" for k, v in r.budget_lines(info)), style="dim")
        parts: list[Any] = [head]
        rows = self.rows[-LIVE_ROWS:]
        earlier = self.skipped + max(0, len(self.rows) - LIVE_ROWS)
        if earlier:
            parts.append(Text(f"... {earlier} earlier steps (loomc show {info.id} --all)", style="dim"))
        if rows:
            parts.append(self.out.rich_table(r.STEP_COLS, rows))
        elif info.kind != "graph":
            parts.append(Text("waiting for the first step to commit ...", style="dim"))
        if self.kid_infos and info.kind == "graph":
            parts.append(
                self.out.rich_table(
                    (r.Col("NODE"), r.Col("STATUS"), r.Col("STEPS", True), r.Col("COST", True), r.Col("RUN")),
                    [
                        [str(k.meta.get("node", k.name)), self.out.status(k.status), str(k.steps), r.money(k.cost_usd), k.id]
                        for k in self.kid_infos
                    ],
                )
            )
        elif self.kid_infos:
            parts.append(
                self.out.rich_table(
                    (r.Col("NESTED"), r.Col("STATUS"), r.Col("STEPS", True), r.Col("COST", True), r.Col("NAME")),
                    [[k.id, self.out.status(k.status), str(k.steps), r.money(k.cost_usd), k.name] for k in self.kid_infos[-10:]],
                )
            )
        return Group(*parts)

    def close(self) -> None:
        """Stop the live view (if any) and print how the run ended."""
        if self._live is not None:
            self._live.update(self._view())
            self._live.stop()
            self._live = None
        info = self.info
        if info is None:
            return
        line = f"run {info.id} {info.status.value}"
        if info.stop_reason:
            line += f": {r.clip(info.stop_reason)}"
        elif info.status is RunStatus.CRASHED:
            line += ": its process died; `loomc resume " + info.id + "` shows how to continue"
        line += f" ({info.steps} steps, {r.money(info.cost_usd)})"
        self.out.line(line)
        self.out.flush()

    # -- drivers ------------------------------------------------------------------
    def run_until_ended(self, interval: float) -> None:
        """Poll every ``interval`` seconds until the run is no longer running."""
        try:
            while not self.poll():
                time.sleep(interval)
        finally:
            self.close()

    def run_until(self, stop: threading.Event, interval: float) -> None:
        """Poll until ``stop`` is set (the caller drives the run in this process)."""
        while not stop.is_set():
            self.poll()
            stop.wait(interval)
