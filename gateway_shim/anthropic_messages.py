"""Anthropic's Messages API (``POST /v1/messages``): what the shim reads from
a request, and the usage and text of an answer, JSON or streamed.

Anthropic's ``input_tokens`` leaves out the prompt tokens read from or
written to its cache; quotameter's events count both as part of the input
(quotameter/events.py), so the input is the sum of the three, with the reads
as ``cached`` and the writes as ``cache_write``.

A stream reports its usage in two events: ``message_start`` carries the input
(and an output of a token or so), each ``message_delta`` the output so far,
cumulative, and newer servers repeat the input fields there. It ends with
``message_stop``. The text arrives in ``content_block_delta`` events.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from gateway_shim.errors import InvalidParameter
from gateway_shim.usage import Usage
from quotameter.events import UsageSource

ROUTE = "/v1/messages"
_MAX_INT = 2**31 - 1
_ROLES = ("user", "assistant")
END_EVENT = "message_stop"
# The deltas that carry generated output, and the member holding it.
_DELTA_TEXT = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}


class Limits(Protocol):
    max_messages: int
    max_content_parts: int


def check_request(body: dict[str, Any], limits: Limits) -> None:
    """Raise InvalidParameter naming the first field admission reads (model, max_tokens,
    stream, system, messages) that a Messages request gets wrong."""
    model = body.get("model")
    if model is None:
        raise InvalidParameter("model: Field required", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model.strip():
        raise InvalidParameter("model: Input should be a non-empty string", "model")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise InvalidParameter("max_tokens: Field required", "max_tokens", "missing_required_parameter")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= _MAX_INT:
        raise InvalidParameter(f"max_tokens: Input should be an integer from 1 to {_MAX_INT}", "max_tokens",
                               "invalid_value")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidParameter("stream: Input should be a valid boolean", "stream")
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        raise InvalidParameter("system: Input should be a string or a list of text blocks", "system")
    if isinstance(system, list):
        _check_blocks(system, "system", limits)
    _check_messages(body.get("messages"), limits)


def _check_messages(messages: Any, limits: Limits) -> None:
    if messages is None:
        raise InvalidParameter("messages: Field required", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise InvalidParameter("messages: Input should be a non-empty list", "messages")
    if len(messages) > limits.max_messages:
        raise InvalidParameter(f"messages: at most {limits.max_messages} messages per request through this gateway",
                               "messages", "too_many_items")
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if not isinstance(message, dict):
            raise InvalidParameter(f"{where}: Input should be an object", where)
        if message.get("role") not in _ROLES:
            raise InvalidParameter(f"{where}.role: Input should be 'user' or 'assistant'", f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):
            _check_blocks(content, f"{where}.content", limits)
        elif not isinstance(content, str):
            raise InvalidParameter(f"{where}.content: Input should be a string or a list of content blocks",
                                   f"{where}.content")


def _check_blocks(blocks: list[Any], where: str, limits: Limits) -> None:
    if len(blocks) > limits.max_content_parts:
        raise InvalidParameter(f"{where}: at most {limits.max_content_parts} blocks through this gateway", where,
                               "too_many_items")
    for index, block in enumerate(blocks):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise InvalidParameter(f"{where}.{index}: Input should be a content block with a 'type'",
                                   f"{where}.{index}")


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_of(usage: Any) -> Usage | None:
    """quotameter's Usage from an Anthropic ``usage`` object (reads and writes of the cache added to the input)."""
    if not isinstance(usage, dict):
        return None
    cached, written = _int(usage.get("cache_read_input_tokens")), _int(usage.get("cache_creation_input_tokens"))
    return Usage(
        input_tokens=_int(usage.get("input_tokens")) + cached + written,
        output_tokens=_int(usage.get("output_tokens")),
        cached_tokens=cached,
        cache_write_tokens=written,
        source=UsageSource.UPSTREAM,
    )


