"""An offline, deterministic code fixer: a fake "LLM" fixes one bug per step.

Run it:        python examples/code_fixer.py
Kill it (Ctrl-C or kill -9) mid-run, then run it again with the printed run id:
               python examples/code_fixer.py --resume <run_id>
Inspect it:    loomc show <run_id>

Each step costs $0.05 (what the fake model "charges"), the scorer runs the tests, and
the loop stops when every test passes (or the $1.00 budget runs out).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time

from pydantic import BaseModel

import loomc
from loomc import BestScore, Budget, LastGood, loop, predicate

BUGGY = '''\
def add(a, b):
    return a - b

def mul(a, b):
    return a + b

def greet(name):
    return "Hello " + nam

def is_even(n):
    return n % 2 == 1

def clamp(x, lo, hi):
    return max(hi, min(lo, x))
'''

# What the fake model knows how to fix, one per call.
FIXES = [
    ("return a - b", "return a + b"),
    ("return a + b\n\ndef greet", "return a * b\n\ndef greet"),
    ('"Hello " + nam\n', '"Hello " + name\n'),
    ("n % 2 == 1", "n % 2 == 0"),
    ("max(hi, min(lo, x))", "max(lo, min(hi, x))"),
]

TESTS = [
    ("add(2, 3) == 5", lambda ns: ns["add"](2, 3) == 5),
    ("mul(2, 3) == 6", lambda ns: ns["mul"](2, 3) == 6),
    ("greet('Ada') == 'Hello Ada'", lambda ns: ns["greet"]("Ada") == "Hello Ada"),
    ("is_even(4)", lambda ns: ns["is_even"](4) is True),
    ("clamp(-5, 0, 10) == 0", lambda ns: ns["clamp"](-5, 0, 10) == 0),
]


class FixerState(BaseModel):
    """The loop's state: the code, and what the last test run said."""

    code: str
    passed: int = 0
    failures: list[str] = []


def run_tests(code: str) -> tuple[int, list[str]]:
    """Run the test suite against ``code``; returns (passed, failing test names)."""
    ns: dict[str, object] = {}
    exec(compile(code, "<candidate>", "exec"), ns)  # the candidate code is ours, offline
    failures = []
    for name, check in TESTS:
        try:
            ok = check(ns)
        except Exception:  # a crashing test is a failing test
            ok = False
        if not ok:
            failures.append(name)
    return len(TESTS) - len(failures), failures


def fake_llm_fix(code: str) -> str:
    """The stand-in for an LLM call: fix the first known bug still present."""
    loomc.charge(0.05)  # what this call cost; a charge past the cap raises BudgetExhausted
    time.sleep(float(os.environ.get("FIXER_STEP_DELAY", "0.3")))  # a real call takes a while
    for bad, good in FIXES:
        if bad in code:
            return code.replace(bad, good, 1)
    return code


@loop(
    budget=Budget(usd=1.00, iterations=15, wall_clock="2m"),
    scorer=lambda s: s.passed / len(TESTS),
    converge_on=predicate(lambda history: history[-1].score == 1.0),
    backtrack=[BestScore(), LastGood()],
)
def fix(state: FixerState) -> FixerState:
    """One iteration: ask the model for a fix, then run the tests."""
    code = fake_llm_fix(state.code)
    passed, failures = run_tests(code)
    run = loomc.current_run()
    step = run.step if run else "?"
    print(f"  step {step}: {passed}/{len(TESTS)} tests pass", flush=True)
    return FixerState(code=code, passed=passed, failures=failures)


def main() -> None:
    """Run (or resume) the fixer and print what happened."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resume", metavar="RUN_ID", help="resume this run instead of starting one")
    args = parser.parse_args()
    # The run id is chosen up front, so it is on screen before the first step: whatever
    # happens next (Ctrl-C, kill -9, a power cut), this is how to continue.
    run_id = args.resume or secrets.token_hex(6)
    again = f"python examples/code_fixer.py --resume {run_id}"
    print(f"run {run_id}: {'resuming' if args.resume else 'starting'} (stop it any time; continue with: {again})", flush=True)
    try:
        result = fix.resume_run(run_id) if args.resume else fix.run(FixerState(code=BUGGY), run_id=run_id)
    except KeyboardInterrupt:
        print(f"\ninterrupted: run {run_id} keeps every committed step; continue with: {again}", file=sys.stderr)
        raise SystemExit(130) from None
    print(f"run {result.run_id}: {result.status.value} after {result.steps} steps, ${result.cost_usd:.2f}")
    if result.status is loomc.RunStatus.COMPLETED:
        print("all tests pass:\n")
        print(result.state.code)
    else:
        print(f"stopped: {result.stop_reason}; resume with: python examples/code_fixer.py --resume {result.run_id}")
    print(f"inspect it with: loomc show {result.run_id}")


if __name__ == "__main__":
    main()
