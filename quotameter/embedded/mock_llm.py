"""An OpenAI-compatible mock model server, for tests, demos and benchmarks.

Its answers are deterministic: ``prompt_tokens`` is the prompt counted by
``quotameter.tokens``, and the completion is N one-token words, where N is
``max_completion_tokens`` / ``max_tokens`` or 16, so a shim that counts the
delivered text itself arrives at exactly N too.

Faults are chosen per request with the ``x-mock-fault`` header, a comma list:

    cut-after=3   stream: close the connection after 3 content chunks, no [DONE]
    status=500    answer with that status and an OpenAI error body
    garbage       answer 200 with a body that is not JSON (or SSE data that is not)
    no-usage      never report usage

``POST /v1/messages`` answers as Anthropic's Messages API does (mock_messages.py),
with the same faults; its answers carry the ``x-api-key`` it was sent in
``x-mock-api-key`` (``none`` without one), so a test sees which credential
reached the model.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from quotameter.embedded import mock_messages, mock_responses
from quotameter.tokens import count_prompt

# Each word is one token in o200k_base and cl100k_base, alone and after a space.
WORDS = ("alpha", "delta", "echo", "hotel", "the", "and", "cat", "dog", "sun", "red", "blue", "tree")
DEFAULT_COMPLETION_TOKENS = 16
DEFAULT_MODEL = "mock-small"
MODELS = ("mock-small", "mock-large", "gpt-4o-mini", "gpt-4o")
FAULT_HEADER = "x-mock-fault"
SEEN_KEY_HEADER = "x-mock-api-key"  # the key the model was sent (x-api-key, or the Bearer of a chat JSON request)


def completion_pieces(n_tokens: int) -> list[str]:
    """The completion as N pieces of exactly one token each."""
    return [("" if i == 0 else " ") + WORDS[i % len(WORDS)] for i in range(n_tokens)]


@dataclass(frozen=True, slots=True)
class Fault:
    cut_after: int | None = None
    status: int | None = None
    garbage: bool = False
    no_usage: bool = False


def parse_fault(header: str | None) -> Fault:
    values: dict[str, Any] = {}
    for item in (header or "").split(","):
        name, _, arg = item.strip().partition("=")
        if name == "cut-after":
            values["cut_after"] = int(arg)
        elif name == "status":
            values["status"] = int(arg)
        elif name in ("garbage", "no-usage"):
            values[name.replace("-", "_")] = True
    return Fault(**values)


async def _read(request: web.Request) -> tuple[Fault, Any] | web.Response:
    """The request's fault header and JSON body, or the 400 answering either."""
    try:
        fault = parse_fault(request.headers.get(FAULT_HEADER))
    except ValueError:
        return _error(400, f"bad {FAULT_HEADER} header")
    try:
        return fault, json.loads(await request.read())
    except ValueError:
        return _error(400, "We could not parse the JSON body of your request.")


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class MockLLM:
    def __init__(self, token_delay_ms: float = 0.0) -> None:
        self.token_delay_s = max(token_delay_ms, 0.0) / 1000
        self.prompt_cache = mock_messages.PromptCache()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)  # as large a prompt as a shim lets through
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/messages", self.messages)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "quotameter-mock"} for m in MODELS]
        return web.json_response({"object": "list", "data": data})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        read = await _read(request)
        if isinstance(read, web.Response):
            return read
        fault, body = read
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, "'messages' is a required property", code="missing_required_parameter")
        if fault.status:
            return _error(fault.status, f"mock fault: status {fault.status}", kind="server_error")
        model = body.get("model") or DEFAULT_MODEL
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        pieces = completion_pieces(int(limit) if limit else DEFAULT_COMPLETION_TOKENS)
        finish = "length" if limit else "stop"
        usage = None if fault.no_usage else _usage(count_prompt(body, model), len(pieces))
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await self._stream(request, model, pieces, finish, usage, include_usage, fault)
        if fault.garbage:
            return web.Response(body=b'{"id": "chatcmpl-garbage", "choices": [', content_type="application/json")
        answer = {
            **_envelope(model, "chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(pieces), "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
        }
        if usage:
            answer["usage"] = usage
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        return web.json_response(answer, headers={SEEN_KEY_HEADER: bearer or "none"})

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """The Responses API (mock_responses.py)."""
        read = await _read(request)
        if isinstance(read, web.Response):
            return read
        fault, body = read
        if not isinstance(body, dict) or not isinstance(body.get("input"), str | list):
            return _error(400, "'input' is a required property", code="missing_required_parameter")
        if fault.status:
            return _error(fault.status, f"mock fault: status {fault.status}", kind="server_error")
        limit = body.get("max_output_tokens")
        pieces = completion_pieces(int(limit) if limit else DEFAULT_COMPLETION_TOKENS)
        return await mock_responses.respond(request, body, pieces, body.get("model") or DEFAULT_MODEL,
                                            fault.no_usage, fault.cut_after, self.token_delay_s)

    async def _stream(
        self,
        request: web.Request,
        model: str,
        pieces: list[str],
        finish: str,
        usage: dict[str, int] | None,
        include_usage: bool,
        fault: Fault,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        envelope = _envelope(model, "chat.completion.chunk")
        if include_usage:
            envelope["usage"] = None  # as OpenAI does: null on every chunk, then a usage-only chunk

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            chunk = {**envelope, "choices": choices, **extra}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        def choice(delta: dict[str, Any], finish_reason: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]

        if fault.garbage:
            await response.write(b"data: {this is not json\n\n")
        await send(choice({"role": "assistant", "content": ""}))
        for sent, piece in enumerate(pieces):
            if fault.cut_after is not None and sent >= fault.cut_after:
                # An abrupt end: no final chunk, no [DONE], no terminating HTTP chunk.
                assert request.transport is not None
                request.transport.abort()
                return response
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            await send(choice({"content": piece}))
        await send(choice({}, finish))
        if usage and include_usage:
            await send([], usage=usage)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def messages(self, request: web.Request) -> web.StreamResponse:
        def error(status: int, message: str) -> web.Response:
            return web.json_response(mock_messages.error_body(status, message), status=status)

        try:
            fault = parse_fault(request.headers.get(FAULT_HEADER))
        except ValueError:
            return error(400, f"bad {FAULT_HEADER} header")
        try:
            body = json.loads(await request.read())
        except ValueError:
            return error(400, "The request body is not valid JSON.")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return error(400, "messages: Field required")
        if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
            return error(400, "max_tokens: Field required")
        if fault.status:
            return error(fault.status, f"mock fault: status {fault.status}")
        body.setdefault("model", DEFAULT_MODEL)
        message = mock_messages.answer(body, self.prompt_cache, completion_pieces(mock_messages.MAX_WORDS))
        seen = {SEEN_KEY_HEADER: request.headers.get("x-api-key", "none")}
        if body.get("stream"):
            return await self._messages_stream(request, message, fault, seen)
        if fault.garbage:
            return web.Response(body=b'{"type": "message", "content": [', content_type="application/json")
        return web.json_response(mock_messages.message_json(message, not fault.no_usage), headers=seen)

    async def _messages_stream(
        self, request: web.Request, message: mock_messages.MockMessage, fault: Fault, seen: dict[str, str]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **seen})
        await response.prepare(request)
        usage = not fault.no_usage
        if fault.garbage:
            await response.write(b"event: content_block_delta\ndata: {this is not json\n\n")
        for event in mock_messages.stream_head(message, usage):
            await response.write(event)
        for sent, word in enumerate(message.words):
            if fault.cut_after is not None and sent >= fault.cut_after:
                assert request.transport is not None
                request.transport.abort()  # an abrupt end: no message_delta, no message_stop
                return response
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            await response.write(mock_messages.stream_word(word))
        for event in mock_messages.stream_tail(message, usage):
            await response.write(event)
        await response.write_eof()
        return response


def _envelope(model: str, kind: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-mock{uuid.uuid4().hex[:20]}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_quotameter_mock",
    }


async def _serve(host: str, port: int, token_delay_ms: float) -> None:
    runner = web.AppRunner(MockLLM(token_delay_ms).app(), access_log=None, shutdown_timeout=5)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()  # a shim's burst connects at once
    bound_port = runner.addresses[0][1] if runner.addresses else port
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"mock-llm listening on http://{host}:{bound_port}/v1", flush=True)
    await stop.wait()
    await runner.cleanup()


def serve(host: str, port: int, token_delay_ms: float) -> None:
    """Run the mock until SIGINT or SIGTERM (blocking)."""
    asyncio.run(_serve(host, port, token_delay_ms))
