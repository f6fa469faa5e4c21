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

import contextlib
import contextvars
import inspect
import json
import math
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from loomc._core.context import Reservation, reserve
from loomc._core.detectors import JudgeDetector
from loomc._core.errors import CostError
from loomc._core.holds import apersist
from loomc._core.money import check_usd
from loomc.integrations.pricing import Price, anthropic_cost, base_name, lookup, openai_cost

if TYPE_CHECKING:
    from loomc.integrations.otel import CallSpan

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
    """One call's reservation protocol, free of I/O: reserve, send under a guard, settle once.

    The sync and async shells (:func:`_wrap_method`, :class:`_AccountedStream`) differ only
    in awaiting the call and :meth:`durable`; everything else about a call lives here:

    - constructing it reserves the most the call can cost (``BudgetExhausted``: not sent);
    - ``with call:`` marks the context as accounted while the request is made (an SDK helper
      calling back into a wrapped method is not charged twice) and releases the
      reservation if the request fails;
    - :meth:`received` settles a response from its ``usage``, or wraps a stream that settles
      when it ends.
    """

    __slots__ = ("adapter", "injected", "kwargs", "max_usd", "on_stream", "price", "reservation", "span", "span_token", "token")

    def __init__(self, adapter: _Adapter, kwargs: dict[str, Any], on_stream: _OnStream | None = None,
                 prepare: Callable[[dict[str, Any]], bool] | None = None) -> None:
        self.adapter = adapter
        self.kwargs = kwargs
        self.on_stream = on_stream
        self.token: contextvars.Token[bool] | None = None
        self.price = adapter.price_for(kwargs.get("model"))
        self.max_usd = check_usd(adapter.max_cost(kwargs, self.price), f"{adapter!r}: the most this call can cost",
                                 hint="check the request's max_tokens and the adapter's pricing")
        # BudgetExhausted: the call is not sent. Committed to the store before the call (so a
        # crash mid-call still counts it), except on an event loop: there ``durable`` does it.
        self.reservation: Reservation = reserve(self.max_usd)
        streaming = on_stream is not None and bool(kwargs.get("stream"))
        self.injected = prepare(kwargs) if prepare is not None and streaming else False
        self.span: CallSpan | None = None  # the call's OpenTelemetry span, when the application traces
        self.span_token: Any = None
        if "opentelemetry.trace" in sys.modules:
            from loomc.integrations.otel import start_call_span

            self.span = start_call_span(adapter.provider, kwargs, adapter.model)

    async def durable(self) -> None:
        """Commit the reservation to the run's store, awaited (async calls, before they are sent)."""
        await apersist(self.reservation)

    def __enter__(self) -> _Call:
        self.token = _accounted.set(True)
        if self.span is not None:
            self.span_token = self.span.attach()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self.span_token is not None:
            assert self.span is not None
            self.span.detach(self.span_token)
            self.span_token = None
        if self.token is not None:
            _accounted.reset(self.token)
            self.token = None
        if exc_type is not None:
            self.release(exc)  # the request failed before anything was billed

    def received(self, response: Any) -> Any:
        """What the caller gets back: ``response`` settled, or a stream that settles when it ends."""
        if self.on_stream is not None and self.kwargs.get("stream"):
            return self.on_stream(response, self)
        if self.span is not None:
            self.span.response(response)
        self.settle_usage(getattr(response, "usage", None))
        return response

    def _end_span(self, usage: Any, usd: float | None, error: BaseException | None = None) -> None:
        span, self.span = self.span, None
        if span is not None:
            span.end(usage, usd, error)

    def settle_usage(self, usage: Any) -> None:
        """Record the real cost from ``usage`` (the full reservation when there is none).

        Raises:
            CostError: ``usage`` gives no valid cost; the full reservation is recorded
                first (the call was made, so its cost is never under-counted).
        """
        if usage is None:
            self._end_span(None, self.max_usd)
            self.reservation.settle(self.max_usd)
            return
        what = f"{self.adapter!r}: the cost computed from the response's usage"
        try:
            usd = check_usd(self.adapter.usage_cost(usage, self.price, self.kwargs), what)
        except CostError as exc:
            self._end_span(usage, self.max_usd, exc)
            self.reservation.settle(self.max_usd)
            if str(exc).startswith(what):
                raise
            raise CostError(f"{self.adapter!r}: {exc}") from exc
        self._end_span(usage, usd)
        self.reservation.settle(usd)

    def release(self, error: BaseException | None = None) -> None:
        """The call failed before anything was billed (``error``: why)."""
        self._end_span(None, 0.0, error)
        self.reservation.release()