def answer_usage(document: Any) -> Usage | None:
    """The usage of a whole (JSON) Message."""
    return usage_of(document.get("usage")) if isinstance(document, dict) else None


def answer_text(document: Any) -> str:
    """The generated text of a whole Message (text, thinking, tool input), to count when it reports no usage."""
    content = document.get("content") if isinstance(document, dict) else None
    parts: list[str] = []
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            parts.append(block["thinking"])
        elif kind == "tool_use":
            parts.append(json.dumps(block.get("input", {}), separators=(",", ":"), ensure_ascii=False))
    return "".join(parts)


def is_error(document: Any) -> bool:
    """A body in Anthropic's error shape (``{"type": "error", "error": {...}}``)."""
    return isinstance(document, dict) and document.get("type") == "error"


def event_text(event: Any) -> str:
    """The generated output one stream event carries."""
    if not isinstance(event, dict) or event.get("type") != "content_block_delta":
        return ""
    delta = event.get("delta")
    member = _DELTA_TEXT.get(delta.get("type")) if isinstance(delta, dict) else None
    text = delta.get(member) if member else None  # type: ignore[union-attr]
    return text if isinstance(text, str) else ""


def event_model(event: dict[str, Any]) -> str | None:
    """The served model, which ``message_start`` names."""
    message = event.get("message") if event.get("type") == "message_start" else None
    model = message.get("model") if isinstance(message, dict) else None
    return model if isinstance(model, str) and model else None


def event_id(event: dict[str, Any]) -> str | None:
    message = event.get("message") if event.get("type") == "message_start" else None
    value = message.get("id") if isinstance(message, dict) else None
    return value if isinstance(value, str) else None


def event_usage(event: dict[str, Any], previous: Usage | None) -> Usage | None:
    """The stream's usage once ``event`` is read: ``message_start`` gives it all, a
    ``message_delta`` replaces the fields it carries (cumulative totals; a null
    changes nothing), others leave it as ``previous`` said."""
    kind = event.get("type")
    if kind == "message_start":
        message = event.get("message")
        return (usage_of(message.get("usage")) if isinstance(message, dict) else None) or previous
    usage = event.get("usage")
    if kind != "message_delta" or not isinstance(usage, dict):
        return previous
    base = previous or Usage(source=UsageSource.UPSTREAM)
    fields = {
        "input_tokens": base.input_tokens - base.cached_tokens - base.cache_write_tokens,
        "cache_read_input_tokens": base.cached_tokens,
        "cache_creation_input_tokens": base.cache_write_tokens,
        "output_tokens": base.output_tokens,
    }
    fields.update({name: value for name, value in usage.items() if name in fields and value is not None})
    return usage_of(fields)


def ends(event: dict[str, Any]) -> bool:
    return event.get("type") == END_EVENT


def open_block(last_event: dict[str, Any] | None) -> int | None:
    """The index of the content block still open after ``last_event`` (the last one
    the client was sent), or None."""
    if not isinstance(last_event, dict) or last_event.get("type") not in ("content_block_start", "content_block_delta"):
        return None
    index = last_event.get("index")
    return index if isinstance(index, int) and not isinstance(index, bool) else 0


def _sse(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def cut_ending(block: int | None, output_tokens: int, message: str) -> bytes:
    """The events that end a stream cut at the budget as a normal end: the open
    ``block`` stopped, a ``message_delta`` with ``stop_reason: "max_tokens"`` and
    the output sent (the input as ``message_start`` reported it stands), then
    ``message_stop``. Why it ended goes in a comment line, which clients skip."""
    out = [b": " + message.replace("\n", " ").replace("\r", " ").encode() + b"\n\n"] if message else []
    if block is not None:
        out.append(_sse("content_block_stop", {"type": "content_block_stop", "index": block}))
    out.append(_sse("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                                      "usage": {"output_tokens": output_tokens}}))
    out.append(_sse(END_EVENT, {"type": END_EVENT}))
    return b"".join(out)
