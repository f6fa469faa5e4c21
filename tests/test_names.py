"""Names that say what they hold: the current run's ledger, one meaning per class or type name in the core."""

from __future__ import annotations

import ast
from pathlib import Path

from loomc import Budget, loop

ROOT = Path(__file__).resolve().parent.parent


def test_the_current_run_ledger_is_named_for_what_it_holds(tmp_path: Path) -> None:
    """``_current_ledger`` holds the running step's own run's ledger; 0.3.0's ``loomc.loop._parent_ledger`` is the same."""
    from loomc._core import context
    from loomc.loop import _parent_ledger

    assert not hasattr(context, "_parent_ledger")
    assert _parent_ledger is context._current_ledger
    seen: list[str] = []

    @loop(budget=Budget(iterations=1), checkpoint=str(tmp_path / "n.db"))
    def one(n: int) -> int:
        led = context.current_ledger()
        assert led is not None
        seen.append(led.run_id)
        return n + 1

    result = one.run(0)
    assert seen == [result.run_id]


def _top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
            if isinstance(value, (ast.Subscript, ast.Name, ast.BinOp)) and node.targets[0].id[:1].isupper():
                names.add(node.targets[0].id)  # a type alias
    return names


def test_no_two_core_modules_define_a_class_or_type_of_the_same_name() -> None:
    """A class or type alias name means one thing across ``loomc/_core`` (no two ``History``, no two ``Usage``)."""
    where: dict[str, str] = {}
    for path in sorted((ROOT / "loomc" / "_core").glob("*.py")):
        for name in _top_level_names(path):
            assert name not in where, f"{name} is defined in both {where[name]} and {path.name}"
            where[name] = path.name
    assert {"RunHistory", "StepRecords", "RunUsage"} <= set(where)
