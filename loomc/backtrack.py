"""Backtracking strategies (loomc 0.3.0 module path)."""

from __future__ import annotations

from loomc._core.detectors import BestScore, LastGood

__all__ = ["BestScore", "LastGood"]
