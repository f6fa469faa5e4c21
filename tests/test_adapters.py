"""Cost adapters with the real anthropic and openai clients against a loopback HTTP server."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import anyio
import openai
import pytest

import loomc
from loomc import Budget, BudgetExhausted, RunStatus, current_run, loop
from loomc._core.context import current_ledger
from loomc.adapters import AnthropicAdapter, OpenAIAdapter, estimate_input_tokens
from loomc.integrations.pricing import ANTHROPIC_PRICES, OPENAI_PRICES, PRICES_CHECKED, Price, lookup
from loomc.testing import FakeAPI, TokenUsage, serve

M = 1_000_000
HI = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeAPI]:
    """One loopback server for the module."""
    with serve() as api:
        yield api


_OPEN: list[Any] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Close every sync client a test made (their sockets would otherwise leak)."""
    yield
    while _OPEN:
        _OPEN.pop().close()


@pytest.fixture
def api(server: FakeAPI) -> FakeAPI:
    """The server, with a clean record and the default usage."""
    server.requests.clear()
    server.failures.clear()
    server.usage = TokenUsage(input=1000, output=200, cache_read=500, cache_write=300, cache_write_1h=100)
    server.text = "YES"
    server.cut_stream = False
    return server


def claude(api: FakeAPI, model: str = "claude-sonnet-4-6", **kw: Any) -> tuple[AnthropicAdapter, anthropic.Anthropic]:
    """A wrapped sync Anthropic client on the fake server."""
    ad = AnthropicAdapter(model, **kw)
    client = anthropic.Anthropic(api_key="test", base_url=api.base_url, max_retries=0)
    _OPEN.append(client)
    return ad, ad.wrap(client)


def gpt(api: FakeAPI, model: str = "gpt-4.1") -> tuple[OpenAIAdapter, openai.OpenAI]:
    """A wrapped sync OpenAI client on the fake server."""
    ad = OpenAIAdapter(model)
    client = openai.OpenAI(api_key="test", base_url=api.openai_url, max_retries=0)
    _OPEN.append(client)
    return ad, ad.wrap(client)


def sonnet_cost(u: TokenUsage) -> float:
    """Sonnet 4.6 at $3 in, $3.75 5m write, $6 1h write, $0.30 read, $15 out."""
    return (u.input * 3 + u.cache_write * 3.75 + u.cache_write_1h * 6 + u.cache_read * 0.30 + u.output * 15) / M


def gpt41_cost(u: TokenUsage) -> float:
    """GPT-4.1 at $2 in, $0.50 cached, $8 out."""
    return (u.input * 2 + u.cache_read * 0.5 + u.output * 8) / M


def one_step(body: Any, *, usd: float | None = 1.0, db: Path) -> loomc.RunResult:
    """Run ``body(state)`` as the single step of a loop capped at ``usd``."""

    @loop(budget=Budget(usd=usd, iterations=1), checkpoint=str(db))
    def step(state: dict[str, Any]) -> dict[str, Any]:
        return {**state, **(body(state) or {})}

    return step.run({})


# -- prices ----------------------------------------------------------------------------


def test_price_table_is_dated_and_corrected() -> None:
    """The table carries its check date; Haiku 4.5 is $1/$5 (not 0.3.0's $0.80/$4)."""
    assert PRICES_CHECKED == "2026-11-25"
    haiku = ANTHROPIC_PRICES["claude-haiku-4-5"]
    assert (haiku.input, haiku.output, haiku.cache_read, haiku.cache_write, haiku.cache_write_1h) == (1.0, 5.0, 0.1, 1.25, 2.0)
    assert lookup("anthropic", "claude-haiku-4-5-20251001") == (haiku, True)
    assert lookup("openai", "gpt-4o-2024-08-06") == (OPENAI_PRICES["gpt-4o"], True)
    resp = type("R", (), {"usage": type("U", (), {"input_tokens": M, "output_tokens": M})()})()
    assert AnthropicAdapter("claude-haiku-4-5-20251001").cost_from_response(resp) == pytest.approx(6.00)
    assert AnthropicAdapter("claude-sonnet-4-6").cost_from_response(resp) == pytest.approx(18.00)


