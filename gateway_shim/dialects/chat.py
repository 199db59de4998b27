"""OpenAI's chat completions, and the older routes of the same family
(legacy completions, embeddings): ``messages`` / ``prompt`` / ``input``,
``max_completion_tokens`` or ``max_tokens``, ``n`` choices, usage in the
answer's ``usage`` and, in a stream, in a last chunk that only comes when
``stream_options.include_usage`` asks for it; ``data: [DONE]`` ends a stream.

Its streams go through sse.py's fast paths (most chunks never parsed); the
event methods here are what those paths call when they do parse one.
"""

from __future__ import annotations

import json
import time
from typing import Any

from gateway_shim.dialects import CutStream, Dialect, Limits, _positive, sse
from gateway_shim.request_checks import check_body
from gateway_shim.usage import Usage, completion_text, usage_from
from quotameter.tokens import count_prompt


class ChatDialect(Dialect):
    name = "chat"
    cap_field = "max_tokens"  # every OpenAI-compatible server reads it (max_completion_tokens is newer)
    fast_chunks = True

    def check(self, route: str, body: dict[str, Any], limits: Limits) -> None:
        check_body(route, body, limits)

    def max_output(self, body: dict[str, Any]) -> int | None:
        return _positive(body.get("max_completion_tokens") or body.get("max_tokens"))

    def choices(self, body: dict[str, Any]) -> int:
        n = body.get("n")
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1

    def ask_for_usage(self, body: dict[str, Any]) -> dict[str, Any] | None:
        # The usage chunk is the only exact count of a stream: ask for it (sse.py
        # hides it from a client that did not ask).
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            return None
        body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return body

    def count_prompt(self, body: dict[str, Any], model: str | None) -> int:
        return count_prompt(body, model)

    def usage(self, document: dict[str, Any]) -> Usage | None:
        return usage_from(document)

    def text(self, document: dict[str, Any]) -> str:
        return completion_text(document)

    def upstream_error(self, document: dict[str, Any]) -> object | None:
        return document.get("error") if "choices" not in document else None

    def cut_ending(self, cut: CutStream) -> bytes:
        """A final chunk the client reads as a normal end, then an OpenAI error event."""
        final = {
            "id": cut.response_id or "chatcmpl-quotameter-cut",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": cut.model,
            "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}],
        }
        error = {"error": {"message": cut.message, "type": "insufficient_quota", "param": None,
                           "code": "budget_exceeded"}}
        return sse(final) + b"data: " + json.dumps(error, separators=(",", ":")).encode() + b"\n\n" + b"data: [DONE]\n\n"


CHAT = ChatDialect()
