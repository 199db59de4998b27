"""The mock model's Anthropic Messages API (``POST /v1/messages``): the JSON
Message and the event stream as Anthropic's API sends them.

Deterministic like the rest of the mock: the prompt is counted with
quotameter.message_tokens, the answer is min(max_tokens, 16) one-token words
(``stop_reason`` ``max_tokens`` when max_tokens cut it, else ``end_turn``).

Prompt caching is imitated: the prompt up to its last ``cache_control``
block is written to the cache the first time this mock sees it
(``cache_creation_input_tokens``) and read from it afterwards
(``cache_read_input_tokens``); ``input_tokens`` is the rest, as Anthropic
reports it. (Anthropic caches only prefixes past a minimum length; the mock
caches any.)
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from quotameter.message_tokens import count_messages_prompt, prefix_tokens, prompt_pieces

MAX_WORDS = 16
# Anthropic's error type for each status the mock is asked to fail with.
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                529: "overloaded_error", 503: "overloaded_error"}


def error_body(status: int, message: str) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


@dataclass(frozen=True, slots=True)
class MockMessage:
    id: str
    model: str
    words: list[str]  # one token each
    stop_reason: str
    usage: dict[str, int]  # Anthropic's: input_tokens excludes the cache's reads and writes


class PromptCache:
    """The prefixes seen, by digest (bounded: a mock, not a store)."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._seen: set[bytes] = set()
        self._max = max_entries

    def split(self, body: dict[str, Any], model: str) -> tuple[int, int]:
        """(tokens written to the cache, tokens read from it) for this prompt."""
        cached = prefix_tokens(body, model)
        if not cached:
            return 0, 0
        pieces = prompt_pieces(body)
        last = max(i for i, (_, marked, _) in enumerate(pieces) if marked)
        digest = hashlib.sha256(json.dumps([model, [text for text, _, _ in pieces[: last + 1]]]).encode()).digest()
        if digest in self._seen:
            return 0, cached
        if len(self._seen) >= self._max:
            self._seen.clear()
        self._seen.add(digest)
        return cached, 0


def answer(body: dict[str, Any], cache: PromptCache, words: list[str]) -> MockMessage:
    """The Message for ``body``; ``words``: the completion, one token each, max_tokens of them at most."""
    model = body["model"]
    max_tokens = body["max_tokens"]
    kept = words[:max_tokens]
    written, read = cache.split(body, model)
    usage = {
        "input_tokens": count_messages_prompt(body, model) - written - read,
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": read,
        "output_tokens": len(kept),
    }
    stop = "max_tokens" if len(kept) == max_tokens else "end_turn"
    return MockMessage(f"msg_mock{uuid.uuid4().hex[:20]}", model, kept, stop, usage)


def message_json(message: MockMessage, with_usage: bool = True) -> dict[str, Any]:
    document: dict[str, Any] = {
        "id": message.id,
        "type": "message",
        "role": "assistant",
        "model": message.model,
        "content": [{"type": "text", "text": "".join(message.words)}],
        "stop_reason": message.stop_reason,
        "stop_sequence": None,
    }
    if with_usage:
        document["usage"] = {**message.usage, "service_tier": "standard"}
    return document


def sse(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def stream_head(message: MockMessage, with_usage: bool = True) -> Iterator[bytes]:
    """The events before the first word: the message (its input usage) and the text block's start."""
    start: dict[str, Any] = {**message_json(message, with_usage), "content": [], "stop_reason": None}
    if with_usage:  # the output so far: none yet, as Anthropic reports 1 or so before the first delta
        start["usage"] = {**start["usage"], "output_tokens": 1}
    yield sse("message_start", {"type": "message_start", "message": start})
    yield sse("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}})
    yield sse("ping", {"type": "ping"})


def stream_word(word: str) -> bytes:
    return sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": word}})


def stream_tail(message: MockMessage, with_usage: bool = True) -> Iterator[bytes]:
    """The events after the last word: the block's stop, the stop reason with the output's usage, the end."""
    yield sse("content_block_stop", {"type": "content_block_stop", "index": 0})
    delta: dict[str, Any] = {"type": "message_delta",
                             "delta": {"stop_reason": message.stop_reason, "stop_sequence": None}}
    if with_usage:
        delta["usage"] = {"output_tokens": message.usage["output_tokens"]}
    yield sse("message_delta", delta)
    yield sse("message_stop", {"type": "message_stop"})