def test_unknown_model_warns_once_and_is_priced_at_the_top_tier() -> None:
    """An unknown model is charged at every rate's maximum, with a single warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ad = AnthropicAdapter("claude-imaginary-9")
        AnthropicAdapter("claude-imaginary-9")
    assert [str(w.message)[:34] for w in caught] == ["loomc: no price on file for anthro"]
    assert ad.pricing.input == max(p.input for p in ANTHROPIC_PRICES.values()) == 15.0
    assert ad.pricing.output == 75.0
    with pytest.warns(UserWarning, match="most expensive openai"):
        oa = OpenAIAdapter("gpt-imaginary")
    assert oa.pricing.output == max(p.output for p in OPENAI_PRICES.values())


def test_pricing_override_and_validation() -> None:
    """pricing= replaces the table's price (missing cache rates filled conservatively); bad ones fail early."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ad = AnthropicAdapter("my-finetune", pricing={"input": 2.0, "output": 8.0})
    assert ad.pricing == Price(2.0, 8.0, 2.0, 2.5, 4.0)
    assert OpenAIAdapter("gpt-4.1", pricing=Price(1, 2, 0.5, 1)).pricing.output == 2
    with pytest.raises(ValueError, match="'input' and 'output'"):
        AnthropicAdapter("x", pricing={"output": 1.0})
    with pytest.raises(ValueError, match="unknown keys"):
        AnthropicAdapter("x", pricing={"input": 1.0, "output": 1.0, "cached": 1.0})
    with pytest.raises(ValueError, match="non-negative"):
        AnthropicAdapter("x", pricing={"input": -1.0, "output": 1.0})


def test_token_usage_is_named_for_what_it_holds() -> None:
    """loomc.testing's token counts are TokenUsage; the 0.5.0 name Usage still imports and is the same class."""
    import loomc.testing

    assert loomc.testing.Usage is TokenUsage
    assert "TokenUsage" in loomc.testing.__all__
    assert TokenUsage(input=3).input == 3


def test_estimate_is_an_upper_bound_and_images_are_flat() -> None:
    """The input estimate is UTF-8 bytes / 3 (plus framing); an image counts ~1.6K tokens, not its base64."""
    text = "word " * 3000
    assert estimate_input_tokens([{"role": "user", "content": text}]) >= len(text) / 3
    img = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A" * 3_000_000}}
    assert estimate_input_tokens([{"role": "user", "content": [img]}]) < 2_000


# -- Anthropic -----------------------------------------------------------------------


def test_anthropic_create_settles_usage_with_cache_tokens(api: FakeAPI, tmp_path: Path) -> None:
    """messages.create is charged exactly: input, 5m and 1h cache writes, cache reads and output."""
    _ad, client = claude(api)

    def body(state: Any) -> dict[str, Any]:
        msg = client.messages.create(model="claude-sonnet-4-6", max_tokens=300, messages=HI)
        ledger = current_ledger()
        assert ledger is not None
        assert ledger.reserved == 0
        return {"text": msg.content[0].text}

    result = one_step(body, db=tmp_path / "a.db")
    assert result.state["text"] == "YES"
    assert result.cost_usd == pytest.approx(sonnet_cost(api.usage))
    assert result.history[0].cost_usd == pytest.approx(sonnet_cost(api.usage))
    assert api.paths() == ["/v1/messages"]


def test_anthropic_streams_settle_when_they_end(api: FakeAPI, tmp_path: Path) -> None:
    """create(stream=True) and messages.stream(...) each settle the final usage once the stream ends."""
    _ad, client = claude(api)
    seen: dict[str, Any] = {}

    def body(state: Any) -> None:
        stream = client.messages.create(model="claude-sonnet-4-6", max_tokens=300, messages=HI, stream=True)
        ledger = current_ledger()
        assert ledger is not None
        seen["held"] = ledger.reserved
        seen["events"] = [ev.type for ev in stream]
        seen["after_raw"] = ledger.spent
        with client.messages.stream(model="claude-sonnet-4-6", max_tokens=300, messages=HI) as s:
            seen["text"] = s.get_final_text()
        seen["reserved_end"] = ledger.reserved

    result = one_step(body, db=tmp_path / "s.db")
    assert seen["held"] > 0
    assert seen["events"][0] == "message_start"
    assert seen["events"][-1] == "message_stop"
    assert seen["after_raw"] == pytest.approx(sonnet_cost(api.usage))
    assert seen["text"] == "YES"
    assert seen["reserved_end"] == 0
    assert result.cost_usd == pytest.approx(2 * sonnet_cost(api.usage))


