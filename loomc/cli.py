"""The ``loomc`` command line (placeholder until the CLI lands)."""

from __future__ import annotations

import sys


def main() -> None:
    """Entry point of the ``loomc`` command."""
    print("loomc: the command line is not available in this build", file=sys.stderr)
    sys.exit(1)
