"""Per-model prices (USD per 1M tokens) and the cost of one call from its ``usage``.

Prices checked on 2026-11-25 against the providers' published pricing:

- Anthropic: https://platform.claude.com/docs/en/about-claude/pricing ("Model pricing":
  base input, 5-minute and 1-hour cache writes, cache hits, output) and the model pages
  under https://platform.claude.com/docs/en/models/ for the 5.x models.
- OpenAI: https://developers.openai.com/api/docs/pricing ("Standard" text tokens: input,
  cached input, output). The GPT-4.x / GPT-4o / o-series rows are the prices that page
  listed while those models were current; they remain billable at those rates.

A model missing from the tables is priced at its provider's most expensive tier (each
rate the highest in the table) with a one-time warning, so a cost is never under-counted;
``AnthropicAdapter(model, pricing=...)`` / ``OpenAIAdapter(model, pricing=...)`` override.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from loomc._core.errors import CostError
from loomc._core.money import check_usd

__all__ = [
    "ANTHROPIC_PRICES",
    "OPENAI_PRICES",
    "PRICES_CHECKED",
    "Price",
    "anthropic_cost",
    "base_name",
    "lookup",
    "openai_cost",
]

PRICES_CHECKED = "2026-11-25"
_M = 1_000_000.0


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens for one model.

    Attributes:
        input: uncached input tokens.
        output: output tokens (reasoning/thinking tokens included).
        cache_read: input tokens read from the prompt cache.
        cache_write: input tokens written to the cache (Anthropic's 5-minute TTL; OpenAI
            bills cache writes as plain input).
        cache_write_1h: Anthropic's 1-hour TTL cache writes (``None``: same as ``cache_write``).
        long_above: a prompt (input + cache reads + cache writes) longer than this many
            tokens is billed entirely at ``long`` (long-context tier), output included.
        long: the long-context rates.
        fast: multiplier for Anthropic's ``speed="fast"`` mode.
    """

    input: float
    output: float
    cache_read: float
    cache_write: float
    cache_write_1h: float | None = None
    long_above: int | None = None
    long: Price | None = None
    fast: float = 6.0

    def __post_init__(self) -> None:
        # A price is money entering loomc: NaN, infinite or negative rates would make every
        # cost computed from them wrong (NaN passes any cap comparison).
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "long":
                if value is not None and not isinstance(value, Price):
                    raise TypeError(f"Price(long={value!r}): expected a Price or None")
            elif f.name == "long_above":
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                    raise ValueError(f"Price(long_above={value!r}): expected a number of tokens >= 0 or None")
            elif value is not None:
                unit = "times the base price" if f.name == "fast" else "USD per 1M tokens"
                object.__setattr__(self, f.name, check_usd(value, f"Price({f.name}=...)", unit=unit))

    @classmethod
    def coerce(cls, value: Price | Mapping[str, float], *, provider: str) -> Price:
        """A :class:`Price` from itself or a mapping with ``input``/``output`` (cache rates optional).

        Missing cache rates are filled in the conservative way: cache reads at the input
        rate, Anthropic cache writes at 1.25x (5 minutes) and 2x (1 hour) input.
        """
        if isinstance(value, Price):
            return value
        if not isinstance(value, Mapping) or "input" not in value or "output" not in value:
            raise ValueError(
                f"pricing={value!r}: pass loomc.integrations.adapters.Price(...) or a dict with 'input' and 'output' "
                "(USD per 1M tokens; optional 'cache_read', 'cache_write', 'cache_write_1h')"
            )
        known = {"input", "output", "cache_read", "cache_write", "cache_write_1h"}
        extra = set(value) - known
        if extra:
            raise ValueError(f"pricing: unknown keys {sorted(extra)}; use {sorted(known)}")
        rates = {k: check_usd(v, f"pricing[{k!r}]", unit="USD per 1M tokens") for k, v in value.items()}
        inp = rates["input"]
        anthropic = provider == "anthropic"
        return cls(
            input=inp,
            output=rates["output"],
            cache_read=rates.get("cache_read", inp),
            cache_write=rates.get("cache_write", inp * 1.25 if anthropic else inp),
            cache_write_1h=rates.get("cache_write_1h", inp * 2.0 if anthropic else None),
        )