def test_stream_cut_before_final_usage_is_charged_as_if_it_ran_to_max_tokens(api: FakeAPI, tmp_path: Path) -> None:
    """Without the final usage event the output is counted at max_tokens: never under-counted."""
    api.cut_stream = True
    _ad, client = claude(api)

    def body(state: Any) -> None:
        list(client.messages.create(model="claude-sonnet-4-6", max_tokens=4000, messages=HI, stream=True))

    result = one_step(body, db=tmp_path / "cut.db")
    expected = sonnet_cost(TokenUsage(1000, 4000, 500, 300, 100))
    assert result.cost_usd == pytest.approx(expected)


def test_call_refused_by_the_cap_is_never_sent(api: FakeAPI, tmp_path: Path) -> None:
    """A call whose maximum cost does not fit raises BudgetExhausted before any request; the run stops."""
    _ad, client = claude(api, "claude-opus-4-6")

    def body(state: Any) -> None:
        client.messages.create(model="claude-opus-4-6", max_tokens=8000, messages=HI)  # 8000 * $25/M = $0.20

    result = one_step(body, usd=0.10, db=tmp_path / "cap.db")
    assert api.requests == []
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert isinstance(result.error, BudgetExhausted)
    assert result.cost_usd == 0.0
    assert result.history[0].error is not None
    assert "BudgetExhausted" in result.history[0].error


def test_failed_call_releases_its_reservation(api: FakeAPI, tmp_path: Path) -> None:
    """An HTTP error releases the hold: nothing spent, nothing reserved, the step fails with the SDK error."""
    _ad, client = claude(api)
    api.fail(400)
    seen: dict[str, float] = {}

    def body(state: Any) -> None:
        ledger = current_ledger()
        assert ledger is not None
        try:
            client.messages.create(model="claude-sonnet-4-6", max_tokens=300, messages=HI)
        finally:
            seen["reserved"], seen["spent"] = ledger.reserved, ledger.spent

    result = one_step(body, db=tmp_path / "err.db")
    assert seen == {"reserved": 0.0, "spent": 0.0}
    assert result.status is RunStatus.FAILED
    assert isinstance(result.error, anthropic.BadRequestError)


def test_outside_a_run_the_wrapped_client_is_transparent(api: FakeAPI) -> None:
    """With no run the client answers normally and nothing is charged anywhere."""
    ad, client = claude(api)
    assert current_run() is None
    msg = client.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=HI)
    assert msg.content[0].text == "YES"
    assert ad.cost_from_response(msg) == pytest.approx(sonnet_cost(api.usage))
    assert ad.wrap(client) is client  # wrapping twice does not charge twice


def test_wrapping_twice_charges_once(api: FakeAPI, tmp_path: Path) -> None:
    """A client wrapped twice is still charged once per call."""
    ad, client = claude(api)
    ad.wrap(client)
    result = one_step(lambda s: {"t": client.messages.create(model="claude-sonnet-4-6", max_tokens=9, messages=HI).id},
                      db=tmp_path / "twice.db")
    assert result.cost_usd == pytest.approx(sonnet_cost(api.usage))


def test_nested_run_is_capped_by_its_parent(api: FakeAPI, tmp_path: Path) -> None:
    """A child loop's call that would cross the PARENT's cap is refused before it is sent."""
    _ad, client = claude(api, "claude-opus-4-6")
    db = str(tmp_path / "nest.db")

    @loop(budget=Budget(usd=5.0, iterations=1), checkpoint=db)
    def child(state: dict[str, Any]) -> dict[str, Any]:
        client.messages.create(model="claude-opus-4-6", max_tokens=8000, messages=HI)
        return state

    @loop(budget=Budget(usd=0.05, iterations=1), checkpoint=db)
    def parent(state: dict[str, Any]) -> dict[str, Any]:
        return child(state)

    result = parent.run({})
    assert api.requests == []
    assert result.status is RunStatus.BUDGET_EXHAUSTED


