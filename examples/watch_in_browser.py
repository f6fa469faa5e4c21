"""Watch a run in the browser while it runs: an editor loop that calls a critic loop each step.

    pip install 'loomc[ui]'
    python examples/watch_in_browser.py            # terminal 1: runs for about 15 seconds
    loomc ui                                       # terminal 2: open the link it prints

Both commands use the default database (``.loomc/checkpoints.db`` here, or ``$LOOMC_DB``).
Open the run from the list: new steps appear as they commit, the chart of score and
cumulative cost grows, and the run tree shows each critic run under the editor step that
called it. One step fails on purpose (a flaky tool), and ``LastGood`` carries on from the
last good draft; ``BestScore`` backtracks when a revision scores worse than the best.

``WATCH_STEP_DELAY`` sets the seconds each step takes (default 0.6; 0 runs it at once).
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

from loomc import BestScore, Budget, LastGood, loop, score_plateau

DELAY = float(os.environ.get("WATCH_STEP_DELAY", "0.6"))
#: How good the draft is after each call of the editor, in order (the third call fails instead).
QUALITY = [0.31, 0.42, None, 0.55, 0.52, 0.64, 0.71, 0.69, 0.78, 0.83, 0.835, 0.84, 0.84, 0.84, 0.84]
_calls = itertools.count()


@loop(budget=Budget(iterations=2), name="examples.watch:critic")
def critic(state: dict[str, Any]) -> dict[str, Any]:
    """Reads the draft and writes one note (a nested run of its own)."""
    time.sleep(DELAY / 3)
    return {**state, "notes": [*state.get("notes", []), f"tighten paragraph {len(state.get('notes', [])) + 1}"]}


@loop(
    budget=Budget(usd=0.80, iterations=20),
    scorer=lambda s: s["quality"],
    cost_fn=lambda s: 0.03 + 0.01 * (s["revision"] % 3),
    backtrack=[BestScore(), LastGood(max_consecutive_errors=2)],
    converge_on=score_plateau(patience=3, min_delta=0.02),
    name="examples.watch:editor",
)
def editor(state: dict[str, Any]) -> dict[str, Any]:
    """One revision of the draft: ask the critic, then rewrite."""
    revision = state["revision"] + 1
    time.sleep(DELAY)
    quality = QUALITY[next(_calls) % len(QUALITY)]
    if quality is None:
        raise ConnectionError("the style checker did not answer (a flaky tool)")
    notes = critic.run({"draft": state["draft"]}).state["notes"]  # .run(): its iteration cap is its way to stop
    return {"revision": revision, "quality": quality, "draft": f"draft v{revision} ({'; '.join(notes)})"}


def main() -> None:
    """Run the editor once and say where to look."""
    result = editor.run({"revision": 0, "quality": 0.0, "draft": "a first idea"})
    print(f"run {result.run_id}: {result.status.value} after {result.steps} steps, ${result.cost_usd:.4f}")
    print(f"see it with: loomc ui   (then open /runs/{result.run_id})")


if __name__ == "__main__":
    main()
