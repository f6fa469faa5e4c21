"""What the distribution says about itself: its licence, and no file exempt from the lint rules."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_license_file_is_the_mit_license_pyproject_names() -> None:
    """LICENSE holds the MIT text with the project's copyright line, as pyproject.toml declares."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    text = (ROOT / "LICENSE").read_text()
    assert project["license"] == {"text": "MIT"}
    assert "License :: OSI Approved :: MIT License" in project["classifiers"]
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the loomc authors" in text
    assert "WITHOUT WARRANTY OF ANY KIND" in text


def test_no_file_is_exempt_from_every_lint_rule() -> None:
    """Every file in the repository is the project's own and linted: no per-file ``ALL`` ignore."""
    lint = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    exempt = [pattern for pattern, rules in lint.get("per-file-ignores", {}).items() if "ALL" in rules]
    assert exempt == []