# -- OpenAI ---------------------------------------------------------------------------


def test_openai_chat_and_responses_with_cached_tokens(api: FakeAPI, tmp_path: Path) -> None:
    """chat.completions.create and responses.create settle prompt/input minus cached, cached and output."""
    _ad, client = gpt(api)

    def body(state: Any) -> dict[str, Any]:
        chat = client.chat.completions.create(model="gpt-4.1", messages=HI, max_completion_tokens=300)
        resp = client.responses.create(model="gpt-4.1", input="Say hi.", max_output_tokens=300)
        return {"chat": chat.choices[0].message.content, "resp": resp.output_text}

    result = one_step(body, db=tmp_path / "oa.db")
    assert result.state == {"chat": "YES", "resp": "YES"}
    assert result.cost_usd == pytest.approx(2 * gpt41_cost(api.usage))


def test_openai_chat_stream_asks_for_usage_and_hides_the_extra_chunk(api: FakeAPI, tmp_path: Path) -> None:
    """A chat stream gets include_usage added, settles from it, and the caller never sees the usage-only chunk."""
    _ad, client = gpt(api)
    seen: dict[str, Any] = {}

    def body(state: Any) -> None:
        chunks = list(client.chat.completions.create(model="gpt-4.1", messages=HI, stream=True))
        seen["choices"] = [len(c.choices) for c in chunks]
        asked = list(client.chat.completions.create(model="gpt-4.1", messages=HI, stream=True,
                                                    stream_options={"include_usage": True}))
        seen["asked_last_usage"] = asked[-1].usage is not None

    result = one_step(body, db=tmp_path / "cs.db")
    assert api.requests[0][1]["stream_options"] == {"include_usage": True}
    assert seen["choices"] == [1, 1]
    assert seen["asked_last_usage"] is True
    assert result.cost_usd == pytest.approx(2 * gpt41_cost(api.usage))


def test_openai_responses_stream_settles_on_completed(api: FakeAPI, tmp_path: Path) -> None:
    """responses.create(stream=True) settles from the response.completed event's usage."""
    _ad, client = gpt(api)

    def body(state: Any) -> dict[str, Any]:
        events = [e.type for e in client.responses.create(model="gpt-4.1", input="Say hi.", stream=True,
                                                          max_output_tokens=100)]
        return {"events": events}

    result = one_step(body, db=tmp_path / "rs.db")
    assert result.state["events"][-1] == "response.completed"
    assert result.cost_usd == pytest.approx(gpt41_cost(api.usage))


def test_openai_without_max_tokens_reserves_the_default_cap(api: FakeAPI, tmp_path: Path) -> None:
    """No max_*_tokens: the reservation uses default_max_output, so a tight cap refuses the call unsent."""
    _ad, client = gpt(api)
    # 16384 output tokens * $8/M = $0.131 > $0.10
    result = one_step(lambda s: client.chat.completions.create(model="gpt-4.1", messages=HI) and None,
                      usd=0.10, db=tmp_path / "def.db")
    assert api.requests == []
    assert result.status is RunStatus.BUDGET_EXHAUSTED



# -- messages.stream: the SDK's own stream manager, through its public surface ---------------


def test_messages_stream_yields_the_sdks_own_stream_and_settles_on_leaving(api: FakeAPI, tmp_path: Path) -> None:
    """The block gets a genuine anthropic MessageStream; the call is reserved on entering and settled on leaving."""
    from anthropic.lib.streaming import MessageStream

    _ad, client = claude(api)
    seen: dict[str, Any] = {}

    def body(state: Any) -> None:
        ledger = current_ledger()
        assert ledger is not None
        manager = client.messages.stream(model="claude-sonnet-4-6", max_tokens=300, messages=HI)
        seen["before_enter"] = (ledger.reserved, len(api.requests))
        with manager as stream:
            seen["is_sdk_stream"] = isinstance(stream, MessageStream)
            seen["held"] = ledger.reserved
            seen["message"] = stream.get_final_message().content[0].text
        seen["after"] = (ledger.reserved, ledger.spent)

    result = one_step(body, db=tmp_path / "ms.db")
    assert seen["before_enter"] == (0.0, 0)  # nothing reserved, nothing sent until the block is entered
    assert seen["is_sdk_stream"] is True
    assert seen["held"] > 0
    assert seen["message"] == "YES"
    assert seen["after"] == (0.0, pytest.approx(sonnet_cost(api.usage)))
    assert result.cost_usd == pytest.approx(sonnet_cost(api.usage))


