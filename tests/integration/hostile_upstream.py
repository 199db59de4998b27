"""An upstream that misbehaves on purpose, one way per model name, for the
shim to survive: ``POST /v1/chat/completions`` with ``"model": "<behaviour>"``.

Each answer is built from the mock's one-token words (completion_pieces), so
what a client received can be counted exactly; when an answer reports usage,
it reports the truth (prompt counted as the mock does, one token per piece),
except where lying is the behaviour.

It runs inside the test's own event loop (``start_hostile``), on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from aiohttp import web

from quotameter.embedded.mock_llm import completion_pieces
from quotameter.tokens import count_prompt

PIECES = 6  # content chunks of a normal answer
BIG_BYTES = 10 * 1024 * 1024  # the one huge JSON body / SSE event
# The big answer's text: one-token words, BIG_BYTES of them in all.
BIG_WORD = " word"
BIG_WORDS = BIG_BYTES // len(BIG_WORD)
OVERSIZE_BYTES = 17 * 1024 * 1024  # past the tests' upstream.max_response_bytes (16 MiB)
RESET_AFTER = 3  # content chunks sent before the connection is aborted
LIE = {"prompt_tokens": 999, "completion_tokens": 999, "total_tokens": 1998}  # a first usage chunk, superseded

JSON_BEHAVIOURS = ("invalid-json", "error-200", "json-as-text", "big-json", "reset-json", "oversize-json")
STREAM_BEHAVIOURS = (
    "sse-garbage", "sse-no-usage", "sse-dup-usage", "sse-big-event", "sse-reset", "sse-as-json", "stream-json",
    "sse-keepalive-forever", "sse-silent-forever", "sse-data-forever", "sse-oversize-event",
)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _envelope(model: str, kind: str) -> dict[str, Any]:
    return {"id": "chatcmpl-hostile", "object": kind, "created": 1_700_000_000, "model": model}


def _completion(model: str, content: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        **_envelope(model, "chat.completion"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                     "finish_reason": "stop"}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(model: str, content: str | None = None, finish: str | None = None, **extra: Any) -> bytes:
    delta: dict[str, Any] = {} if content is None else {"content": content}
    body = {**_envelope(model, "chat.completion.chunk"),
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


@cache
def _big_chunk(model: str) -> bytes:
    return chunk(model, BIG_WORD * BIG_WORDS)


def usage_chunk(model: str, reported: dict[str, int]) -> bytes:
    body = {**_envelope(model, "chat.completion.chunk"), "choices": [], "usage": reported}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


@dataclass
class Hostile:
    port: int
    runner: web.AppRunner
    served: dict[str, int]  # requests answered, per behaviour
    open_streams: int = 0  # answers still being written

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def connections(self) -> int:
        """Connections open to it (each holds a task while it lives)."""
        server = self.runner.server
        return 0 if server is None else len(server.connections)

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_hostile(port: int) -> Hostile:
    hostile: Hostile
    handlers: dict[str, Callable[[web.Request, str, int, bool], Awaitable[web.StreamResponse]]] = {
        "invalid-json": _invalid_json, "error-200": _error_200, "json-as-text": _json_as_text,
        "big-json": _big_json, "reset-json": _reset_json, "oversize-json": _oversize_json,
        "sse-oversize-event": _sse_oversize_event,
        "sse-garbage": _sse_garbage, "sse-no-usage": _sse_no_usage, "sse-dup-usage": _sse_dup_usage,
        "sse-big-event": _sse_big_event, "sse-reset": _sse_reset, "sse-as-json": _sse_as_json,
        "stream-json": _stream_json, "sse-keepalive-forever": _sse_keepalive_forever,
        "sse-silent-forever": _sse_silent_forever, "sse-data-forever": _sse_data_forever,
        "sse-stall-before-done": _sse_stall_before_done,
    }

    async def chat(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        model = body["model"]
        hostile.served[model] = hostile.served.get(model, 0) + 1
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        hostile.open_streams += 1
        try:
            return await handlers[model](request, model, count_prompt(body, model), include_usage)
        except ConnectionError:  # the shim hung up on a never-ending answer: as it should
            return web.Response()
        finally:
            hostile.open_streams -= 1

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    hostile = Hostile(port, runner, {})
    return hostile


def text_of(pieces: list[str]) -> str:
    return "".join(pieces)


# --- whole (JSON) answers -------------------------------------------------

async def _invalid_json(request: web.Request, model: str, prompt: int, _: bool) -> web.StreamResponse:
    cut_short = b'{"id": "chatcmpl-hostile", "choices": [{"message": {"content": "cut'
    return web.Response(body=cut_short, content_type="application/json")


async def _error_200(request: web.Request, model: str, prompt: int, _: bool) -> web.StreamResponse:
    error = {"error": {"message": "The engine is currently overloaded.", "type": "server_error", "param": None,
                       "code": "overloaded"}}
    return web.json_response(error, status=200)


async def _json_as_text(request: web.Request, model: str, prompt: int, _: bool) -> web.StreamResponse:
    pieces = completion_pieces(PIECES)
    body = json.dumps(_completion(model, text_of(pieces), prompt, len(pieces)))
    return web.Response(text=body, content_type="text/plain")


@cache
def _big_body(model: str, prompt: int, words: int, reported: int) -> bytes:
    """A huge answer, encoded once: encoding it per request would stall this loop, and the shim's reads."""
    return json.dumps(_completion(model, BIG_WORD * words, prompt, reported)).encode()


