"""Cost adapters for the Anthropic and OpenAI SDKs: every call charged to the current run.

``adapter.wrap(client)`` patches the client in place (sync or async) so that each call

1. reserves the most it can cost *before* the request (input estimated from the request,
   output at ``max_tokens``): a call the budget cannot afford raises
   :class:`~loomc.BudgetExhausted` and is never sent;
2. settles the real cost from the response's ``usage`` (cache reads and writes included)
   after it, or when a stream ends; a failed call releases its reservation.

Outside a run the wrapped client behaves exactly like the unwrapped one. Prices live in
:mod:`loomc.integrations.pricing` (dated, with their sources). ``cost_from_response``, ``cost_fn`` and
``judge`` keep loomc 0.3.0's API.
"""

from __future__ import annotations

import contextvars
import inspect
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from loomc._core.context import Reservation, reserve
from loomc._core.detectors import JudgeDetector
from loomc._core.errors import CostError
from loomc._core.holds import apersist
from loomc._core.money import check_usd
from loomc.integrations.pricing import Price, anthropic_cost, base_name, lookup, openai_cost

__all__ = ["AnthropicAdapter", "OpenAIAdapter", "Price"]

# Set while a call is already being accounted (the judge's own call), so that a wrapped
# client inside it does not charge the same call twice.
_accounted: contextvars.ContextVar[bool] = contextvars.ContextVar("loomc_accounted", default=False)

_IMAGE_TOKENS = 1_600  # an image costs at most ~1.6K tokens once the API has resized it
_OVERHEAD_TOKENS = 32  # role markers and framing per request