def test_messages_stream_never_entered_costs_nothing(api: FakeAPI, tmp_path: Path) -> None:
    """A stream manager made but never entered sends no request, so the run is charged nothing for it."""
    _ad, client = claude(api)

    def body(state: Any) -> None:
        client.messages.stream(model="claude-sonnet-4-6", max_tokens=4000, messages=HI)

    result = one_step(body, db=tmp_path / "unentered.db")
    assert api.requests == []
    assert result.history[0].error is None
    assert result.cost_usd == 0.0


def test_messages_stream_left_early_or_cut_counts_output_at_max_tokens(api: FakeAPI, tmp_path: Path) -> None:
    """Leaving the block before the final usage (a break, or a cut stream) counts the output at max_tokens."""
    _ad, client = claude(api)
    api.usage = TokenUsage(input=1000, output=200)

    def body(state: Any) -> None:
        with client.messages.stream(model="claude-sonnet-4-6", max_tokens=3000, messages=HI) as stream:
            for _event in stream:
                break  # the final message_delta is never read

    early = one_step(body, db=tmp_path / "early.db")
    api.cut_stream = True
    cut = one_step(lambda s: body(s), db=tmp_path / "cut.db")
    expected = sonnet_cost(TokenUsage(input=1000, output=3000))
    assert early.cost_usd == pytest.approx(expected)
    assert cut.cost_usd == pytest.approx(expected)


def test_messages_stream_refused_by_the_cap_sends_nothing(api: FakeAPI, tmp_path: Path) -> None:
    """Entering a stream whose maximum cost does not fit raises BudgetExhausted before any request."""
    _ad, client = claude(api, "claude-opus-4-6")

    def body(state: Any) -> None:
        with client.messages.stream(model="claude-opus-4-6", max_tokens=8000, messages=HI) as stream:
            stream.until_done()

    result = one_step(body, usd=0.10, db=tmp_path / "refused.db")
    assert api.requests == []
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert result.cost_usd == 0.0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_messages_stream_never_entered_leaves_no_coroutine_and_costs_nothing(
    api: FakeAPI, tmp_path: Path, backend: str
) -> None:
    """AsyncAnthropic: a stream manager dropped unentered creates no request coroutine and charges nothing."""
    import gc

    ad = AnthropicAdapter("claude-sonnet-4-6")
    aclaude = ad.wrap(anthropic.AsyncAnthropic(api_key="t", base_url=api.base_url, max_retries=0))

    @loop(budget=Budget(usd=1.0, iterations=1), checkpoint=str(tmp_path / f"adrop-{backend}.db"))
    async def step(state: dict[str, Any]) -> dict[str, Any]:
        aclaude.messages.stream(model="claude-sonnet-4-6", max_tokens=4000, messages=HI)
        async with aclaude.messages.stream(model="claude-sonnet-4-6", max_tokens=300, messages=HI) as s:
            text = await s.get_final_text()
        await aclaude.close()
        return {"text": text}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = anyio.run(step.run, {}, backend=backend)
        gc.collect()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
    assert result.state == {"text": "YES"}
    assert result.cost_usd == pytest.approx(sonnet_cost(api.usage))
    assert api.paths() == ["/v1/messages"]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_messages_stream_refused_by_the_cap_sends_nothing(api: FakeAPI, tmp_path: Path, backend: str) -> None:
    """AsyncAnthropic: entering a stream that cannot fit raises BudgetExhausted; no request, no stray coroutine."""
    import gc

    ad = AnthropicAdapter("claude-opus-4-6")
    aclaude = ad.wrap(anthropic.AsyncAnthropic(api_key="t", base_url=api.base_url, max_retries=0))

    @loop(budget=Budget(usd=0.10, iterations=1), checkpoint=str(tmp_path / f"arefused-{backend}.db"))
    async def step(state: dict[str, Any]) -> dict[str, Any]:
        try:
            async with aclaude.messages.stream(model="claude-opus-4-6", max_tokens=8000, messages=HI) as s:
                await s.until_done()
        finally:
            await aclaude.close()
        return state

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = anyio.run(step.run, {}, backend=backend)
        gc.collect()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
    assert api.requests == []
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert isinstance(result.error, BudgetExhausted)
    assert result.cost_usd == 0.0