#: ``on_stream(raw_stream, call)``: the stream handed to the caller, settling ``call`` when it ends.
_OnStream = Callable[[Any, _Call], Any]


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
    def _begin(self, kwargs: dict[str, Any], on_stream: _OnStream | None = None,
               prepare: Callable[[dict[str, Any]], bool] | None = None) -> _Call | None:
        """A reserved call, or ``None`` when this call is already accounted (the judge's own)."""
        if _accounted.get():
            return None
        return _Call(self, kwargs, on_stream, prepare)

    def accounted(self, kwargs: dict[str, Any], call: Callable[[], Any]) -> Any:
        """Run a sync ``call`` made with ``kwargs`` under a reservation, settled from its ``usage``."""
        acct = self._begin(kwargs)
        if acct is None:
            return call()
        with acct:
            response = call()
        return acct.received(response)

    # -- judge --------------------------------------------------------------------
    sync_client = ""  # the provider's sync client class, for error messages

    def _judge_resource(self, client: Any) -> Any:  # pragma: no cover - per provider
        raise NotImplementedError

    def _judge_request(self, content: str, max_tokens: int) -> dict[str, Any]:  # pragma: no cover - per provider
        raise NotImplementedError

    def _reply_text(self, response: Any) -> str:  # pragma: no cover - per provider
        raise NotImplementedError

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

        Args:
            client: a sync client (``anthropic.Anthropic`` / ``openai.OpenAI``), wrapped or not.
            prompt: the question, followed by the state's text.
            text_fn: the state's text (default ``str(state)``).
            max_tokens: bounds the reply (raise it for models that think before they answer).

        Raises:
            TypeError: ``client`` is an async client (the loop calls its detectors synchronously).
        """
        resource = self._judge_resource(client)
        create = getattr(resource, "create", None)
        if create is not None and _is_async(resource, create):
            raise TypeError(f"judge() needs a sync client ({self.sync_client}), not {type(client).__name__}")

        def ask_judge(state: Any) -> bool:
            text = text_fn(state) if text_fn else str(state)
            kwargs = self._judge_request(f"{prompt}\n\n---\n{text}", max_tokens)
            response = self.accounted(kwargs, lambda: self._judge_resource(client).create(**kwargs))
            return self._reply_text(response).strip().upper().startswith("Y")

        ask_judge.__qualname__ = f"{self!r}.judge"
        return JudgeDetector(ask_judge)

    def wrap(self, client: Any) -> Any:  # pragma: no cover - per provider
        """Patch ``client`` so every call is charged to the current run; returns the same client."""
        raise NotImplementedError


def _replace(resource: Any, name: str, make: Callable[[Any], Callable[..., Any]], adapter: _Adapter) -> None:
    """Replace ``resource.<name>`` by ``make(original)``; wrapping twice wraps the original once."""
    orig = getattr(resource, name)
    if getattr(orig, "__loomc_adapter__", None) is not None:
        orig = orig.__wrapped__
    wrapped: Any = make(orig)
    wrapped.__wrapped__ = orig
    wrapped.__loomc_adapter__ = adapter
    wrapped.__doc__ = getattr(orig, "__doc__", None)
    setattr(resource, name, wrapped)


def _wrap_method(adapter: _Adapter, resource: Any, name: str, on_stream: _OnStream,
                 prepare: Callable[[dict[str, Any]], bool] | None = None) -> None:
    """Replace ``resource.<name>`` by an accounted version (sync or async, streaming or not)."""

    def make(orig: Any) -> Callable[..., Any]:
        # The two shells differ only in ``await``: the protocol itself is :class:`_Call`.
        if _is_async(resource, orig):

            async def acall(*args: Any, **kwargs: Any) -> Any:
                acct = adapter._begin(kwargs, on_stream, prepare)
                if acct is None:
                    return await orig(*args, **kwargs)
                await acct.durable()
                with acct:
                    response = await orig(*args, **kwargs)
                return acct.received(response)

            return acall

        def call(*args: Any, **kwargs: Any) -> Any:
            acct = adapter._begin(kwargs, on_stream, prepare)
            if acct is None:
                return orig(*args, **kwargs)
            with acct:
                response = orig(*args, **kwargs)
            return acct.received(response)

        return call

    _replace(resource, name, make, adapter)


# ---------------------------------------------------------------------------------
# Streams: pass every event through, collect usage, settle when the stream ends.


class _StreamUsage:
    """The token usage a stream has reported so far, and whether it was the final count."""

    __slots__ = ("final", "usage")

    def __init__(self, usage: dict[str, Any] | None = None, *, final: bool = False) -> None:
        self.usage = usage
        self.final = final


class _EndOnError:
    """``with``: ends the stream (settling its call) when reading the next event raises."""

    __slots__ = ("proxy",)

    def __init__(self, proxy: _StreamProxy) -> None:
        self.proxy = proxy

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is not None:  # StopIteration / StopAsyncIteration included: the stream ended
            self.proxy.end()


class _StreamProxy:
    """A stream with the SDK stream's interface that settles its call when it ends."""

    def __init__(self, inner: Any, acct: _Call, feed: Callable[[Any, _StreamUsage], bool],
                 finish: Callable[[_StreamUsage], Any]) -> None:
        self._inner = inner
        self._acct = acct
        self._feed = feed  # -> False to hide the event from the caller
        self._finish = finish
        self._seen = _StreamUsage()
        self._done = False
        self._it: Any = None
        self._guard = _EndOnError(self)

    def __getattr__(self, name: str) -> Any:
        if name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)

    def end(self) -> None:
        """Settle the call with what the stream reported (once)."""
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
            with self._guard:
                event = next(self._it)
            if self._feed(event, self._seen):
                return event

    def close(self) -> Any:
        """Close the underlying stream; the call is settled with what it reported."""
        try:
            return self._inner.close()
        finally:
            self.end()

    def __enter__(self) -> _StreamProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # async
    def __aiter__(self) -> _StreamProxy:
        return self

    async def __anext__(self) -> Any:
        if self._it is None:
            self._it = self._inner.__aiter__()
        while True:
            with self._guard:
                event = await self._it.__anext__()
            if self._feed(event, self._seen):
                return event

    async def aclose(self) -> None:
        """Close the underlying async stream."""
        try:
            res = self._inner.close()
            if inspect.isawaitable(res):
                await res
        finally:
            self.end()

    async def __aenter__(self) -> _StreamProxy:
        return self

    async def __aexit__(self, *exc: object) -> None:
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
        _wrap_method(self, messages, "create", _anthropic_stream)
        if hasattr(messages, "stream"):
            _replace(messages, "stream", self._stream_helper, self)
        return client

    def _stream_helper(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        """``messages.stream``: the SDK's own stream manager, entered under a reservation."""

        def stream(*args: Any, **kwargs: Any) -> _AccountedStream:
            return _AccountedStream(self, lambda: orig(*args, **kwargs), kwargs)

        return stream

    sync_client = "anthropic.Anthropic"

    def _judge_resource(self, client: Any) -> Any:
        return getattr(client, "messages", None)

    def _judge_request(self, content: str, max_tokens: int) -> dict[str, Any]:
        return {"model": self.model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]}

    def _reply_text(self, response: Any) -> str:
        return str(response.content[0].text)