def estimate_input_tokens(*parts: Any) -> int:
    """An upper-bound token count for request content: UTF-8 bytes / 3, images at a flat rate."""
    images = 0

    def strip(obj: Any) -> Any:
        nonlocal images
        if isinstance(obj, Mapping):
            kind = obj.get("type")
            if kind in ("image", "image_url", "input_image"):
                images += 1
                return None
            return {k: strip(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [strip(v) for v in obj]
        if hasattr(obj, "model_dump"):
            return strip(obj.model_dump())
        return obj

    payload = [strip(p) for p in parts if p is not None and not _omitted(p)]
    text = json.dumps(payload, default=str, ensure_ascii=False)
    return math.ceil(len(text.encode()) / 3) + images * _IMAGE_TOKENS + _OVERHEAD_TOKENS


def _is_async(resource: Any, method: Any) -> bool:
    # The SDKs decorate their async methods, which hides them from iscoroutinefunction.
    return inspect.iscoroutinefunction(inspect.unwrap(method)) or type(resource).__name__.startswith("Async")


def _omitted(value: Any) -> bool:
    # The SDKs' NOT_GIVEN / Omit sentinels.
    return type(value).__name__ in ("NotGiven", "Omit")


def _contains_key(obj: Any, key: str) -> bool:
    if isinstance(obj, Mapping):
        return key in obj or any(_contains_key(v, key) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_contains_key(v, key) for v in obj)
    return False


def _state_response(state: Any) -> Any:
    return state.get("_response") if isinstance(state, dict) else getattr(state, "_response", None)


class _Call:
    """One call's reservation: made before the request, settled (once) after it."""

    __slots__ = ("adapter", "kwargs", "max_usd", "price", "reservation")

    def __init__(self, adapter: _Adapter, kwargs: Mapping[str, Any]) -> None:
        self.adapter = adapter
        self.kwargs = kwargs
        self.price = adapter.price_for(kwargs.get("model"))
        self.max_usd = check_usd(adapter.max_cost(kwargs, self.price), f"{adapter!r}: the most this call can cost",
                                 hint="check the request's max_tokens and the adapter's pricing")
        # BudgetExhausted: the call is not sent. Committed to the store before the call (so a
        # crash mid-call still counts it), except on an event loop: there ``durable`` does it.
        self.reservation: Reservation = reserve(self.max_usd)

    async def durable(self) -> None:
        """Commit the reservation to the run's store, awaited (async calls, before they are sent)."""
        await apersist(self.reservation)

    def settle_usage(self, usage: Any) -> None:
        """Record the real cost from ``usage`` (the full reservation when there is none).

        Raises:
            CostError: ``usage`` gives no valid cost; the full reservation is recorded
                first (the call was made, so its cost is never under-counted).
        """
        if usage is None:
            self.reservation.settle(self.max_usd)
            return
        what = f"{self.adapter!r}: the cost computed from the response's usage"
        try:
            usd = check_usd(self.adapter.usage_cost(usage, self.price, self.kwargs), what)
        except CostError as exc:
            self.reservation.settle(self.max_usd)
            if str(exc).startswith(what):
                raise
            raise CostError(f"{self.adapter!r}: {exc}") from exc
        self.reservation.settle(usd)

    def release(self) -> None:
        """The call failed before anything was billed."""
        self.reservation.release()


class _Adapter:
    provider = ""
    default_model = ""

    def __init__(
        self,
        model: str | None = None,
        pricing: Price | Mapping[str, float] | None = None,
        *,
        default_max_output: int = 16_384,
    ) -> None:
        self.model = model or self.default_model
        if default_max_output < 1:
            raise ValueError(f"default_max_output={default_max_output!r}: must be >= 1")
        self.default_max_output = default_max_output
        self.pricing: Price = (
            Price.coerce(pricing, provider=self.provider) if pricing is not None else lookup(self.provider, self.model)[0]
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model!r})"

    # -- pricing ----------------------------------------------------------------
    def price_for(self, model: Any) -> Price:
        """The price of a call to ``model`` (this adapter's own price for its own model)."""
        if not isinstance(model, str) or model == self.model or base_name(model) == base_name(self.model):
            return self.pricing
        return lookup(self.provider, model)[0]

    def usage_cost(self, usage: Any, price: Price, kwargs: Mapping[str, Any]) -> float:  # pragma: no cover
        raise NotImplementedError

    def max_cost(self, kwargs: Mapping[str, Any], price: Price) -> float:  # pragma: no cover
        raise NotImplementedError

    def cost_from_response(self, response: Any) -> float:
        """USD spent by the call that returned ``response`` (0.0 without ``usage``)."""
        usage = getattr(response, "usage", None) if response is not None else None
        if usage is None:
            return 0.0
        model = getattr(response, "model", None)
        return self.usage_cost(usage, self.price_for(model if isinstance(model, str) and model else None), {})

    def cost_fn(self, state: Any) -> float:
        """``cost_fn`` for ``@loop``: the cost of the response stored at ``state["_response"]``.

        Only for unwrapped clients: a wrapped client has already charged the call.
        """
        return self.cost_from_response(_state_response(state))

    # -- accounting ---------------------------------------------------------------
    def _begin(self, kwargs: Mapping[str, Any]) -> _Call | None:
        if _accounted.get():
            return None
        return _Call(self, kwargs)

    async def _abegin(self, kwargs: Mapping[str, Any]) -> _Call | None:
        acct = self._begin(kwargs)
        if acct is not None:
            await acct.durable()
        return acct

    def accounted(self, kwargs: Mapping[str, Any], call: Callable[[], Any]) -> Any:
        """Run a sync ``call`` made with ``kwargs`` under a reservation, settled from its ``usage``."""
        acct = self._begin(kwargs)
        if acct is None:
            return call()
        token = _accounted.set(True)
        try:
            resp = call()
        except BaseException:
            acct.release()
            raise
        finally:
            _accounted.reset(token)
        acct.settle_usage(getattr(resp, "usage", None))
        return resp

    def wrap(self, client: Any) -> Any:  # pragma: no cover - per provider
        """Patch ``client`` so every call is charged to the current run; returns the same client."""
        raise NotImplementedError


def _wrap_method(adapter: _Adapter, resource: Any, name: str, stream_proxy: Callable[[Any, _Call, bool, Mapping[str, Any]], Any],
                 prepare: Callable[[dict[str, Any]], bool] | None = None) -> None:
    """Replace ``resource.<name>`` by an accounted version (sync or async, streaming or not)."""
    orig = getattr(resource, name)
    if getattr(orig, "__loomc_adapter__", None) is not None:
        orig = orig.__wrapped__

    if _is_async(resource, orig):

        async def acall(*args: Any, **kwargs: Any) -> Any:
            acct = await adapter._abegin(kwargs)
            if acct is None:
                return await orig(*args, **kwargs)
            injected = prepare(kwargs) if prepare is not None and kwargs.get("stream") else False
            token = _accounted.set(True)  # an SDK helper calling back into a wrapped method is not charged twice
            try:
                resp = await orig(*args, **kwargs)
            except BaseException:
                acct.release()
                raise
            finally:
                _accounted.reset(token)
            if kwargs.get("stream"):
                return stream_proxy(resp, acct, injected, kwargs)
            acct.settle_usage(getattr(resp, "usage", None))
            return resp

        wrapped: Any = acall
    else:

        def call(*args: Any, **kwargs: Any) -> Any:
            acct = adapter._begin(kwargs)
            if acct is None:
                return orig(*args, **kwargs)
            injected = prepare(kwargs) if prepare is not None and kwargs.get("stream") else False
            token = _accounted.set(True)
            try:
                resp = orig(*args, **kwargs)
            except BaseException:
                acct.release()
                raise
            finally:
                _accounted.reset(token)
            if kwargs.get("stream"):
                return stream_proxy(resp, acct, injected, kwargs)
            acct.settle_usage(getattr(resp, "usage", None))
            return resp

        wrapped = call
    wrapped.__wrapped__ = orig
    wrapped.__loomc_adapter__ = adapter
    wrapped.__doc__ = getattr(orig, "__doc__", None)
    setattr(resource, name, wrapped)


# ---------------------------------------------------------------------------------
# Streams: pass every event through, collect usage, settle when the stream ends.


class _Usage:
    """What a stream has told us so far about its usage."""

    def __init__(self) -> None:
        self.usage: dict[str, Any] | None = None
        self.final = False


class _StreamProxy:
    """A stream with the SDK stream's interface that settles its call when it ends."""

    def __init__(self, inner: Any, acct: _Call, feed: Callable[[Any, _Usage], bool], finish: Callable[[_Usage], Any]) -> None:
        self._inner = inner
        self._acct = acct
        self._feed = feed  # -> False to hide the event from the caller
        self._finish = finish
        self._seen = _Usage()
        self._done = False
        self._it: Any = None

    def __getattr__(self, name: str) -> Any:
        if name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)

    def _end(self) -> None:
        if not self._done:
            self._done = True
            self._acct.settle_usage(self._finish(self._seen))

    # sync
    def __iter__(self) -> _StreamProxy:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            self._it = iter(self._inner)
        while True:
            try:
                ev = next(self._it)
            except BaseException:
                self._end()
                raise
            if self._feed(ev, self._seen):
                return ev

    def close(self) -> Any:
        """Close the underlying stream; the call is settled with what it reported."""
        try:
            return self._inner.close()
        finally:
            self._end()

    def __enter__(self) -> _StreamProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # async
    def __aiter__(self) -> _StreamProxy:
        return self

    async def __anext__(self) -> Any:
        if self._it is None:
            self._it = self._inner.__aiter__()
        while True:
            try:
                ev = await self._it.__anext__()
            except BaseException:
                self._end()
                raise
            if self._feed(ev, self._seen):
                return ev

    async def aclose(self) -> None:
        """Close the underlying async stream."""
        try:
            res = self._inner.close()
            if inspect.isawaitable(res):
                await res
        finally:
            self._end()

    async def __aenter__(self) -> _StreamProxy:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


