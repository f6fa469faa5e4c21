"""The pure policy core: budget checks and step verdicts, as pure functions of data."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from loomc import BestScore, Budget, Escalate, LastGood, StepRecord, predicate, score_plateau
from loomc._core.policy import Headroom, Policy, RunUsage, after_step, check_budget
from loomc._core.types import RunStatus


def hist(*scores: float | None, errors: tuple[int, ...] = ()) -> list[StepRecord]:
    """A history with the given scores; steps listed in ``errors`` raised."""
    return [
        StepRecord(step_n=i, state={"i": i}, score=s, error="RuntimeError: boom" if i in errors else None)
        for i, s in enumerate(scores)
    ]


def test_iterations_limit_stops_at_cap() -> None:
    """A step starts only while iterations_used < iterations."""
    b = Budget(iterations=3)
    assert check_budget(b, RunUsage(iterations=2)) is None
    stop = check_budget(b, RunUsage(iterations=3))
    assert stop is not None
    assert (stop.status, stop.limit, stop.used, stop.cap) == (RunStatus.BUDGET_EXHAUSTED, "iterations", 3, 3)


def test_usd_uses_largest_step_cost_as_estimate() -> None:
    """A step starts only if spent + the largest step cost so far fits the cap."""
    b = Budget(usd=1.0)
    assert check_budget(b, RunUsage(usd=0.7, max_step_cost=0.3)) is None
    stop = check_budget(b, RunUsage(usd=0.71, max_step_cost=0.3))
    assert stop is not None
    assert stop.limit == "usd"


def test_first_step_estimate_is_zero() -> None:
    """Before any step the estimate is 0, so the first step may start at any cap."""
    assert check_budget(Budget(usd=0.0), RunUsage()) is None


def test_wall_clock_limit() -> None:
    """Active time at or past the limit stops the run."""
    b = Budget(wall_clock="10s")
    assert check_budget(b, RunUsage(wall_s=9.99)) is None
    stop = check_budget(b, RunUsage(wall_s=10.0))
    assert stop is not None
    assert stop.limit == "wall_clock"


def test_ancestor_headroom_caps_the_child() -> None:
    """A child may not start a step its ancestors cannot afford, and the stop names the ancestor."""
    b = Budget(usd=10.0)
    outer = Headroom(usd=0.05, usd_owner="parent123456", usd_cap=1.0)
    assert check_budget(b, RunUsage(max_step_cost=0.05), outer) is None
    stop = check_budget(b, RunUsage(max_step_cost=0.06), outer)
    assert stop is not None
    assert stop.owner == "parent123456"
    assert stop.limit == "usd"


def test_ancestor_deadline_passed() -> None:
    """An ancestor out of wall clock stops the child too."""
    stop = check_budget(Budget(), RunUsage(), Headroom(wall_s=0.0, wall_owner="p"))
    assert stop is not None
    assert stop.limit == "wall_clock"


def test_error_without_last_good_fails() -> None:
    """A raising step fails the run when no LastGood is configured."""
    v = after_step(Policy.build(None, None, None, None), hist(0.1, None, errors=(1,)), start_from=0, attempt_start=0)
    assert v.stop is not None
    assert v.stop.status is RunStatus.FAILED
    assert v.next_from == 0


def test_last_good_restores_then_fails_after_max() -> None:
    """LastGood restores the step's starting state until max_consecutive_errors in a row."""
    pol = Policy.build(None, None, LastGood(max_consecutive_errors=2), None)
    v1 = after_step(pol, hist(0.5, None, errors=(1,)), start_from=0, attempt_start=0)
    assert v1.stop is None
    assert v1.next_from == 0
    assert v1.event == "backtrack to step 0"
    v2 = after_step(pol, hist(0.5, None, None, errors=(1, 2)), start_from=0, attempt_start=0)
    assert v2.stop is not None
    assert v2.stop.status is RunStatus.FAILED


def test_best_score_backtracks_below_best() -> None:
    """A score below the best so far sends the next step back to the best step."""
    pol = Policy.build(None, None, BestScore(), None)
    v = after_step(pol, hist(0.3, 0.9, 0.4), start_from=1, attempt_start=0)
    assert v.next_from == 1
    assert v.event == "backtrack to step 1"
    assert after_step(pol, hist(0.3, 0.9, 0.9), start_from=1, attempt_start=0).next_from == 2


def test_converged_and_backtrack_both_marked() -> None:
    """A step can both backtrack and converge; the final state is the best one."""
    pol = Policy.build(None, score_plateau(patience=2), BestScore(), None)
    v = after_step(pol, hist(0.5, 0.9, 0.8, 0.85), start_from=1, attempt_start=0)
    assert v.event == "backtrack to step 1; converged"
    assert v.next_from == 1
    assert v.stop is not None
    assert v.stop.status is RunStatus.COMPLETED


