"""Retries of transient errors inside a step: pure decisions, then real SDK clients on loopback."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anthropic
import anyio
import openai
import pytest

import loomc
from loomc import Budget, RunStatus, loop
from loomc._core.retry import Retry, as_retry, is_transient
from loomc.adapters import AnthropicAdapter, OpenAIAdapter
from loomc.store.sqlite.sync import SQLiteStore
from loomc.testing import FakeAPI, Usage, serve

HI = [{"role": "user", "content": "hi"}]
FAST = Retry(attempts=4, initial=0.01, max_delay=0.05, jitter=0)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeAPI]:
    """One loopback server for the module."""
    with serve() as api:
        yield api


@pytest.fixture
def api(server: FakeAPI) -> FakeAPI:
    """The server with a clean record."""
    server.requests.clear()
    server.failures.clear()
    server.usage = Usage(input=100, output=10)
    server.cut_stream = False
    return server


@pytest.fixture
def claude(api: FakeAPI) -> Iterator[anthropic.Anthropic]:
    """A wrapped sync Anthropic client with the SDK's own retries off."""
    client = anthropic.Anthropic(api_key="t", base_url=api.base_url, max_retries=0)
    yield AnthropicAdapter("claude-haiku-4-5").wrap(client)
    client.close()


def sdk_error(api: FakeAPI, status: int) -> BaseException:
    """The exception the real anthropic client raises for an HTTP ``status``."""
    api.fail(status)
    with anthropic.Anthropic(api_key="t", base_url=api.base_url, max_retries=0) as client:
        try:
            client.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=HI)
        except anthropic.APIError as exc:
            return exc
    raise AssertionError("no error")


# -- pure decisions -----------------------------------------------------------------------


def test_backoff_is_exponential_and_capped() -> None:
    """Without jitter the waits are initial * 2**(n-1), capped at max_delay; jitter only adds."""
    r = Retry(initial=0.5, max_delay=3.0, jitter=0)
    assert [r.wait(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    j = Retry(initial=0.5, max_delay=30.0, jitter=0.25)
    waits = [j.wait(2) for _ in range(50)]
    assert all(1.0 <= w <= 1.25 for w in waits)
    assert len(set(waits)) > 1
    assert Retry(initial=timedelta(milliseconds=200), jitter=0).wait(1) == pytest.approx(0.2)


def test_decide_gives_up_when_it_should() -> None:
    """No retry for non-transient errors, after the last attempt, over budget or past the wall clock."""
    r = Retry(attempts=3, initial=1.0, jitter=0)
    busy = ConnectionError("reset")
    assert r.decide(ValueError("bug"), 1).delay is None
    assert r.decide(busy, 1).delay == 1.0
    assert r.decide(busy, 3).delay is None
    poor = r.decide(busy, 1, usd_left=0.10, step_estimate=0.25)
    assert poor.delay is None
    assert poor.note is not None
    assert poor.note.startswith("retry skipped after ConnectionError: reset: the budget has $0.1000 left")
    late = r.decide(busy, 1, wall_left=0.5)
    assert late.delay is None
    assert late.note is not None
    assert "wall clock" in late.note
    assert r.decide(loomc.BudgetExhausted("usd", 1, 1), 1).delay is None


def test_sdk_rate_limit_and_overload_are_transient(api: FakeAPI) -> None:
    """429, 529 and 500 from the real SDK are transient, 400 is not; connection errors are."""
    assert isinstance(sdk_error(api, 429), anthropic.RateLimitError)
    for status in (429, 529, 500):
        assert is_transient(sdk_error(api, status)), status
    assert not is_transient(sdk_error(api, 400))
    with (
        anthropic.Anthropic(api_key="t", base_url="http://127.0.0.1:9", max_retries=0) as dead,
        pytest.raises(anthropic.APIConnectionError) as caught,
    ):
        dead.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=HI)
    assert is_transient(caught.value)
    assert is_transient(TimeoutError())
    assert not is_transient(RuntimeError())


def test_retry_after_header_is_honoured(api: FakeAPI) -> None:
    """A server's Retry-After longer than the backoff wins (capped at max_delay)."""
    api.fail(429, retry_after=0.3)
    exc = sdk_error(api, 429)  # the scripted 429 with retry-after 0.3 comes first
    r = Retry(initial=0.01, max_delay=1.0, jitter=0)
    assert r.wait(1, exc) == pytest.approx(0.3)
    assert Retry(initial=0.01, max_delay=0.1, jitter=0).wait(1, exc) == pytest.approx(0.1)


def test_retry_argument_forms() -> None:
    """retry= takes True, a number of attempts or Retry(...); anything else fails at decoration."""
    assert as_retry(None) is None
    assert as_retry(False) is None
    assert as_retry(True) is not None
    assert as_retry(5).attempts == 5  # type: ignore[union-attr]
    with pytest.raises(TypeError, match="retry="):
        loop(retry="often")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="attempts"):
        Retry(attempts=0)
    with pytest.raises(ValueError, match="initial"):
        Retry(initial=-1)
    only = Retry(on=KeyError, initial=0, jitter=0)
    assert only.decide(KeyError("k"), 1).delay == 0
    assert only.decide(ConnectionError(), 1).delay is None


