"""Convergence detectors (loomc 0.3.0 module path)."""

from __future__ import annotations

from loomc._core.detectors import (
    All,
    Any_,
    Detector,
    JudgeDetector,
    Predicate,
    ScorePlateau,
    judge,
    predicate,
    score_plateau,
)
from loomc.integrations.semantic import SemanticDelta, semantic_delta

__all__ = [
    "All",
    "Any_",
    "Detector",
    "JudgeDetector",
    "Predicate",
    "ScorePlateau",
    "SemanticDelta",
    "judge",
    "predicate",
    "score_plateau",
    "semantic_delta",
]
