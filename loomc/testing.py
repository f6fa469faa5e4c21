"""An offline LLM API for tests and demos: a threaded HTTP server on 127.0.0.1 that speaks
the Anthropic and OpenAI wire formats.

Point the real SDK clients at it with ``base_url`` to run a budgeted loop end to end —
adapters, reservations, retries, circuit breakers — with no network and no key::

    from loomc.testing import serve

    with serve() as api:
        api.reply = lambda path, request: "a better draft"
        client = anthropic.Anthropic(base_url=api.base_url, api_key="test")
        ...

It answers

- ``POST /v1/messages`` (Anthropic Messages; SSE when ``"stream": true``),
- ``POST /v1/chat/completions`` (OpenAI Chat Completions; SSE with an optional usage chunk),
- ``POST /v1/responses`` (OpenAI Responses; SSE events ending in ``response.completed``),

with the usage given in :attr:`FakeAPI.usage`, records every request it saw, and plays
scripted failures (``fail(429)``, ``fail(529)``) before answering normally.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class TokenUsage:
    """Token counts the server reports for every call (what a provider bills, not a run's budget usage)."""

    input: int = 1000
    output: int = 200
    cache_read: int = 0
    cache_write: int = 0
    cache_write_1h: int = 0


@dataclass
class FakeAPI:
    """The server's script and record; ``base_url`` for Anthropic, ``openai_url`` for OpenAI."""

    port: int = 0
    usage: TokenUsage = field(default_factory=TokenUsage)
    text: str = "YES"
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    failures: list[tuple[int, float | None]] = field(default_factory=list)
    cut_stream: bool = False  # end SSE streams before their final usage event
    #: ``reply(path, request) -> text``: the answer's text for each request (default: ``text``)
    reply: Any = None

    @property
    def base_url(self) -> str:
        """Base URL for ``anthropic.Anthropic(base_url=...)``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        """Base URL for ``openai.OpenAI(base_url=...)``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def fail(self, status: int, times: int = 1, retry_after: float | None = 0.0) -> None:
        """Answer the next ``times`` requests with HTTP ``status`` (429 rate limit, 529 overloaded...)."""
        self.failures.extend([(status, retry_after)] * times)

    def paths(self) -> list[str]:
        """The paths of the requests seen so far."""
        return [p for p, _ in self.requests]


def _anthropic_usage(u: TokenUsage) -> dict[str, Any]:
    return {
        "input_tokens": u.input,
        "output_tokens": u.output,
        "cache_read_input_tokens": u.cache_read,
        "cache_creation_input_tokens": u.cache_write + u.cache_write_1h,
        "cache_creation": {"ephemeral_5m_input_tokens": u.cache_write, "ephemeral_1h_input_tokens": u.cache_write_1h},
    }


def _chat_usage(u: TokenUsage) -> dict[str, Any]:
    prompt = u.input + u.cache_read
    return {
        "prompt_tokens": prompt, "completion_tokens": u.output, "total_tokens": prompt + u.output,
        "prompt_tokens_details": {"cached_tokens": u.cache_read},
    }


def _responses_usage(u: TokenUsage) -> dict[str, Any]:
    prompt = u.input + u.cache_read
    return {
        "input_tokens": prompt, "input_tokens_details": {"cached_tokens": u.cache_read},
        "output_tokens": u.output, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + u.output,
    }


def _message(model: str, text: str, u: TokenUsage) -> dict[str, Any]:
    return {
        "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": _anthropic_usage(u),
    }


def _chat(model: str, text: str, u: TokenUsage) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": _chat_usage(u),
    }