def test_stall_window_restarts_on_resume() -> None:
    """Escalate counts only the scored steps since the attempt started."""
    pol = Policy.build(None, None, None, Escalate(after=3))
    h = hist(0.5, 0.5, 0.5, 0.5)
    assert after_step(pol, h, start_from=2, attempt_start=0).stop is not None
    assert after_step(pol, h, start_from=2, attempt_start=2).stop is None
    v = after_step(pol, hist(0.5, 0.5, 0.5, 0.5, 0.5), start_from=3, attempt_start=2)
    assert v.stop is not None
    assert v.stop.status is RunStatus.STALLED


def test_detectors_compose() -> None:
    """`a | b` stops when either does, `a & b` when both do, plain callables allowed."""
    long_enough = predicate(lambda h: len(h) >= 3)
    plateau = score_plateau(patience=2)
    h = hist(0.9, 0.9, 0.9)
    assert (long_enough & plateau)(h)
    assert not (long_enough & plateau)(hist(0.1, 0.5, 0.9))
    assert (long_enough | plateau)(hist(0.1, 0.5, 0.9))
    assert ((lambda h: False) | long_enough)(h)
    assert repr(long_enough | plateau).endswith("score_plateau(patience=2, min_delta=0.01)")


@given(
    costs=st.lists(st.floats(min_value=0.0, max_value=0.5, allow_nan=False), min_size=1, max_size=40),
    cap=st.floats(min_value=0.0, max_value=3.0, allow_nan=False),
)
@settings(max_examples=150, deadline=None)
def test_known_costs_never_cross_the_cap(costs: list[float], cap: float) -> None:
    """Simulated runs: when each step's cost is at most the estimate, spend never crosses the cap."""
    budget = Budget(usd=cap)
    used = RunUsage()
    for c in costs:
        if check_budget(budget, used) is not None:
            break
        c = min(c, used.max_step_cost) if used.iterations else c  # cost known in advance: <= estimate
        if used.iterations == 0 and c > cap:
            break  # the first step's cost is unknown before it runs
        used = RunUsage(used.usd + c, used.iterations + 1, 0.0, max(used.max_step_cost, c))
    assert used.usd <= cap + 1e-9


# -- detectors read a growing history incrementally; they must decide as a full scan does ---


def _plateau_by_scan(h: list[StepRecord], patience: int, min_delta: float) -> bool:
    scores = [r.score for r in h if r.score is not None and r.error is None]
    if len(scores) < patience + 1:
        return False
    best = max(scores[:-patience])
    return all(s - best < min_delta for s in scores[-patience:])


def _best_target_by_scan(h: list[StepRecord]) -> int | None:
    last = h[-1]
    if last.error is not None or last.score is None:
        return None
    best_n, best = None, None
    for r in h[:-1]:
        if r.score is not None and r.error is None and (best is None or r.score > best):
            best_n, best = r.step_n, r.score
    return best_n if best is not None and last.score < best else None


def _stalled_by_scan(h: list[StepRecord], after: int, since: int) -> bool:
    scored = [r for r in h if r.score is not None and r.error is None]
    if len([r for r in scored if r.step_n >= since]) < after:
        return False
    before = [r.score for r in scored[:-after]]
    return bool(before) and all(r.score <= max(before) for r in scored[-after:])  # type: ignore[operator]


@given(
    steps=st.lists(st.tuples(st.sampled_from([None, 0.1, 0.2, 0.5, 0.5, 0.9]), st.booleans()), min_size=1, max_size=40),
    patience=st.integers(1, 4),
    since=st.integers(0, 30),
    resumed_at=st.integers(0, 40),
)
@settings(max_examples=150, deadline=None)
def test_incremental_detectors_decide_as_a_full_scan(
    steps: list[tuple[float | None, bool]], patience: int, since: int, resumed_at: int
) -> None:
    """Called after every step on the engine's growing RunHistory — including one whose earlier
    steps are read in front of it later, as a resumed run's are — score_plateau, BestScore
    and Escalate give what a scan of the whole list gives, and so they do on a plain list."""
    from loomc._core.types import RunHistory

    records = [StepRecord(step_n=i, score=s, error="E: x" if failed else None) for i, (s, failed) in enumerate(steps)]
    plateau, best, stall = score_plateau(patience=patience, min_delta=0.05), BestScore(), Escalate(after=patience)
    cut = min(resumed_at, len(records) - 1)
    grown = RunHistory(records[cut:cut + 1])  # a resumed run: its last step first, the rest read later
    for i in range(cut + 1, len(records) + 1):
        if i == cut + 2 or (i == len(records) and cut):
            grown[:0] = records[: grown[0].step_n]  # the earlier steps, read in front
        for h in (grown, list(grown)):
            assert plateau(h) == _plateau_by_scan(list(h), patience, 0.05)
            assert best.target(h) == _best_target_by_scan(list(h))
            assert stall.stalled(h, since) == _stalled_by_scan(list(h), patience, since)
        if i < len(records):
            grown.append(records[i])
