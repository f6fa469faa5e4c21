"""A draft refiner on the real Anthropic SDK: every call charged, rate limits retried, a judge to stop.

    pip install 'loomc[anthropic]'
    python examples/llm_refiner.py            # offline: a local fake API on 127.0.0.1
    ANTHROPIC_API_KEY=... python examples/llm_refiner.py --live

Offline it starts ``loomc.testing``'s fake Anthropic API (real HTTP, the API's own JSON),
which answers with a slightly longer draft each call, pretends to be rate-limited once,
and reports token usage like the real service. What it shows:

- ``AnthropicAdapter.wrap(client)``: each call reserves its maximum cost before it is sent
  (refused with ``BudgetExhausted`` if the $0.05 cap cannot take it) and settles the real
  cost from ``usage`` afterwards;
- ``retry=Retry(...)``: the 429 is retried with backoff inside the step, and the retry is
  visible in ``loomc show``;
- ``adapter.judge(...)``: an LLM judge decides when the draft is done; its own calls are
  charged to the run too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys
from collections.abc import Iterator
from typing import Any

try:
    import anthropic
except ImportError:  # pragma: no cover - the example says what to install
    raise SystemExit("this example needs the Anthropic SDK: pip install 'loomc[anthropic]'") from None

from loomc import AnthropicAdapter, Budget, Retry, loop
from loomc.testing import FakeAPI, serve

MODEL = "claude-haiku-4-5"


@contextlib.contextmanager
def client_for(live: bool) -> Iterator[anthropic.Anthropic]:
    """The real client against the real API, or against the local fake one."""
    if live:
        yield anthropic.Anthropic()
        return
    with serve() as api:
        api.fail(429, times=1)  # the first call is rate-limited, as real APIs sometimes are
        api.reply = _offline_reply(api)
        yield anthropic.Anthropic(base_url=api.base_url, api_key="offline", max_retries=0)


def _offline_reply(api: FakeAPI) -> Any:
    drafts = iter(["Tides are caused by the Moon.",
                   "Tides are caused mainly by the Moon's gravity, and partly by the Sun's.",
                   "Tides rise and fall twice a day, driven mainly by the Moon's gravity and partly by the Sun's."])

    def reply(path: str, request: dict[str, Any]) -> str:
        prompt = str(request["messages"][-1]["content"])
        if prompt.startswith("Reply YES"):  # the judge
            return "YES" if "twice a day" in prompt else "NO"
        return next(drafts, "Tides rise and fall twice a day.")

    return reply


def main() -> None:
    """Refine a one-line explanation until the judge accepts it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", action="store_true", help="call the real Anthropic API (needs ANTHROPIC_API_KEY)")
    args = parser.parse_args()
    if args.live and not os.environ.get("ANTHROPIC_API_KEY"):
        raise SystemExit(
            "llm_refiner.py: --live calls the real Anthropic API and needs ANTHROPIC_API_KEY; "
            "set it (export ANTHROPIC_API_KEY=...) or run without --live to use the local fake API"
        )
    adapter = AnthropicAdapter(MODEL)
    with client_for(args.live) as raw:
        client = adapter.wrap(raw)

        @loop(
            budget=Budget(usd=0.05, iterations=6),
            retry=Retry(attempts=3, initial=0.2, jitter=0.1),
            converge_on=adapter.judge(
                client, prompt="Reply YES if this explains tides correctly and completely, NO otherwise.",
                text_fn=lambda s: s["draft"],
            ),
        )
        def refine(state: dict[str, Any]) -> dict[str, Any]:
            msg = client.messages.create(
                model=MODEL, max_tokens=300,
                messages=[{"role": "user", "content": f"Improve this explanation in one sentence:\n{state['draft']}"}],
            )
            return {"draft": msg.content[0].text}  # type: ignore[union-attr]

        run_id = secrets.token_hex(6)  # chosen up front, so it is on screen before the first call
        print(f"run {run_id}: starting (inspect it any time: loomc show {run_id})", flush=True)
        try:
            result = refine.run({"draft": "Tides happen."}, run_id=run_id)
        except KeyboardInterrupt:
            print(f"\ninterrupted: run {run_id} keeps every committed step; see them with: loomc show {run_id}",
                  file=sys.stderr)
            raise SystemExit(130) from None
        except anthropic.APIStatusError as exc:
            raise SystemExit(f"llm_refiner.py: the Anthropic API refused the call ({exc.status_code}): {exc.message}") from None
    print(f"run {result.run_id}: {result.status.value} after {result.steps} steps, ${result.cost_usd:.6f}")
    print(f"final draft: {result.state['draft']}")
    print(f"see every call's cost and the retry: loomc show {result.run_id}")


if __name__ == "__main__":
    main()