def _response(model: str, text: str, u: TokenUsage | None, status: str = "completed") -> dict[str, Any]:
    return {
        "id": "resp_fake", "object": "response", "created_at": 1, "model": model, "status": status,
        "output": [] if u is None else [{
            "type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }],
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        "usage": None if u is None else _responses_usage(u),
    }


def _anthropic_sse(model: str, text: str, u: TokenUsage, cut: bool) -> Iterator[str]:
    start = _message(model, "", u)
    start["content"] = []
    start["stop_reason"] = None
    start["usage"] = {**_anthropic_usage(u), "output_tokens": 1}
    yield _sse("message_start", {"type": "message_start", "message": start})
    yield _sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    for word in text.split(" "):
        yield _sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}})
    if cut:
        return
    yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
    yield _sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                 "usage": {"output_tokens": u.output}})
    yield _sse("message_stop", {"type": "message_stop"})


def _chat_sse(model: str, text: str, u: TokenUsage, include_usage: bool, cut: bool) -> Iterator[str]:
    base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model}
    yield _sse(None, {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}]})
    if cut:
        return
    yield _sse(None, {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if include_usage:
        yield _sse(None, {**base, "choices": [], "usage": _chat_usage(u)})
    yield "data: [DONE]\n\n"


def _responses_sse(model: str, text: str, u: TokenUsage, cut: bool) -> Iterator[str]:
    yield _sse("response.created", {"type": "response.created", "sequence_number": 0,
                                    "response": _response(model, "", None, "in_progress")})
    yield _sse("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": 1,
                                              "item_id": "msg_fake", "output_index": 0, "content_index": 0, "delta": text,
                                              "logprobs": []})
    if cut:
        return
    yield _sse("response.completed", {"type": "response.completed", "sequence_number": 2,
                                      "response": _response(model, text, u)})


def _sse(event: str | None, data: dict[str, Any]) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n"


def _error_body(path: str, status: int) -> dict[str, Any]:
    kind = {429: "rate_limit_error", 529: "overloaded_error", 500: "api_error", 400: "invalid_request_error"}.get(status, "api_error")
    if path.endswith("/messages"):
        return {"type": "error", "error": {"type": kind, "message": f"fake {kind}"}}
    return {"error": {"message": f"fake {kind}", "type": kind, "code": kind, "param": None}}


def _handler(api: FakeAPI, lock: threading.Lock) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        wbufsize = 1 << 16  # one write per response: no Nagle / delayed-ACK stalls on loopback
        disable_nagle_algorithm = True

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            path = self.path.split("?")[0]
            with lock:
                api.requests.append((path, body))
                failure = api.failures.pop(0) if api.failures else None
            if failure is not None:
                status, retry_after = failure
                headers = {} if retry_after is None else {"retry-after": str(retry_after)}
                self._json(status, _error_body(path, status), headers)
                return
            model = str(body.get("model", "unknown"))
            stream = bool(body.get("stream"))
            u, text, cut = api.usage, api.text, api.cut_stream
            if api.reply is not None:
                text = str(api.reply(path, body))
            if path.endswith("/messages"):
                if stream:
                    self._sse(_anthropic_sse(model, text, u, cut))
                else:
                    self._json(200, _message(model, text, u))
            elif path.endswith("/chat/completions"):
                if stream:
                    include = bool((body.get("stream_options") or {}).get("include_usage"))
                    self._sse(_chat_sse(model, text, u, include, cut))
                else:
                    self._json(200, _chat(model, text, u))
            elif path.endswith("/responses"):
                if stream:
                    self._sse(_responses_sse(model, text, u, cut))
                else:
                    self._json(200, _response(model, text, u))
            else:
                self._json(404, {"error": {"message": f"no route {path}"}})

        def _json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _sse(self, chunks: Iterator[str]) -> None:
            data = "".join(chunks).encode()
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


#: The name loomc 0.5.0 gave :class:`TokenUsage`.
Usage = TokenUsage

__all__ = ["FakeAPI", "TokenUsage", "Usage", "serve"]


@contextmanager
def serve() -> Iterator[FakeAPI]:
    """Run a :class:`FakeAPI` on a free loopback port for the duration of the block."""
    api = FakeAPI()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api, threading.Lock()))
    server.daemon_threads = True
    api.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