def _anthropic_stream(raw: Any, acct: _Call) -> _StreamProxy:
    return _StreamProxy(raw, acct, _anthropic_feed, lambda seen: _anthropic_finish(seen, acct.kwargs))


def _anthropic_feed(ev: Any, seen: _StreamUsage) -> bool:
    kind = getattr(ev, "type", None)
    if kind == "message_start":
        seen.usage = _dump(getattr(getattr(ev, "message", None), "usage", None))
    elif kind == "message_delta":
        delta = _dump(getattr(ev, "usage", None))
        seen.usage = {**(seen.usage or {}), **{k: v for k, v in delta.items() if v is not None}}
        seen.final = True
    return True


def _anthropic_finish(seen: _StreamUsage, kwargs: Mapping[str, Any]) -> Any:
    if seen.usage is None:
        return None  # nothing reported: settle the whole reservation
    if not seen.final:
        # The stream stopped before its final usage: count the output as if it ran to max_tokens.
        out = kwargs.get("max_tokens")
        return {**seen.usage, "output_tokens": out if isinstance(out, int) else seen.usage.get("output_tokens", 0)}
    return seen.usage


def _snapshot_usage(stream: Any) -> _StreamUsage:
    """The usage an Anthropic ``MessageStream`` has accumulated (public ``current_message_snapshot``).

    The snapshot is the message built from the events read so far: its ``usage`` is final
    once a ``message_delta`` set its ``stop_reason``. Before the first event the SDK has no
    snapshot (its property asserts one exists, or returns ``None`` under ``python -O``).
    """
    try:
        snapshot = stream.current_message_snapshot
    except AssertionError:
        snapshot = None
    if snapshot is None:
        return _StreamUsage()
    return _StreamUsage(_dump(getattr(snapshot, "usage", None)), final=getattr(snapshot, "stop_reason", None) is not None)