def _dump(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return dict(obj)
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        return {k: v for k, v in dump().items() if v is not None}
    return {k: getattr(obj, k) for k in dir(obj) if not k.startswith("_") and not callable(getattr(obj, k))}


# ---------------------------------------------------------------------------------
# Anthropic


class AnthropicAdapter(_Adapter):
    """Costs of Anthropic Messages API calls, charged to the current run.

    Args:
        model: the model whose price ``cost_from_response``/``judge`` use (calls through a
            wrapped client are priced by the model they request).
        pricing: override this model's price: a :class:`~loomc.integrations.adapters.Price` or a dict
            ``{"input": .., "output": .., "cache_read": .., "cache_write": ..}`` (USD per 1M tokens).

    Example::

        adapter = AnthropicAdapter("claude-sonnet-4-6")
        client = adapter.wrap(Anthropic())

        @loop(budget=Budget(usd=2.00), converge_on=adapter.judge(client, "Is the report done?"))
        def refine(state):
            msg = client.messages.create(model="claude-sonnet-4-6", max_tokens=1024, messages=[...])
            return {**state, "text": msg.content[0].text}
    """

    provider = "anthropic"
    default_model = "claude-sonnet-4-6"

    def usage_cost(self, usage: Any, price: Price, kwargs: Mapping[str, Any]) -> float:
        """USD for ``usage`` at ``price`` (fast mode and US-only inference from the request or usage)."""
        speed = kwargs.get("speed")
        geo = kwargs.get("inference_geo")
        return anthropic_cost(usage, price, speed=speed if isinstance(speed, str) else None,
                              geo=geo if isinstance(geo, str) else None)

    def max_cost(self, kwargs: Mapping[str, Any], price: Price) -> float:
        """The most a Messages call with ``kwargs`` can cost: every input token at its dearest rate."""
        tokens = estimate_input_tokens(kwargs.get("system"), kwargs.get("messages"), kwargs.get("tools"),
                                       kwargs.get("tool_choice"))
        if price.long_above is not None and price.long is not None and tokens > price.long_above:
            price = price.long
        in_rate = price.input
        if _contains_key([kwargs.get("system"), kwargs.get("messages"), kwargs.get("tools"),
                          kwargs.get("cache_control")], "cache_control"):
            in_rate = max(in_rate, price.cache_write, price.cache_write_1h or 0.0)
        out = kwargs.get("max_tokens")
        out_tokens = int(out) if isinstance(out, int) and not isinstance(out, bool) else self.default_max_output
        usd = (tokens * in_rate + out_tokens * price.output) / 1_000_000
        if kwargs.get("speed") == "fast":
            usd *= price.fast
        if kwargs.get("inference_geo") == "us":
            usd *= 1.1
        return usd

    def wrap(self, client: Any) -> Any:
        """Charge every ``messages.create`` (``stream=True`` too) and ``messages.stream`` to the run.

        Works for ``Anthropic`` and ``AsyncAnthropic``; returns the same client.
        """
        messages = getattr(client, "messages", None)
        if messages is None or not hasattr(messages, "create"):
            raise TypeError(f"AnthropicAdapter.wrap({client!r}): expected an anthropic.Anthropic or AsyncAnthropic client")
        _wrap_method(self, messages, "create", self._stream_proxy)
        if hasattr(messages, "stream"):
            self._wrap_stream_helper(messages)
        return client

    def _stream_proxy(self, raw: Any, acct: _Call, injected: bool, kwargs: Mapping[str, Any]) -> _StreamProxy:
        return _StreamProxy(raw, acct, _anthropic_feed, lambda seen: _anthropic_finish(seen, kwargs))

    def _wrap_stream_helper(self, messages: Any) -> None:
        orig = messages.stream
        if getattr(orig, "__loomc_adapter__", None) is not None:
            orig = orig.__wrapped__
        adapter = self

        def stream(*args: Any, **kwargs: Any) -> Any:
            acct = adapter._begin(kwargs)
            if acct is None:
                return orig(*args, **kwargs)
            try:
                manager = orig(*args, **kwargs)
                attr = "_" + type(manager).__mro__[0].__name__.lstrip("_") + "__api_request"
                if not hasattr(manager, attr):
                    attr = next((a for a in vars(manager) if a.endswith("__api_request")), attr)
                request = getattr(manager, attr)
            except BaseException:
                acct.release()
                raise
            if inspect.isawaitable(request):

                async def arequest() -> Any:
                    try:
                        await acct.durable()
                    except BaseException:
                        close = getattr(request, "close", None)
                        if close is not None:
                            close()  # the request coroutine is never sent
                        raise
                    try:
                        raw = await request
                    except BaseException:
                        acct.release()
                        raise
                    return adapter._stream_proxy(raw, acct, False, kwargs)

                setattr(manager, attr, arequest())
            else:

                def srequest() -> Any:
                    try:
                        raw = request()
                    except BaseException:
                        acct.release()
                        raise
                    return adapter._stream_proxy(raw, acct, False, kwargs)

                setattr(manager, attr, srequest)
            return manager

        stream.__wrapped__ = orig  # type: ignore[attr-defined]
        stream.__loomc_adapter__ = self  # type: ignore[attr-defined]
        stream.__doc__ = getattr(orig, "__doc__", None)
        messages.stream = stream

    def judge(
        self,
        client: Any,
        prompt: str = "Reply YES if the task is complete, NO otherwise. One word only.",
        text_fn: Callable[[Any], str] | None = None,
        *,
        max_tokens: int = 8,
    ) -> JudgeDetector:
        """A detector that asks this model whether the latest state is done (a reply starting with Y).

        The judge's own call is reserved and charged to the run like any wrapped call.
        ``client`` must be a sync client; ``max_tokens`` bounds the reply (raise it for
        models that think before they answer).
        """
        messages = getattr(client, "messages", None)
        create = getattr(messages, "create", None)
        if create is not None and _is_async(messages, create):
            raise TypeError("judge() needs a sync client (anthropic.Anthropic), not AsyncAnthropic")

        def ask_judge(state: Any) -> bool:
            text = text_fn(state) if text_fn else str(state)
            kwargs: dict[str, Any] = {
                "model": self.model, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": f"{prompt}\n\n---\n{text}"}],
            }
            response = self.accounted(kwargs, lambda: client.messages.create(**kwargs))
            return str(response.content[0].text).strip().upper().startswith("Y")

        ask_judge.__qualname__ = f"AnthropicAdapter({self.model!r}).judge"
        return JudgeDetector(ask_judge)


def _anthropic_feed(ev: Any, seen: _Usage) -> bool:
    kind = getattr(ev, "type", None)
    if kind == "message_start":
        seen.usage = _dump(getattr(getattr(ev, "message", None), "usage", None))
    elif kind == "message_delta":
        delta = _dump(getattr(ev, "usage", None))
        seen.usage = {**(seen.usage or {}), **{k: v for k, v in delta.items() if v is not None}}
        seen.final = True
    return True


def _anthropic_finish(seen: _Usage, kwargs: Mapping[str, Any]) -> Any:
    if seen.usage is None:
        return None  # nothing reported: settle the whole reservation
    if not seen.final:
        # The stream stopped before its final usage: count the output as if it ran to max_tokens.
        out = kwargs.get("max_tokens")
        return {**seen.usage, "output_tokens": out if isinstance(out, int) else seen.usage.get("output_tokens", 0)}
    return seen.usage


# ---------------------------------------------------------------------------------
# OpenAI


class OpenAIAdapter(_Adapter):
    """Costs of OpenAI Chat Completions and Responses API calls, charged to the current run.

    Args:
        model: the model whose price ``cost_from_response``/``judge`` use.
        pricing: override this model's price (see :class:`AnthropicAdapter`).
        default_max_output: the output tokens reserved for a call that sets no
            ``max_completion_tokens``/``max_tokens``/``max_output_tokens``.

    Example::

        adapter = OpenAIAdapter("gpt-4.1")
        client = adapter.wrap(OpenAI())
        reply = client.chat.completions.create(model="gpt-4.1", messages=[...], max_completion_tokens=500)
    """

    provider = "openai"
    default_model = "gpt-4o"

    def usage_cost(self, usage: Any, price: Price, kwargs: Mapping[str, Any]) -> float:
        """USD for ``usage`` (chat or responses shape) at ``price``."""
        return openai_cost(usage, price)

    def max_cost(self, kwargs: Mapping[str, Any], price: Price) -> float:
        """The most a call with ``kwargs`` can cost."""
        tokens = estimate_input_tokens(kwargs.get("messages"), kwargs.get("input"), kwargs.get("instructions"),
                                       kwargs.get("tools"), kwargs.get("functions"), kwargs.get("response_format"))
        out: Any = None
        for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
            v = kwargs.get(key)
            if isinstance(v, int) and not isinstance(v, bool):
                out = v
                break
        out_tokens = out if out is not None else self.default_max_output
        n = kwargs.get("n")
        choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
        return (tokens * max(price.input, price.cache_write) + out_tokens * choices * price.output) / 1_000_000

    def wrap(self, client: Any) -> Any:
        """Charge every ``chat.completions.create`` and ``responses.create`` (streams too) to the run.

        Works for ``OpenAI`` and ``AsyncOpenAI``; returns the same client. A chat stream gets
        ``stream_options={"include_usage": True}`` added (its usage-only final chunk is not
        passed on unless the caller asked for it).
        """
        chat = getattr(getattr(client, "chat", None), "completions", None)
        if chat is None or not hasattr(chat, "create"):
            raise TypeError(f"OpenAIAdapter.wrap({client!r}): expected an openai.OpenAI or AsyncOpenAI client")
        _wrap_method(self, chat, "create", self._chat_stream, prepare=_include_usage)
        responses = getattr(client, "responses", None)
        if responses is not None and hasattr(responses, "create"):
            _wrap_method(self, responses, "create", self._responses_stream)
        return client

    def _chat_stream(self, raw: Any, acct: _Call, injected: bool, kwargs: Mapping[str, Any]) -> _StreamProxy:
        def feed(chunk: Any, seen: _Usage) -> bool:
            usage = getattr(chunk, "usage", None)
            if usage is not None:
                seen.usage, seen.final = _dump(usage), True
                if injected and not getattr(chunk, "choices", None):
                    return False  # the usage-only chunk the caller did not ask for
            return True

        return _StreamProxy(raw, acct, feed, lambda seen: seen.usage)

    def _responses_stream(self, raw: Any, acct: _Call, injected: bool, kwargs: Mapping[str, Any]) -> _StreamProxy:
        def feed(ev: Any, seen: _Usage) -> bool:
            usage = getattr(getattr(ev, "response", None), "usage", None)
            if usage is not None:
                seen.usage, seen.final = _dump(usage), True
            return True

        return _StreamProxy(raw, acct, feed, lambda seen: seen.usage)

    def judge(
        self,
        client: Any,
        prompt: str = "Reply YES if the task is complete, NO otherwise. One word only.",
        text_fn: Callable[[Any], str] | None = None,
        *,
        max_tokens: int = 8,
    ) -> JudgeDetector:
        """A detector that asks this model whether the latest state is done; its call is charged to the run.

        The reply is bounded by ``max_completion_tokens=max_tokens`` (raise it for reasoning models).
        """
        completions = getattr(getattr(client, "chat", None), "completions", None)
        create = getattr(completions, "create", None)
        if create is not None and _is_async(completions, create):
            raise TypeError("judge() needs a sync client (openai.OpenAI), not AsyncOpenAI")

        def ask_judge(state: Any) -> bool:
            text = text_fn(state) if text_fn else str(state)
            kwargs: dict[str, Any] = {
                "model": self.model, "max_completion_tokens": max_tokens,
                "messages": [{"role": "user", "content": f"{prompt}\n\n---\n{text}"}],
            }
            response = self.accounted(kwargs, lambda: client.chat.completions.create(**kwargs))
            content = response.choices[0].message.content or ""
            return str(content).strip().upper().startswith("Y")

        ask_judge.__qualname__ = f"OpenAIAdapter({self.model!r}).judge"
        return JudgeDetector(ask_judge)


def _include_usage(kwargs: dict[str, Any]) -> bool:
    """Ask a chat stream for its usage; True when loomc added the request (not the caller)."""
    opts = kwargs.get("stream_options")
    if isinstance(opts, Mapping) and "include_usage" in opts:
        if opts["include_usage"]:
            return False
        kwargs["stream_options"] = {**opts, "include_usage": True}
        return True
    kwargs["stream_options"] = {**(opts if isinstance(opts, Mapping) else {}), "include_usage": True}
    return True