def test_adapters_read_no_private_sdk_attribute() -> None:
    """Outside loomc's own objects the adapters read no underscore attribute, by name or by string."""
    import ast
    import inspect

    from loomc.integrations import adapters

    tree = ast.parse(inspect.getsource(adapters))
    own = {"self", "adapter", "self._adapter"}  # loomc's adapter and call objects
    private = {
        ast.unparse(n) for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__") and ast.unparse(n.value) not in own
    }
    mangled = {  # a name-mangled attribute spelled as a string ("_Class__attr", "__attr"), dunders aside
        n.value for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and re.fullmatch(r"\w*__[a-z]\w*", n.value)
        and not re.fullmatch(r"__\w+__", n.value)
    }
    assert private == set()
    assert mangled == set()


# -- async clients --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_clients_are_charged_too(api: FakeAPI, tmp_path: Path, backend: str) -> None:
    """AsyncAnthropic (create, stream=True, messages.stream) and AsyncOpenAI (chat stream, responses) settle."""
    ad = AnthropicAdapter("claude-sonnet-4-6")
    aclaude = ad.wrap(anthropic.AsyncAnthropic(api_key="t", base_url=api.base_url, max_retries=0))
    oa = OpenAIAdapter("gpt-4.1")
    agpt = oa.wrap(openai.AsyncOpenAI(api_key="t", base_url=api.openai_url, max_retries=0))

    @loop(budget=Budget(usd=1.0, iterations=1), checkpoint=str(tmp_path / f"async-{backend}.db"))
    async def step(state: dict[str, Any]) -> dict[str, Any]:
        await aclaude.messages.create(model="claude-sonnet-4-6", max_tokens=300, messages=HI)
        raw = await aclaude.messages.create(model="claude-sonnet-4-6", max_tokens=300, messages=HI, stream=True)
        async for _ in raw:
            pass
        async with aclaude.messages.stream(model="claude-sonnet-4-6", max_tokens=300, messages=HI) as s:
            text = await s.get_final_text()
        if backend == "asyncio":  # on trio the openai SDK's own stream leaves async generators to the GC
            chunks = [c async for c in await agpt.chat.completions.create(model="gpt-4.1", messages=HI, stream=True)]
        else:
            chunks = [await agpt.chat.completions.create(model="gpt-4.1", messages=HI, max_tokens=50)] * 2
        await agpt.responses.create(model="gpt-4.1", input="hi", max_output_tokens=50)
        await aclaude.close()
        await agpt.close()
        return {"text": text, "chunks": len(chunks)}

    result = anyio.run(step.run, {}, backend=backend)
    assert result.state == {"text": "YES", "chunks": 2}
    assert result.cost_usd == pytest.approx(3 * sonnet_cost(api.usage) + 2 * gpt41_cost(api.usage))


# -- judge --------------------------------------------------------------------------------------


def test_judge_call_is_charged_to_the_run(api: FakeAPI, tmp_path: Path) -> None:
    """The judge's own LLM call counts in the step's cost and the run's total."""
    ad, client = claude(api, "claude-haiku-4-5")
    api.usage = TokenUsage(input=100, output=1)
    judge_cost = (100 * 1 + 1 * 5) / M

    @loop(budget=Budget(usd=1.0, iterations=5), checkpoint=str(tmp_path / "j.db"),
          converge_on=ad.judge(client, "Is it done?"), cost_fn=lambda s: 0.01)
    def step(state: dict[str, Any]) -> dict[str, Any]:
        return {"n": state.get("n", 0) + 1}

    result = step.run({})
    assert result.status is RunStatus.COMPLETED
    assert result.steps == 1
    assert result.history[0].cost_usd == pytest.approx(0.01 + judge_cost)
    assert result.cost_usd == pytest.approx(0.01 + judge_cost)
    assert api.paths() == ["/v1/messages"]
    assert api.requests[0][1]["max_tokens"] == 8