class _AccountedStream:
    """What a wrapped ``messages.stream(...)`` returns: the SDK's manager, entered under a reservation.

    Only the SDK's public surface is used: the stream manager is created when the block is
    entered (so a call the budget refuses creates no request), entered and left through
    its context-manager protocol, and the call is settled on leaving from the
    ``MessageStream``'s public ``current_message_snapshot``. The snapshot's behaviour before
    the first event is why ``pyproject.toml`` pins the ``anthropic`` range this was tested
    with (``tests/test_adapters.py`` runs the real SDK against ``loomc.testing``).
    """

    def __init__(self, adapter: _Adapter, open_manager: Callable[[], Any], kwargs: dict[str, Any]) -> None:
        self._adapter = adapter
        self._open = open_manager
        self._kwargs = kwargs
        self._manager: Any = None
        self._stream: Any = None
        self._acct: _Call | None = None

    def _entered(self, stream: Any) -> Any:
        self._stream = stream
        return stream

    def _settle(self) -> None:
        acct, self._acct = self._acct, None
        if acct is not None:
            acct.settle_usage(_anthropic_finish(_snapshot_usage(self._stream), self._kwargs))

    def __enter__(self) -> Any:
        self._acct = self._adapter._begin(self._kwargs)
        with self._acct or contextlib.nullcontext():
            self._manager = self._open()
            return self._entered(self._manager.__enter__())

    def __exit__(self, *exc: Any) -> Any:
        try:
            return self._manager.__exit__(*exc)
        finally:
            self._settle()

    async def __aenter__(self) -> Any:
        self._acct = self._adapter._begin(self._kwargs)
        if self._acct is not None:
            await self._acct.durable()
        with self._acct or contextlib.nullcontext():
            self._manager = self._open()
            return self._entered(await self._manager.__aenter__())

    async def __aexit__(self, *exc: Any) -> Any:
        try:
            return await self._manager.__aexit__(*exc)
        finally:
            self._settle()


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
        _wrap_method(self, chat, "create", _chat_stream, prepare=_include_usage)
        responses = getattr(client, "responses", None)
        if responses is not None and hasattr(responses, "create"):
            _wrap_method(self, responses, "create", _responses_stream)
        return client

    sync_client = "openai.OpenAI"

    def _judge_resource(self, client: Any) -> Any:
        return getattr(getattr(client, "chat", None), "completions", None)

    def _judge_request(self, content: str, max_tokens: int) -> dict[str, Any]:
        # max_completion_tokens bounds reasoning models' replies too
        return {"model": self.model, "max_completion_tokens": max_tokens, "messages": [{"role": "user", "content": content}]}

    def _reply_text(self, response: Any) -> str:
        return str(response.choices[0].message.content or "")


def _chat_stream(raw: Any, acct: _Call) -> _StreamProxy:
    def feed(chunk: Any, seen: _StreamUsage) -> bool:
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            seen.usage, seen.final = _dump(usage), True
            if acct.injected and not getattr(chunk, "choices", None):
                return False  # the usage-only chunk the caller did not ask for
        return True

    return _StreamProxy(raw, acct, feed, _reported)


def _responses_stream(raw: Any, acct: _Call) -> _StreamProxy:
    def feed(ev: Any, seen: _StreamUsage) -> bool:
        usage = getattr(getattr(ev, "response", None), "usage", None)
        if usage is not None:
            seen.usage, seen.final = _dump(usage), True
        return True

    return _StreamProxy(raw, acct, feed, _reported)


def _reported(seen: _StreamUsage) -> Any:
    return seen.usage  # none reported: the whole reservation is settled


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
