"""A small FastAPI app serving chat completions itself (JSON and SSE, with its
own token count), behind QuotameterMiddleware: what test_asgi.py runs under
uvicorn. ``x-app-tokens`` makes it write that many tokens whatever max_tokens
says (an app that overruns its budget); GET /generated says how many tokens
its streams have produced (a cut stream stops the app's generator)."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from gateway_shim.asgi import QuotameterMiddleware
from quotameter.embedded.mock_llm import completion_pieces
from quotameter.tokens import count_prompt

TOKEN_DELAY_S = 0.02
generated = {"tokens": 0}
served = FastAPI()


@served.get("/generated")
async def tokens_generated() -> dict[str, int]:
    return generated


@served.post("/v1/chat/completions")
async def chat(request: Request):
    body = await request.json()
    model = body["model"]
    n = int(request.headers.get("x-app-tokens") or body.get("max_tokens") or 8)
    pieces = completion_pieces(n)
    usage = {"prompt_tokens": count_prompt(body, model), "completion_tokens": n}
    usage["total_tokens"] = usage["prompt_tokens"] + n
    envelope = {"id": "chatcmpl-app", "created": int(time.time()), "model": model}
    if not body.get("stream"):
        message = {"role": "assistant", "content": "".join(pieces)}
        choice = {"index": 0, "message": message, "finish_reason": "length"}
        return {**envelope, "object": "chat.completion", "choices": [choice], "usage": usage}

    def event(choices: list, **extra) -> str:
        return "data: " + json.dumps({**envelope, "object": "chat.completion.chunk", "choices": choices, **extra}) + "\n\n"

    async def events():
        for piece in pieces:
            generated["tokens"] += 1
            yield event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
            await asyncio.sleep(TOKEN_DELAY_S)
        yield event([{"index": 0, "delta": {}, "finish_reason": "length"}])
        if (body.get("stream_options") or {}).get("include_usage"):
            yield event([], usage=usage)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


app = QuotameterMiddleware(served)