# -- inside a loop, with the real SDK ----------------------------------------------------------


def steps_in_store(db: str, run_id: str) -> list[loomc.StepRecord]:
    """The committed steps as `loomc show` reads them."""
    store = SQLiteStore(db)
    try:
        return list(store.load_steps(run_id))
    finally:
        store.close()


def test_429_then_success_is_retried_and_shown(api: FakeAPI, claude: anthropic.Anthropic, tmp_path: Path) -> None:
    """A rate-limited call is retried in the same step; the attempt is recorded in the step's event."""
    db = str(tmp_path / "r.db")
    api.fail(429)

    @loop(budget=Budget(usd=1.0, iterations=1), checkpoint=db, retry=FAST)
    def step(state: dict[str, Any]) -> dict[str, Any]:
        msg = claude.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=HI)
        return {"text": msg.content[0].text}

    result = step.run({})
    assert result.state == {"text": "YES"}
    assert api.paths() == ["/v1/messages", "/v1/messages"]
    assert result.steps == 1
    assert result.cost_usd == pytest.approx((100 * 1 + 10 * 5) / 1e6)  # the 429 cost nothing
    rows = steps_in_store(db, result.run_id)
    assert len(rows) == 1
    assert rows[0].error is None
    assert rows[0].event is not None
    assert rows[0].event.startswith("retry 1 in 0.01s after RateLimitError: ")
    shown = subprocess.run([sys.executable, "-m", "loomc", "show", result.run_id, "--db", db, "--json"],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "retry 1 in 0.01s after RateLimitError" in shown.stdout


def test_overloaded_twice_then_success(api: FakeAPI, claude: anthropic.Anthropic, tmp_path: Path) -> None:
    """529 overloaded is transient: two retries, both listed in order, joined by '; '."""
    api.fail(529, times=2)

    @loop(budget=Budget(iterations=1), checkpoint=str(tmp_path / "o.db"), retry=FAST)
    def step(state: dict[str, Any]) -> dict[str, Any]:
        return {"id": claude.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=HI).id}

    result = step.run({})
    event = result.history[0].event
    assert event is not None
    parts = event.split("; ")
    assert [p.split(" after ")[0] for p in parts] == ["retry 1 in 0.01s", "retry 2 in 0.02s"]
    assert all("529" in p or "Overloaded" in p for p in parts)
    assert len(api.requests) == 3


def test_exhausted_retries_fail_the_step_with_every_attempt_recorded(api: FakeAPI, claude: anthropic.Anthropic,
                                                                   tmp_path: Path) -> None:
    """After ``attempts`` failures the step fails with the SDK error; its row lists the retries made."""
    api.fail(429, times=3)

    @loop(budget=Budget(iterations=2), checkpoint=str(tmp_path / "x.db"),
          retry=Retry(attempts=3, initial=0.01, jitter=0))
    def step(state: dict[str, Any]) -> dict[str, Any]:
        claude.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=HI)
        return state

    result = step.run({})
    assert result.status is RunStatus.FAILED
    assert isinstance(result.error, anthropic.RateLimitError)
    assert len(api.requests) == 3
    assert result.history[0].error is not None
    assert result.history[0].error.startswith("RateLimitError")
    assert result.history[0].event is not None
    assert result.history[0].event.count("retry ") == 2