def _claude(inp: float, out: float, *, read: float | None = None, fast: float = 6.0, **kw: Any) -> Price:
    # The pricing page's multipliers: 5m writes 1.25x, 1h writes 2x, hits 0.1x base input.
    return Price(inp, out, inp * 0.1 if read is None else read, inp * 1.25, inp * 2.0, fast=fast, **kw)


_SONNET4_LONG = _claude(6.00, 22.50)  # prompts over 200K tokens on the 1M-context window

ANTHROPIC_PRICES: dict[str, Price] = {
    "claude-fable-5-1": _claude(10.00, 50.00, read=0.25),
    "claude-mythos-5-1": _claude(10.00, 50.00, read=0.25),
    "claude-fable-5": _claude(10.00, 50.00),
    "claude-mythos-5": _claude(10.00, 50.00),
    "claude-opus-5-5": _claude(4.00, 20.00, read=0.20, fast=2.0),
    "claude-opus-5": _claude(5.00, 25.00, fast=2.0),
    "claude-opus-4-8": _claude(5.00, 25.00),
    "claude-opus-4-7": _claude(5.00, 25.00),
    "claude-opus-4-6": _claude(5.00, 25.00),
    "claude-opus-4-5": _claude(5.00, 25.00),
    "claude-opus-4-1": _claude(15.00, 75.00),
    "claude-opus-4-0": _claude(15.00, 75.00),
    "claude-opus-4": _claude(15.00, 75.00),
    "claude-sonnet-5-5": _claude(2.00, 10.00, read=0.20),
    "claude-sonnet-5": _claude(2.00, 10.00),
    "claude-sonnet-4-6": _claude(3.00, 15.00),
    "claude-sonnet-4-5": _claude(3.00, 15.00, long_above=200_000, long=_SONNET4_LONG),
    "claude-sonnet-4-0": _claude(3.00, 15.00, long_above=200_000, long=_SONNET4_LONG),
    "claude-sonnet-4": _claude(3.00, 15.00, long_above=200_000, long=_SONNET4_LONG),
    "claude-3-7-sonnet": _claude(3.00, 15.00),
    "claude-haiku-5-5": _claude(0.10, 0.50, read=0.01, long_above=100_000, long=_claude(0.50, 2.50, read=0.05)),
    "claude-haiku-4-5": _claude(1.00, 5.00),
    "claude-3-5-haiku": _claude(0.80, 4.00),
    "claude-3-opus": _claude(15.00, 75.00),
    "claude-3-haiku": Price(0.25, 1.25, 0.03, 0.30, 0.50),
}


def _oa(inp: float, out: float, cached: float | None) -> Price:
    # No cached-input discount published (the "pro" models): cached input bills as input.
    return Price(inp, out, inp if cached is None else cached, inp)


OPENAI_PRICES: dict[str, Price] = {
    "gpt-5.5-pro": _oa(30.00, 180.00, None),
    "gpt-5.5": _oa(5.00, 30.00, 0.50),
    "gpt-5.4-pro": _oa(30.00, 180.00, None),
    "gpt-5.4": _oa(2.50, 15.00, 0.25),
    "gpt-5.4-mini": _oa(0.75, 4.50, 0.075),
    "gpt-5.4-nano": _oa(0.20, 1.25, 0.02),
    "gpt-5": _oa(1.25, 10.00, 0.125),
    "gpt-5-mini": _oa(0.25, 2.00, 0.025),
    "gpt-5-nano": _oa(0.05, 0.40, 0.005),
    "gpt-4.1": _oa(2.00, 8.00, 0.50),
    "gpt-4.1-mini": _oa(0.40, 1.60, 0.10),
    "gpt-4.1-nano": _oa(0.10, 0.40, 0.025),
    "gpt-4o": _oa(2.50, 10.00, 1.25),
    "gpt-4o-mini": _oa(0.15, 0.60, 0.075),
    "o3": _oa(2.00, 8.00, 0.50),
    "o4-mini": _oa(1.10, 4.40, 0.275),
    "o3-mini": _oa(1.10, 4.40, 0.55),
    "o1": _oa(15.00, 60.00, 7.50),
}


