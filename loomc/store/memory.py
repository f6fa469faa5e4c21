"""The memory store (``checkpoint="memory"``): a real store of dicts, for tests and throwaway runs."""

from __future__ import annotations

import bisect
import threading
from datetime import datetime
from typing import Any

from loomc._core.errors import LoomcError, RunNotFound
from loomc._core.holds import HeldCharge, charge_record
from loomc._core.types import RunInfo, RunStatus, StepRecord
from loomc.store import core
from loomc.store.codec import decode, delta_base, encode, expand
from loomc.store.core import StateLoader, expand_rows, history_record, meta_record, now_iso
from loomc.store.protocol import (
    NewRun,
    PruneReport,
    Question,
    ResumePoint,
    SchemaInfo,
    StepRow,
    StoredInput,
    StoredStep,
    WaitRow,
    new_run_id,
)

__all__ = ["MemoryStore"]

_MEMORY_WHERE = "this memory store"
_MEMORY_HINT = (
    "runs in a memory store live only in the process (and the loop or store object) that ran them; "
    'use checkpoint="sqlite" or a file path to resume a run later or from another process'
)


class MemoryStore:
    """A store that keeps runs in memory (``checkpoint="memory"``): nothing survives the process."""

    supports_deltas = True

    def __init__(self) -> None:
        self._runs: dict[str, dict[str, Any]] = {}
        self._steps: dict[str, dict[int, StepRow]] = {}
        self._holds: dict[int, tuple[str, float]] = {}  # hold id -> (run id, usd)
        self._questions: dict[tuple[str, int, int], Question] = {}
        self._lock = threading.RLock()
        self.path = None
        self.db_path = ":memory:"
        self.durability = "process"

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._runs)} runs)"

    def _info(self, r: dict[str, Any]) -> RunInfo:
        status = RunStatus(r["status"])
        return RunInfo(
            id=r["id"], spec_hash=r["spec_hash"], status=status, created_at=r["created_at"],
            updated_at=r["updated_at"], name=r["name"], kind=r["kind"], parent_run_id=r["parent_run_id"],
            cost_usd=r["cost_usd"], steps=r["steps"], parent_step=r["parent_step"], call_index=r["call_index"],
            wall_s=r["wall_s"], max_step_cost=r["max_step_cost"], budget=dict(r["budget"] or {}),
            stop_reason=r["stop_reason"], owner=r["owner"], meta=dict(r["meta"] or {}),
            forked_from=r.get("forked_from"), forked_step=r.get("forked_step"),
        )

    def create_run(self, spec_hash: str, **kwargs: Any) -> str:
        """Create a run and return its id."""
        return self.begin_run(NewRun(spec_hash=spec_hash, **kwargs))

    def begin_run(self, new: NewRun) -> str:
        """Create a run from ``new``."""
        run_id = new.run_id or new_run_id()
        now = now_iso()
        with self._lock:
            if run_id in self._runs:
                raise LoomcError(
                    f"run id {run_id!r} already exists in this memory store; resume it or choose another id"
                )
            self._runs[run_id] = {
                "id": run_id, "spec_hash": new.spec_hash, "status": RunStatus.RUNNING.value,
                "created_at": now, "updated_at": now, "name": new.name, "kind": new.kind,
                "parent_run_id": new.parent_run_id, "parent_step": new.parent_step,
                "call_index": new.call_index, "state_type": new.state_type, "input_blob": new.input_blob,
                "budget": new.budget, "cost_usd": new.cost_usd, "steps": 0, "wall_s": 0.0, "max_step_cost": 0.0,
                "next_from": None, "stop_reason": None, "owner": new.owner, "meta": new.meta,
            }
            self._steps[run_id] = {}
        return run_id

    def get_run(self, run_id: str) -> RunInfo | None:
        """The run with exactly this id, or ``None``."""
        with self._lock:
            r = self._runs.get(run_id)
            return self._info(r) if r else None

    def resolve(self, run_id: str) -> str:
        """The full id for an id or unique prefix."""
        with self._lock:
            ids = sorted(self._runs)
        found = core.match_prefix(run_id, [i for i in ids if i.startswith(run_id)] if run_id else [])
        if found is not None:
            return found
        # The same candidates as the SQL stores: the ids next to it, then the newest runs.
        with self._lock:
            newest = sorted(self._runs.values(), key=lambda r: (r["created_at"], r["id"]), reverse=True)
        i = bisect.bisect_left(ids, run_id)
        pool = [*ids[max(0, i - 3) : i], *ids[i : i + 3], *(r["id"] for r in newest[: core.NEAREST_POOL])]
        raise RunNotFound(run_id, core.nearest(run_id, pool), _MEMORY_WHERE, hint=_MEMORY_HINT)

    def list_runs(self, *, status: str | None = None, limit: int | None = None, roots_only: bool = False) -> list[RunInfo]:
        """Runs newest first."""
        with self._lock:
            runs = [self._info(r) for r in self._runs.values()]
        runs.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        st = status.value if isinstance(status, RunStatus) else status
        runs = [r for r in runs if (not roots_only or r.parent_run_id is None) and (st is None or r.status.value == st)]
        return runs[:limit] if limit is not None else runs

    def search_runs(
        self, *, status: str | None = None, roots_only: bool = False, id_prefix: str | None = None,
        name: str | None = None, before: tuple[str, str] | None = None, limit: int = 50,
    ) -> list[RunInfo]:
        """A page of runs, newest first (see :class:`~loomc.store.protocol.RunSearch`)."""
        return core.page_of(self.list_runs(), status=status, roots_only=roots_only, id_prefix=id_prefix, name=name,
                            before=before, limit=limit)

    def update_run_status(self, run_id: str, status: RunStatus | str) -> None:
        """Set a run's status."""
        with self._lock:
            self._runs[run_id]["status"] = RunStatus(status).value

    def acquire(self, run_id: str, owner: str, budget: dict[str, Any] | None = None) -> None:
        """Take the run's lease."""
        with self._lock:
            r = self._runs.get(run_id)
            if r is None:
                raise RunNotFound(run_id, where=_MEMORY_WHERE, hint=_MEMORY_HINT)
            r.update(status=RunStatus.RUNNING.value, owner=owner, stop_reason=None)
            if budget is not None:
                r["budget"] = budget

    def commit_step(self, run_id: str, row: StepRow) -> None:
        """Record one step and the run's totals (the cost increase rolled up to its ancestors)."""
        with self._lock:
            if row.ancestors:
                rise = row.total_cost - self._runs[run_id]["cost_usd"]
                for up in row.ancestors:
                    if up in self._runs:
                        self._runs[up]["cost_usd"] = round(self._runs[up]["cost_usd"] + rise, 12)
            self._steps[run_id][row.step_n] = row
            if row.holds:
                for hold_id in row.holds:
                    self._holds.pop(hold_id, None)
            self._runs[run_id].update(
                cost_usd=row.total_cost, steps=row.total_steps, wall_s=row.total_wall_s,
                max_step_cost=row.max_step_cost, next_from=row.next_from, status=row.status,
                stop_reason=row.stop_reason, updated_at=row.timestamp,
            )

    def finish_run(self, run_id: str, status: RunStatus, stop_reason: str | None, wall_s: float) -> None:
        """Record how an attempt ended."""
        with self._lock:
            r = self._runs[run_id]
            r.update(status=status.value, stop_reason=stop_reason, wall_s=max(r["wall_s"], wall_s), updated_at=now_iso())

    def set_meta(self, run_id: str, meta: dict[str, Any]) -> None:
        """Replace the run's metadata."""
        with self._lock:
            self._runs[run_id]["meta"] = dict(meta)

    def add_cost(self, run_id: str, usd: float) -> None:
        """Add to a run's total cost outside a step."""
        with self._lock:
            self._runs[run_id]["cost_usd"] += usd

    def put_hold(self, run_id: str, hold_id: int, usd: float) -> None:
        """Keep a reservation of ``run_id`` until the step that made it commits."""
        with self._lock:
            self._holds[hold_id] = (run_id, usd)

    def drop_holds(self, hold_ids: tuple[int, ...]) -> None:
        """Delete holds whose spending is recorded by now."""
        with self._lock:
            for hold_id in hold_ids:
                self._holds.pop(hold_id, None)

    def charge_holds(self, run_id: str) -> HeldCharge | None:
        """Charge the holds left by ``run_id`` and the runs below it to ``run_id`` (see ``SQLiteStore``)."""
        with self._lock:
            tree, frontier = {run_id}, [run_id]
            while frontier:
                kids = [r["id"] for r in self._runs.values() if r["parent_run_id"] in frontier]
                frontier = [k for k in kids if k not in tree]
                tree.update(frontier)
            found = [(h, usd) for h, (rid, usd) in self._holds.items() if rid in tree]
            if not found:
                return None
            charge = HeldCharge(round(sum(usd for _, usd in found), 12), len(found), now_iso())
            for hold_id, _ in found:
                del self._holds[hold_id]
            run = self._runs[run_id]
            run["meta"] = charge_record(run["meta"], charge)
            run["updated_at"] = charge.at
            up: dict[str, Any] | None = run
            while up is not None:  # the run and every run above it
                up["cost_usd"] = round(up["cost_usd"] + charge.usd, 12)
                up = self._runs.get(up["parent_run_id"]) if up["parent_run_id"] else None
            return charge

    def save_step(self, run_id: str, record: StepRecord) -> None:
        """Write a step record (loomc 0.3.0 API)."""
        with self._lock:
            info = self.get_run(run_id)
            if info is None:
                raise RunNotFound(run_id, where=_MEMORY_WHERE, hint=_MEMORY_HINT)
            self.commit_step(run_id, core.legacy_step_row(info, record, encode(record.state)))

    def stored_steps(self, run_id: str) -> list[StoredStep]:
        """Every step of the run with its state as stored (deltas made whole), in order."""
        with self._lock:
            rows = sorted(self._steps.get(run_id, {}).values(), key=lambda s: s.step_n)
        whole = expand_rows([(r.step_n, r.state_blob) for r in rows], run_id, "the memory store")
        return [
            StoredStep(r.step_n, w[1], r.cost_usd, r.score, r.timestamp, r.error, r.event)
            for r, w in zip(rows, whole, strict=True)
        ]

    def load_steps(self, run_id: str) -> list[StepRecord]:
        """Every step of the run, states included."""
        with self._lock:
            ref = self._runs[run_id]["state_type"] if run_id in self._runs else "json"
        return [
            StepRecord(s.step_n, decode(s.state, ref), s.cost_usd, s.score, datetime.fromisoformat(s.timestamp), s.error, s.event)
            for s in self.stored_steps(run_id)
        ]

    def stored_input(self, run_id: str) -> StoredInput | None:
        """The run's input as stored, its state type and next start (``None``: no such run)."""
        with self._lock:
            r = self._runs.get(run_id)
            return StoredInput(r["state_type"], r["input_blob"], r["next_from"]) if r else None

    def stored_state(self, run_id: str, step_n: int) -> str | bytes | None:
        """A step's state as stored, a delta made whole (``None``: no such step)."""
        with self._lock:
            if step_n not in self._steps.get(run_id, {}):
                return None
            return self._whole(run_id, step_n)  # type: ignore[no-any-return]

    def load_state(self, run_id: str, step_n: int) -> Any:
        """The state a step committed (``-1``: the input)."""
        with self._lock:
            r = self._runs.get(run_id)
            if r is None:
                raise RunNotFound(run_id, where=_MEMORY_WHERE, hint=_MEMORY_HINT)
            blob = r["input_blob"] if step_n < 0 else self._whole(run_id, step_n)
            return decode(blob, r["state_type"])

    def _whole(self, run_id: str, step_n: int) -> Any:
        """A committed step's stored state, a delta made whole."""
        steps = self._steps[run_id]
        row = steps.get(step_n)
        if row is None or row.state_blob is None:
            raise core.missing_state(run_id, step_n, "the memory store", row=row is not None)
        blob = row.state_blob
        base = delta_base(blob)
        if base is None or isinstance(blob, str):
            return blob
        key = steps.get(base)
        return expand(blob, key.state_blob if key is not None else None)

    def resume_point(self, run_id: str) -> ResumePoint:
        """The run's info, its history and the state to start from."""
        with self._lock:
            r = self._runs.get(run_id)
            if r is None:
                raise RunNotFound(run_id, where=_MEMORY_WHERE, hint=_MEMORY_HINT)
            rows = sorted(self._steps[run_id].values(), key=lambda s: s.step_n)
            core.check_last_step(run_id, r["steps"], rows[-1].step_n if rows else None, "the memory store")
            next_from = r["next_from"] if r["next_from"] is not None else (rows[-1].step_n if rows else -1)
            blob = r["input_blob"] if next_from < 0 else self._whole(run_id, next_from)
            info = self._info(r)
            state_type = r["state_type"]
            first_open = rows[-1].step_n + 1 if rows else 0
            in_flight = sum(
                k["cost_usd"] for k in self._runs.values()
                if k["parent_run_id"] == run_id and k["parent_step"] is not None and k["parent_step"] >= first_open
            )
        loader = StateLoader(self, run_id)
        history = [history_record((s.step_n, s.cost_usd, s.score, s.timestamp, s.error, s.event), loader) for s in rows]
        return ResumePoint(info, state_type, blob, next_from, history, in_flight_usd=in_flight)

    def step_history(self, run_id: str, before: int) -> list[StepRecord]:
        """The run's steps numbered below ``before``, in order."""
        return [h for h in self.resume_point(run_id).history if h.step_n < before]

    def step_window(
        self, run_id: str, after: int = -1, *, first: int | None = None, last: int | None = None,
        error_chars: int | None = None,
    ) -> list[StepRecord]:
        """Step metadata (no state) in step order (see ``SQLiteStore.step_window``)."""
        with self._lock:
            rows = sorted(self._steps.get(run_id, {}).values(), key=lambda s: s.step_n)
        if last is not None:
            rows = [r for r in rows[-last:] if r.step_n > after] if last > 0 else []
        else:
            rows = [r for r in rows if r.step_n > after]
            rows = rows[:first] if first is not None and first >= 0 else rows
        return [
            meta_record((r.step_n, r.cost_usd, r.score, r.timestamp, _cut(r.error, error_chars), r.event))
            for r in rows
        ]

    def step_totals(self, run_id: str, before: int) -> tuple[int, float]:
        """``(steps, cost)`` of a run's steps numbered below ``before``."""
        with self._lock:
            rows = [r for r in self._steps.get(run_id, {}).values() if r.step_n < before]
        return len(rows), float(sum(r.cost_usd for r in rows))

    def renew_leases(self, owner: str, run_ids: list[str]) -> None:
        """Nothing to renew: a memory store's runs die with their process."""

    def schema_info(self) -> SchemaInfo:
        """A memory store has no schema to migrate: always the current one."""
        from loomc.store.sqlite.sql import READS_FROM, SCHEMA_VERSION

        return SchemaInfo(SCHEMA_VERSION, READS_FROM, SCHEMA_VERSION)

    def find_child(self, parent_run_id: str, parent_step: int, call_index: int) -> RunInfo | None:
        """The child run keyed by (parent, parent step, call order)."""
        with self._lock:
            for r in self._runs.values():
                if (r["parent_run_id"], r["parent_step"], r["call_index"]) == (parent_run_id, parent_step, call_index):
                    return self._info(r)
        return None

    def children(self, run_id: str) -> list[RunInfo]:
        """Direct child runs in call order."""
        with self._lock:
            kids = [self._info(r) for r in self._runs.values() if r["parent_run_id"] == run_id]
        return sorted(kids, key=lambda r: (r.parent_step or 0, r.call_index or 0, r.created_at))

    def close(self) -> None:
        """Nothing to close."""

    # -- a run's whole life: questions, forks, pruning ----------------------------------
    def _tree(self, run_id: str) -> list[str]:
        """``run_id`` and every run below it."""
        tree, frontier = [run_id], [run_id]
        while frontier:
            frontier = [r["id"] for r in self._runs.values() if r["parent_run_id"] in frontier and r["id"] not in tree]
            tree.extend(frontier)
        return tree

    def questions(self, run_id: str, tree: bool = False) -> list[Question]:
        """The questions the run's steps asked (``tree``: and those of the runs below it)."""
        with self._lock:
            ids = set(self._tree(run_id)) if tree else {run_id}
            found = [q for q in self._questions.values() if q.run_id in ids]
        if tree:
            return sorted(found, key=lambda q: (q.asked_at, q.run_id))
        return sorted(found, key=lambda q: (q.step_n, q.call_index))

    def wait_for_input(self, run_id: str, row: WaitRow) -> None:
        """Stop the run to wait for an answer (see ``SQLiteStore.wait_for_input``)."""
        now = now_iso()
        with self._lock:
            run = self._runs[run_id]
            rise = row.total_cost - run["cost_usd"]
            for up in row.ancestors:
                if up in self._runs:
                    self._runs[up]["cost_usd"] = round(self._runs[up]["cost_usd"] + rise, 12)
            run.update(cost_usd=row.total_cost, status=RunStatus.WAITING.value, stop_reason=row.reason,
                       wall_s=max(run["wall_s"], row.wall_s), updated_at=now)
            if row.question is not None:
                q = row.question._replace(run_id=run_id, asked_at=now, answer=None, answered_at=None)
                self._questions[(run_id, q.step_n, q.call_index)] = q
            for hold_id in row.holds or ():
                self._holds.pop(hold_id, None)

    def answer(self, question: Question, answer: str) -> None:
        """Store the answer (JSON text) to ``question``; an answer already given is never replaced."""
        key = (question.run_id, question.step_n, question.call_index)
        with self._lock:
            q = self._questions.get(key)
            if q is None:
                raise LoomcError(f"run {question.run_id} has no question at step {question.step_n} in this memory store")
            if q.answer is not None:
                raise LoomcError(
                    f"the question of run {question.run_id} at step {question.step_n} was already answered "
                    f"({q.answered_at}); resume the run"
                )
            self._questions[key] = q._replace(answer=answer, answered_at=now_iso())

    def fork(
        self, run_id: str, at_step: int, *, new_run_id: str, state_blob: str | bytes | None = None,
        budget: dict[str, Any] | None = None,
    ) -> str:
        """Make run ``new_run_id`` from the history of ``run_id`` up to ``at_step`` (see ``core.fork``)."""
        with self._lock:
            src = self._runs.get(run_id)
            if src is None:
                raise RunNotFound(run_id, where=_MEMORY_WHERE, hint=_MEMORY_HINT)
            core.refuse_fork(self._info(src))
            steps = self._steps[run_id]
            if not steps:
                raise LoomcError(f"run {run_id} has no committed step to fork from; run or resume it first")
            last = max(steps)
            if isinstance(at_step, bool) or not isinstance(at_step, int) or not 0 <= at_step <= last:
                raise ValueError(f"at_step={at_step!r}: run {run_id} has steps 0..{last}; fork at one of them")
            if new_run_id in self._runs:
                raise LoomcError(f"run id {new_run_id!r} already exists in this memory store; choose another id")
            rows = {n: row for n, row in steps.items() if n <= at_step}
            if len(rows) != at_step + 1:
                raise core.missing_state(run_id, at_step, "the memory store", row=False)
            if state_blob is not None:  # (rows are never changed once committed: a new one for the fork)
                from dataclasses import replace

                rows[at_step] = replace(rows[at_step], state_blob=state_blob)
            stored_next = rows[at_step].next_from
            now = now_iso()
            self._runs[new_run_id] = {
                **src, "id": new_run_id, "status": RunStatus.INTERRUPTED.value, "created_at": now, "updated_at": now,
                "budget": budget if budget is not None else src["budget"],
                "cost_usd": round(sum(r.cost_usd for r in rows.values()), 12), "steps": len(rows),
                "wall_s": sum(r.duration_s for r in rows.values()),
                "max_step_cost": max(r.cost_usd for r in rows.values()),
                "next_from": at_step if state_blob is not None or stored_next is None else stored_next,
                "stop_reason": f"forked from run {run_id} at step {at_step}; resume it to continue",
                "owner": None, "forked_from": run_id, "forked_step": at_step,
            }
            self._steps[new_run_id] = rows
        return new_run_id

    def prune(
        self, *, older_than: Any = None, status: str | list[str] | None = None, name: str | None = None,
        keep_last: int | None = None, dry_run: bool = False, now: float | None = None,
    ) -> PruneReport:
        """Delete whole run trees that match, never a running or waiting one (see ``SQLiteStore.prune``)."""
        import time

        request = core.prune_request(older_than, status, name, keep_last, now)
        with self._lock:
            roots = [self._info(r) for r in self._runs.values() if r["parent_run_id"] is None]
            chosen = core.prune_choice(request, roots, request.now or time.time())
            report = PruneReport(roots=[], dry_run=dry_run)
            for root in chosen:
                tree = self._tree(root.id)
                if any(self._runs[i]["status"] in core.KEEP_STATUSES for i in tree):
                    report.skipped.append(root.id)
                    continue
                report.roots.append(root)
                report.runs += len(tree)
                for i in tree:
                    rows = self._steps.get(i, {})
                    report.steps += len(rows)
                    report.bytes_freed += sum(len(r.state_blob or "") for r in rows.values())
                    keys = [k for k in self._questions if k[0] == i]
                    report.questions += len(keys)
                    if not dry_run:
                        for k in keys:
                            del self._questions[k]
                        self._steps.pop(i, None)
                        self._runs.pop(i, None)
                        for hold_id in [h for h, (rid, _) in self._holds.items() if rid == i]:
                            del self._holds[hold_id]
        return report


#


def _cut(text: str | None, chars: int | None) -> str | None:
    return text if text is None or chars is None else text[:chars]