def test_judge_that_cannot_afford_its_call_stops_the_run(api: FakeAPI, tmp_path: Path) -> None:
    """A judge call that would cross the cap is not sent; the step is kept and the run stops on budget."""
    ad, client = claude(api, "claude-opus-4-1")
    oa, oclient = gpt(api, "gpt-4.1")

    @loop(budget=Budget(usd=0.0002, iterations=5), checkpoint=str(tmp_path / "jb.db"), converge_on=ad.judge(client))
    def step(state: dict[str, Any]) -> dict[str, Any]:
        return {"n": state.get("n", 0) + 1}

    result = step.run({})
    assert api.requests == []
    assert result.status is RunStatus.BUDGET_EXHAUSTED
    assert result.state == {"n": 1}
    assert result.history[0].error is None

    verdicts = oa.judge(oclient, "Done?")
    api.text = "NO"
    assert verdicts.should_stop([loomc.StepRecord(0, {"x": 1})]) is False
    assert api.paths() == ["/v1/chat/completions"]
    assert api.requests[0][1]["max_completion_tokens"] == 8


def test_judge_refuses_async_clients(api: FakeAPI) -> None:
    """judge() is called synchronously by the loop: an async client is a TypeError at construction."""
    ad = AnthropicAdapter("claude-haiku-4-5")
    with pytest.raises(TypeError, match="sync client"):
        ad.judge(anthropic.AsyncAnthropic(api_key="t", base_url=api.base_url))
    with pytest.raises(TypeError, match="sync client"):
        OpenAIAdapter("gpt-4.1").judge(openai.AsyncOpenAI(api_key="t", base_url=api.openai_url))


def test_cost_fn_reads_state_response(api: FakeAPI) -> None:
    """0.3.0's cost_fn(state) prices the response kept at state['_response']."""
    ad, client = gpt(api)
    resp = client.chat.completions.create(model="gpt-4.1", messages=HI, max_completion_tokens=5)
    assert ad.cost_fn({"_response": resp}) == pytest.approx(gpt41_cost(api.usage))
    assert ad.cost_fn({"text": "no response"}) == 0.0
    assert ad.cost_from_response(object()) == 0.0


def test_wrap_rejects_other_objects() -> None:
    """Wrapping something that is not an SDK client says what was expected."""
    with pytest.raises(TypeError, match=r"anthropic\.Anthropic"):
        AnthropicAdapter().wrap(object())
    with pytest.raises(TypeError, match=r"openai\.OpenAI"):
        OpenAIAdapter().wrap(object())


def test_pricing_override_covers_the_models_dated_snapshot(api: FakeAPI) -> None:
    """A response naming the dated snapshot of the adapter's model is priced with the override, no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ad = AnthropicAdapter("claude-house", pricing={"input": 1.0, "output": 2.0})
        resp = type("R", (), {"model": "claude-house-20260101",
                              "usage": type("U", (), {"input_tokens": M, "output_tokens": M})()})()
        assert ad.cost_from_response(resp) == pytest.approx(3.0)


def test_openai_stream_without_usage_is_charged_its_full_reservation(api: FakeAPI, tmp_path: Path) -> None:
    """A chat stream that ends before its usage chunk is charged the whole hold (input estimate + max output)."""
    api.cut_stream = True
    ad, client = gpt(api)
    kwargs: dict[str, Any] = {"model": "gpt-4.1", "messages": HI, "max_completion_tokens": 500}
    hold = ad.max_cost(kwargs, ad.pricing)

    def body(state: Any) -> None:
        list(client.chat.completions.create(**kwargs, stream=True))

    result = one_step(body, db=tmp_path / "ocut.db")
    assert result.cost_usd == pytest.approx(hold)
    assert hold > gpt41_cost(api.usage)
