"""``@loop`` refuses strategies that could never act, and warns about a loop nothing bounds."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest

from loomc import BestScore, Budget, Escalate, LastGood, UnboundedLoopWarning, loop, predicate, score_plateau


def _step(state: Any) -> Any:
    return state


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"converge_on": score_plateau(patience=2)}, "score_plateau(patience=2"),
        ({"converge_on": predicate(lambda h: False) | score_plateau()}, "score_plateau("),
        ({"converge_on": predicate(lambda h: False) & score_plateau()}, "score_plateau("),
        ({"backtrack": BestScore()}, "BestScore()"),
        ({"backtrack": [LastGood(), BestScore()]}, "BestScore()"),
        ({"on_stall": Escalate(after=2)}, "Escalate(after=2)"),
    ],
)
def test_score_strategies_without_a_scorer_are_refused_at_decoration(kwargs: dict[str, Any], named: str) -> None:
    """score_plateau, BestScore and Escalate need scores: without scorer= the decorator raises."""
    with pytest.raises(ValueError, match="scorer=") as caught:
        loop(budget=Budget(iterations=5), **kwargs)
    assert named in str(caught.value)


def test_score_strategies_with_a_scorer_converge(db: str) -> None:
    """With scorer= the same decoration is accepted and score_plateau ends the run."""

    @loop(checkpoint=db, converge_on=score_plateau(patience=2), backtrack=BestScore(), on_stall=Escalate(after=5), scorer=lambda s: 0.5)
    def flat(state: dict[str, int]) -> dict[str, int]:
        return {"n": state["n"] + 1}

    assert flat({"n": 0}) == {"n": 3}


def test_strategies_that_need_no_scores_need_no_scorer() -> None:
    """LastGood and predicate detectors decorate without a scorer and without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loop(converge_on=predicate(lambda h: True), backtrack=LastGood())(_step)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"budget": Budget()}, {"budget": None, "backtrack": LastGood()}],
)
def test_a_loop_nothing_bounds_warns_at_decoration(kwargs: dict[str, Any]) -> None:
    """No budget limit and no converge_on: an UnboundedLoopWarning that says how to bound it."""
    with pytest.warns(UnboundedLoopWarning, match=r"budget=Budget\(iterations=") as caught:
        loop(**kwargs)(_step)
    assert issubclass(UnboundedLoopWarning, UserWarning)
    assert caught[0].filename == __file__  # points at the decoration, not into loomc


def test_bare_decorator_warns_at_the_decorated_function() -> None:
    """``@loop`` with no arguments warns too, pointing at the user's file."""
    with pytest.warns(UnboundedLoopWarning, match="_bare") as caught:

        @loop
        def _bare(state: Any) -> Any:
            return state

    assert caught[0].filename == __file__


@pytest.mark.parametrize(
    "kwargs",
    [
        {"budget": Budget(iterations=3)},
        {"budget": Budget(usd=1.0)},
        {"budget": Budget(wall_clock="1m")},
        {"converge_on": predicate(lambda h: True)},
    ],
)
def test_any_bound_silences_the_warning(kwargs: dict[str, Any]) -> None:
    """One budget limit or a detector is enough."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loop(**kwargs)(_step)


def test_the_warning_shows_in_a_plain_script(tmp_path: Path) -> None:
    """Run as a script with default warning filters, the user sees one line naming their file."""
    script = tmp_path / "forever.py"
    script.write_text(
        textwrap.dedent(
            """
            from loomc import loop

            @loop(checkpoint="memory")
            def forever(state):
                return state
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert f"{script}:" in proc.stderr
    assert "UnboundedLoopWarning: @loop forever has no budget limit and no converge_on" in proc.stderr