def _ceiling(table: Mapping[str, Price]) -> Price:
    """Every rate at its highest in ``table``: the price of a model we do not know."""
    ps = list(table.values())
    w1 = [p.cache_write_1h for p in ps if p.cache_write_1h is not None]
    return Price(
        max(p.input for p in ps), max(p.output for p in ps), max(p.cache_read for p in ps),
        max(p.cache_write for p in ps), max(w1) if w1 else None, fast=max(p.fast for p in ps),
    )


_CEILING = {"anthropic": _ceiling(ANTHROPIC_PRICES), "openai": _ceiling(OPENAI_PRICES)}
_TABLES = {"anthropic": ANTHROPIC_PRICES, "openai": OPENAI_PRICES}
_warned: set[tuple[str, str]] = set()
_SUFFIXES = (
    re.compile(r"-\d{8}$"),  # claude-haiku-4-5-20251001
    re.compile(r"-\d{4}-\d{2}-\d{2}$"),  # gpt-4o-2024-08-06
    re.compile(r"-latest$"),
    re.compile(r"\[1m\]$"),
)


def base_name(model: str) -> str:
    """``model`` without its snapshot date, ``-latest`` or ``[1m]`` suffix, lowercased."""
    name = model.strip().lower()
    for _ in range(2):
        for pat in _SUFFIXES:
            name = pat.sub("", name)
    return name


def lookup(provider: str, model: str) -> tuple[Price, bool]:
    """The price of ``model`` and whether it is known (dated snapshots map to their alias).

    An unknown model warns once per process and gets the provider's ceiling price.
    """
    table = _TABLES[provider]
    exact = model.strip().lower()
    if exact in table:
        return table[exact], True
    name = base_name(model)
    if name in table:
        return table[name], True
    if (provider, model) not in _warned:
        _warned.add((provider, model))
        ceil = _CEILING[provider]
        warnings.warn(
            f"loomc: no price on file for {provider} model {model!r}; charging it at the most expensive "
            f"{provider} rates (${ceil.input:g} in / ${ceil.output:g} out per 1M tokens) so the budget is never "
            f"under-counted. Pass pricing={{'input': ..., 'output': ...}} to the adapter to set its real price.",
            UserWarning,
            stacklevel=3,
        )
    return _CEILING[provider], False


def _n(obj: Any, name: str) -> int:
    """The token count ``obj.name`` (0 when absent); a negative or non-finite count is refused."""
    if obj is None:
        return 0
    v = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return 0
    if not 0 <= v < math.inf:
        raise CostError(
            f"the response's usage reports {name}={v!r}: a token count must be a finite number >= 0, "
            "so the call's cost cannot be computed"
        )
    return int(v)


def _attr(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def anthropic_cost(usage: Any, price: Price, *, speed: str | None = None, geo: str | None = None) -> float:
    """USD for one Messages API call from its ``usage`` (cache reads and writes included)."""
    inp = _n(usage, "input_tokens")
    read = _n(usage, "cache_read_input_tokens")
    write = _n(usage, "cache_creation_input_tokens")
    out = _n(usage, "output_tokens")
    split = _attr(usage, "cache_creation")
    w1h = _n(split, "ephemeral_1h_input_tokens")
    w5m = write - w1h if split is not None else write
    p = price
    if p.long_above is not None and p.long is not None and inp + read + write > p.long_above:
        p = replace(p.long, fast=p.fast)
    usd = (
        inp * p.input + read * p.cache_read + max(0, w5m) * p.cache_write
        + w1h * (p.cache_write_1h if p.cache_write_1h is not None else p.cache_write) + out * p.output
    ) / _M
    speed = speed or _attr(usage, "speed")
    geo = geo or _attr(usage, "inference_geo")
    if speed == "fast":
        usd *= p.fast
    if isinstance(geo, str) and geo.lower() == "us":
        usd *= 1.1
    return usd


def openai_cost(usage: Any, price: Price) -> float:
    """USD for one Chat Completions or Responses call from its ``usage`` (cached input included)."""
    prompt = _n(usage, "prompt_tokens") or _n(usage, "input_tokens")
    out = _n(usage, "completion_tokens") or _n(usage, "output_tokens")
    details = _attr(usage, "prompt_tokens_details") or _attr(usage, "input_tokens_details")
    cached = min(_n(details, "cached_tokens"), prompt)
    return ((prompt - cached) * price.input + cached * price.cache_read + out * price.output) / _M