async def _big_json(request: web.Request, model: str, prompt: int, _: bool) -> web.StreamResponse:
    return web.Response(body=_big_body(model, prompt, BIG_WORDS, BIG_WORDS), content_type="application/json")


async def _oversize_json(request: web.Request, model: str, prompt: int, _: bool) -> web.StreamResponse:
    """Valid JSON, too large, without a Content-Length to tell it in advance."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    body = _big_body(model, prompt, OVERSIZE_BYTES // len(BIG_WORD), 1)
    for i in range(0, len(body), 1 << 20):
        await response.write(body[i : i + (1 << 20)])
    return response


async def _reset_json(request: web.Request, model: str, prompt: int, _: bool) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    await response.write(b'{"id": "chatcmpl-hostile", "object": "chat.completion", "choices": [')
    await _abort(request)
    return response


# --- streams ----------------------------------------------------------------

async def _sse(request: web.Request, content_type: str = "text/event-stream") -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": content_type})
    await response.prepare(request)
    return response


async def _abort(request: web.Request) -> None:
    await asyncio.sleep(0.01)  # let what was written reach the shim first
    if request.transport is not None:
        request.transport.abort()


async def _normal_stream(request: web.Request, model: str, prompt: int, include_usage: bool,
                         content_type: str = "text/event-stream") -> web.StreamResponse:
    response = await _sse(request, content_type)
    pieces = completion_pieces(PIECES)
    await response.write(b"".join(chunk(model, piece) for piece in pieces) + chunk(model, finish="stop"))
    if include_usage:
        await response.write(usage_chunk(model, usage(prompt, len(pieces))))
    await response.write(DONE)
    return response


STALL_BEFORE_DONE_S = 1.5


async def _sse_stall_before_done(request: web.Request, model: str, prompt: int, include_usage: bool) -> web.StreamResponse:
    """The whole answer and its usage, then a pause before [DONE] (a slow server's last write)."""
    response = await _sse(request)
    pieces = completion_pieces(PIECES)
    await response.write(b"".join(chunk(model, piece) for piece in pieces) + chunk(model, finish="stop")
                         + usage_chunk(model, usage(prompt, len(pieces))))
    await asyncio.sleep(STALL_BEFORE_DONE_S)
    await response.write(DONE)
    return response


async def _sse_garbage(request: web.Request, model: str, prompt: int, include_usage: bool) -> web.StreamResponse:
    """Comments, data that is not JSON, unknown fields and lines, CR-only line ends,
    among GARBAGE_PIECES good chunks."""
    response = await _sse(request)
    p = completion_pieces(PIECES)
    cr_event = chunk(model, p[3]).replace(b"\n", b"\r")
    await response.write(
        b": a comment\n\n"
        + b"data: this is not json\n\n"
        + chunk(model, p[0])
        + b"data: {\"truncated\": \n\n"
        + b"retry: 100\nid: 7\nx-unknown-field: 1\n" + chunk(model, p[1])
        + chunk(model, p[2], x_vendor={"trace": [1, 2, 3]})  # an unknown member
        + b"event: ping\ndata: 12345\n\n"  # data that is JSON, but no chunk
        + cr_event
        + b":\r\r"
        + chunk(model, p[4]).replace(b"\n", b"\r\n")
        + chunk(model, p[5])
        + chunk(model, finish="stop")
    )
    if include_usage:
        await response.write(usage_chunk(model, usage(prompt, PIECES)))
    await response.write(DONE)
    return response


async def _sse_no_usage(request: web.Request, model: str, prompt: int, include_usage: bool) -> web.StreamResponse:
    return await _normal_stream(request, model, prompt, False)


async def _sse_dup_usage(request: web.Request, model: str, prompt: int, include_usage: bool) -> web.StreamResponse:
    response = await _sse(request)
    pieces = completion_pieces(PIECES)
    await response.write(b"".join(chunk(model, piece) for piece in pieces) + chunk(model, finish="stop"))
    await response.write(usage_chunk(model, LIE) + usage_chunk(model, usage(prompt, len(pieces))) + DONE)
    return response


async def _sse_big_event(request: web.Request, model: str, prompt: int, include_usage: bool) -> web.StreamResponse:
    response = await _sse(request)
    await response.write(_big_chunk(model))  # one 10 MB event, in one write
    await response.write(chunk(model, finish="stop"))
    if include_usage:
        await response.write(usage_chunk(model, usage(prompt, BIG_WORDS)))
    await response.write(DONE)
    return response


async def _sse_oversize_event(request: web.Request, model: str, prompt: int, _: bool) -> web.StreamResponse:
    """A whole chunk, then one event that grows past the limit (and never ends)."""
    response = await _sse(request)
    await response.write(chunk(model, completion_pieces(1)[0]))
    await response.write(b'data: {"choices": [{"delta": {"content": "')
    piece = BIG_WORD.encode() * (1 << 18)
    for _ in range(OVERSIZE_BYTES // len(piece) + 1):
        await response.write(piece)
    await response.write(b'"}}]}\n\n' + DONE)
    return response


async def _sse_reset(request: web.Request, model: str, prompt: int, include_usage: bool) -> web.StreamResponse:
    response = await _sse(request)
    pieces = completion_pieces(PIECES)
    half = chunk(model, pieces[RESET_AFTER])
    await response.write(b"".join(chunk(model, piece) for piece in pieces[:RESET_AFTER]) + half[: len(half) // 2])
    await _abort(request)
    return response


async def _sse_as_json(request: web.Request, model: str, prompt: int, include_usage: bool) -> web.StreamResponse:
    return await _normal_stream(request, model, prompt, include_usage, content_type="application/json")


async def _stream_json(request: web.Request, model: str, prompt: int, include_usage: bool) -> web.StreamResponse:
    pieces = completion_pieces(PIECES)
    return web.json_response(_completion(model, text_of(pieces), prompt, len(pieces)))


async def _sse_keepalive_forever(request: web.Request, model: str, prompt: int, _: bool) -> web.StreamResponse:
    response = await _sse(request)
    await response.write(chunk(model, completion_pieces(1)[0]))
    while True:
        await response.write(b": keep-alive\n\n")
        await asyncio.sleep(0.05)


async def _sse_silent_forever(request: web.Request, model: str, prompt: int, _: bool) -> web.StreamResponse:
    response = await _sse(request)
    await response.write(chunk(model, completion_pieces(1)[0]))
    while request.transport is not None and not request.transport.is_closing():  # until the shim hangs up
        await asyncio.sleep(0.05)
    return response


async def _sse_data_forever(request: web.Request, model: str, prompt: int, _: bool) -> web.StreamResponse:
    response = await _sse(request)
    while True:
        await response.write(chunk(model, BIG_WORD))
        await asyncio.sleep(0.002)
