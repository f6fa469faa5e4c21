"""``semantic_delta``: stop when consecutive states barely change in meaning."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from loomc._detectors import Detector
from loomc._errors import LoomcError
from loomc._types import StepRecord

__all__ = ["SemanticDelta", "semantic_delta"]


class SemanticDelta(Detector):
    """Stop when the cosine distance between the last two states' embeddings is below ``threshold``."""

    def __init__(
        self,
        threshold: float = 0.05,
        text_fn: Callable[[Any], str] | None = None,
        model: str = "all-MiniLM-L6-v2",
        embed: Callable[[list[str]], Any] | None = None,
        *,
        model_name: str | None = None,
    ) -> None:
        self.threshold = threshold
        self.text_fn = text_fn or str
        self.model = model_name or model
        self.embed = embed

    def __call__(self, history: Sequence[StepRecord]) -> bool:
        raise LoomcError(
            "semantic_delta needs the embeddings integration: pip install 'loomc[embeddings]'"
        )

    def __repr__(self) -> str:
        return f"semantic_delta(threshold={self.threshold}, model={self.model!r})"


def semantic_delta(
    threshold: float = 0.05,
    text_fn: Callable[[Any], str] | None = None,
    model: str = "all-MiniLM-L6-v2",
    embed: Callable[[list[str]], Any] | None = None,
    *,
    model_name: str | None = None,
) -> SemanticDelta:
    """Stop when the last two states are within ``threshold`` cosine distance in meaning."""
    return SemanticDelta(threshold, text_fn, model, embed, model_name=model_name)
