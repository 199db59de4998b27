"""The mock model's Responses API (``POST /v1/responses``), JSON and SSE.

The answer is the mock's usual N one-token words (N: ``max_output_tokens``,
else 16), as one message item. Its usage is the mock's own count, not the
shim's: every text of ``instructions`` and ``input`` (strings, and the
``text`` of content parts) counted alone, plus 4 tokens per input item and 4
for the instructions, so a test sees the upstream's report win over the
shim's estimate. A stream sends OpenAI's event sequence, each event named
(``event: response.output_text.delta``) and numbered (``sequence_number``).
The same faults as chat (``x-mock-fault``): cut-after, status, no-usage.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from aiohttp import web

from quotameter.tokens import count_text

_FRAMING_TOKENS = 4  # the mock's own, per input item and for the instructions


def input_tokens(body: dict[str, Any], model: str) -> int:
    """The mock's count of a Responses request's input."""
    total = 0
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        total += _FRAMING_TOKENS + count_text(instructions, model)
    items = body.get("input")
    if isinstance(items, str):
        return total + _FRAMING_TOKENS + count_text(items, model)
    for item in items if isinstance(items, list) else ():
        total += _FRAMING_TOKENS
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, str):
            total += count_text(content, model)
        elif isinstance(content, list):
            total += sum(count_text(part["text"], model) for part in content
                         if isinstance(part, dict) and isinstance(part.get("text"), str))
    return total


def usage(input_count: int, output_count: int) -> dict[str, Any]:
    return {
        "input_tokens": input_count, "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_count, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_count + output_count,
    }


def response_object(
    response_id: str, model: str, status: str, output: list[dict[str, Any]], usage_: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "id": response_id, "object": "response", "created_at": int(time.time()), "status": status,
        "error": None, "incomplete_details": None, "instructions": None, "max_output_tokens": None,
        "model": model, "output": output, "parallel_tool_calls": True, "previous_response_id": None,
        "temperature": 1.0, "tool_choice": "auto", "tools": [], "top_p": 1.0, "usage": usage_,
    }


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


async def respond(
    request: web.Request, body: dict[str, Any], pieces: list[str], model: str, no_usage: bool,
    cut_after: int | None, token_delay_s: float,
) -> web.StreamResponse:
    """The answer to a checked request: ``pieces`` are the completion's one-token words."""
    response_id = f"resp_mock{uuid.uuid4().hex[:20]}"
    item_id = f"msg_mock{uuid.uuid4().hex[:20]}"
    used = None if no_usage else usage(input_tokens(body, model), len(pieces))
    text = "".join(pieces)
    if not body.get("stream"):
        return web.json_response(response_object(response_id, model, "completed", [message_item(item_id, text)], used))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    sequence = 0

    async def send(kind: str, **fields: Any) -> None:
        nonlocal sequence
        event = {"type": kind, "sequence_number": sequence, **fields}
        sequence += 1
        await response.write(f"event: {kind}\ndata: {json.dumps(event)}\n\n".encode())

    await send("response.created", response=response_object(response_id, model, "in_progress", [], None))
    await send("response.in_progress", response=response_object(response_id, model, "in_progress", [], None))
    await send("response.output_item.added", output_index=0,
               item={"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []})
    part = {"type": "output_text", "text": "", "annotations": []}
    await send("response.content_part.added", item_id=item_id, output_index=0, content_index=0, part=part)
    for sent, piece in enumerate(pieces):
        if cut_after is not None and sent >= cut_after:
            assert request.transport is not None
            request.transport.abort()  # no terminal event
            return response
        if token_delay_s:
            await asyncio.sleep(token_delay_s)
        await send("response.output_text.delta", item_id=item_id, output_index=0, content_index=0, delta=piece,
                   logprobs=[])
    await send("response.output_text.done", item_id=item_id, output_index=0, content_index=0, text=text, logprobs=[])
    await send("response.content_part.done", item_id=item_id, output_index=0, content_index=0,
               part={**part, "text": text})
    item = message_item(item_id, text)
    await send("response.output_item.done", output_index=0, item=item)
    await send("response.completed", response=response_object(response_id, model, "completed", [item], used))
    await response.write_eof()
    return response