def test_a_retry_the_budget_cannot_afford_is_not_made(api: FakeAPI, claude: anthropic.Anthropic, tmp_path: Path) -> None:
    """With less money left than a step costs, the 429 is not retried and the reason is recorded."""
    calls = {"n": 0}

    @loop(budget=Budget(usd=1.0, iterations=3), checkpoint=str(tmp_path / "b.db"), retry=FAST)
    def step(state: dict[str, Any]) -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] == 1:
            loomc.charge(0.45)
            return state
        loomc.charge(0.20)
        api.fail(429)
        claude.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=HI)
        return state

    result = step.run({})
    assert calls["n"] == 2
    assert result.status is RunStatus.FAILED
    assert len(api.requests) == 1
    assert result.history[1].event is not None
    assert result.history[1].event.startswith("retry skipped after RateLimitError")
    assert "$0.3500 left" in result.history[1].event


def test_non_transient_errors_are_not_retried(tmp_path: Path) -> None:
    """A bug in the step fails at once: one attempt, no retry note."""
    calls = {"n": 0}

    @loop(budget=Budget(iterations=1), checkpoint=str(tmp_path / "n.db"), retry=FAST)
    def step(state: dict[str, Any]) -> dict[str, Any]:
        calls["n"] += 1
        raise KeyError("missing")

    result = step.run({})
    assert calls["n"] == 1
    assert result.history[0].event is None


def test_without_retry_a_rate_limit_fails_the_step(api: FakeAPI, claude: anthropic.Anthropic, tmp_path: Path) -> None:
    """retry is off by default."""
    api.fail(429)

    @loop(budget=Budget(iterations=1), checkpoint=str(tmp_path / "off.db"))
    def step(state: dict[str, Any]) -> dict[str, Any]:
        claude.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=HI)
        return state

    assert step.run({}).status is RunStatus.FAILED
    assert len(api.requests) == 1


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_loop_retries_openai_rate_limit(api: FakeAPI, tmp_path: Path, backend: str) -> None:
    """The async driver sleeps with anyio between attempts; the OpenAI 429 is retried and recorded."""
    api.fail(429)

    @loop(budget=Budget(usd=1.0, iterations=1), checkpoint=str(tmp_path / f"a-{backend}.db"), retry=FAST)
    async def step(state: dict[str, Any]) -> dict[str, Any]:
        client = OpenAIAdapter("gpt-4.1").wrap(openai.AsyncOpenAI(api_key="t", base_url=api.openai_url, max_retries=0))
        try:
            reply = await client.chat.completions.create(model="gpt-4.1", messages=HI, max_tokens=20)
        finally:
            await client.close()
        return {"text": reply.choices[0].message.content}

    result = anyio.run(step.run, {}, backend=backend)
    assert result.state == {"text": "YES"}
    assert result.history[0].event is not None
    assert result.history[0].event.startswith("retry 1 in 0.01s after RateLimitError")
    assert result.cost_usd == pytest.approx((100 * 2 + 10 * 8) / 1e6)


def test_retry_resumes_the_nested_loops_of_the_failed_attempt(api: FakeAPI, claude: anthropic.Anthropic,
                                                             tmp_path: Path) -> None:
    """A child loop that completed in the failed attempt is resumed (not run again) by the retry."""
    db = str(tmp_path / "nested.db")
    child_steps = {"n": 0}

    @loop(budget=Budget(iterations=1), checkpoint=db)
    def child(state: dict[str, Any]) -> dict[str, Any]:
        child_steps["n"] += 1
        return {"outline": "ok"}

    @loop(budget=Budget(usd=1.0, iterations=1), checkpoint=db, retry=FAST)
    def parent(state: dict[str, Any]) -> dict[str, Any]:
        outline = child.run({}).state["outline"]
        msg = claude.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=HI)
        return {"outline": outline, "text": msg.content[0].text}

    api.fail(429)
    result = parent.run({})
    assert result.state == {"outline": "ok", "text": "YES"}
    assert child_steps["n"] == 1
    assert len(api.requests) == 2


def test_ctrl_c_during_a_backoff_marks_the_run_interrupted(tmp_path: Path) -> None:
    """A KeyboardInterrupt while waiting to retry ends the run as interrupted (resumable), not as running."""
    import signal
    import threading

    db = str(tmp_path / "int.db")

    @loop(budget=Budget(iterations=3), checkpoint=db, retry=Retry(attempts=3, initial=5.0, jitter=0))
    def step(state: dict[str, Any]) -> dict[str, Any]:
        raise ConnectionError("reset by peer")

    main = threading.get_ident()
    timer = threading.Timer(0.3, lambda: signal.pthread_kill(main, signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        step.run({})
    timer.join()
    assert time.monotonic() - started < 4.0
    store = SQLiteStore(db)
    try:
        (run,) = store.list_runs()
    finally:
        store.close()
    assert run.status is RunStatus.INTERRUPTED
