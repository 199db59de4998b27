"""What the shim checks in a proxied request's body before it admits it.

Only what admission and metering read: ``model`` (prices, limits), the output
caps (the worst case reserved), ``stream`` / ``stream_options`` (how the
answer is observed) and the prompt's shape (``messages``, ``prompt``,
``input``: what is counted). A wrong type there would be guessed around, and
a request billed to no model or to an estimate it did not ask for: it is
refused 400 instead, naming the parameter as OpenAI does. Every other field is
the upstream's business and passes through untouched.

Also bounded here, cheaply and before anything recurses: JSON nesting depth
(Python's parser recurses, and dies around 1000 levels), messages per
request and content parts per message.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from gateway_shim.errors import InvalidParameter, MalformedRequest, NestingTooDeep

_MAX_INT = 2**31 - 1  # what an upstream takes as a token count; larger is nonsense
_MAX_CHOICES = 128  # OpenAI's bound on n
_PROMPT_ROUTES = {"/v1/chat/completions": "messages", "/v1/completions": "prompt", "/v1/embeddings": "input"}


class Limits(Protocol):
    """The bounds (quotameter.config.Shim has them)."""

    max_json_depth: int
    max_messages: int
    max_content_parts: int


def parse_body(raw: bytes, limits: Limits) -> Any:
    """The JSON document in ``raw``, nested at most ``limits.max_json_depth`` deep."""
    try:
        body = json.loads(raw)
    except RecursionError:  # deeper than the parser can go: far past any limit
        raise _too_deep(limits) from None
    except (ValueError, UnicodeDecodeError):
        raise MalformedRequest(
            "We could not parse the JSON body of your request. The body must be a JSON object."
        ) from None
    # Nesting needs one bracket per level: a body with fewer brackets than the
    # limit (counted in C, strings' too) cannot exceed it, and is not walked.
    if raw.count(b"{") + raw.count(b"[") > limits.max_json_depth and _depth_exceeds(body, limits.max_json_depth):
        raise _too_deep(limits)
    return body


def check_body(route: str, body: dict[str, Any], limits: Limits) -> None:
    """Raise InvalidParameter for the first field of ``body`` (a ``route`` request)
    that admission or metering could not read as OpenAI defines it."""
    model = body.get("model")
    if model is None:
        raise InvalidParameter("You must provide a model parameter.", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model.strip():
        raise InvalidParameter(f"Invalid value for 'model': expected a non-empty string, got {_kind(model)}.", "model")
    for name in ("max_tokens", "max_completion_tokens"):
        _positive_int(body, name, _MAX_INT)
    _positive_int(body, "n", _MAX_CHOICES)
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise InvalidParameter(f"Invalid type for 'stream': expected a boolean, got {_kind(body['stream'])}.", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidParameter(f"Invalid type for 'stream_options': expected an object, got {_kind(options)}.",
                               "stream_options")
    field = _PROMPT_ROUTES.get(route)
    if field == "messages":
        _check_messages(body.get("messages"), limits)
    elif field is not None:
        value = body.get(field)
        if value is None:
            raise InvalidParameter(f"You must provide the '{field}' parameter.", field, "missing_required_parameter")
        if not _is_prompt(value):
            raise InvalidParameter(
                f"Invalid type for '{field}': expected a string, an array of strings, an array of "
                f"token ids or an array of arrays of token ids, got {_kind(value)}.", field)


def check_responses_body(body: dict[str, Any], limits: Limits) -> None:
    """``check_body`` for the Responses API: ``model``, ``input`` (a string or an
    array of items), ``instructions``, ``max_output_tokens`` and ``stream``."""
    model = body.get("model")
    if model is None:
        raise InvalidParameter("You must provide a model parameter.", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model.strip():
        raise InvalidParameter(f"Invalid value for 'model': expected a non-empty string, got {_kind(model)}.", "model")
    _positive_int(body, "max_output_tokens", _MAX_INT)
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise InvalidParameter(f"Invalid type for 'stream': expected a boolean, got {_kind(body['stream'])}.", "stream")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidParameter(f"Invalid type for 'instructions': expected a string, got {_kind(instructions)}.",
                               "instructions")
    items = body.get("input")
    if items is None or isinstance(items, str):  # absent: a stored prompt or a previous response supplies it
        return
    if not isinstance(items, list):
        raise InvalidParameter(f"Invalid type for 'input': expected a string or an array of input items, "
                               f"got {_kind(items)}.", "input")
    if len(items) > limits.max_messages:
        raise InvalidParameter(f"Too many input items: {len(items)}; this gateway takes at most "
                               f"{limits.max_messages} per request.", "input", "too_many_items")
    for index, item in enumerate(items):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise InvalidParameter(f"Invalid type for '{where}': expected an object, got {_kind(item)}.", where)
        _check_content(item.get("content"), where, limits)


def _positive_int(body: dict[str, Any], name: str, largest: int) -> None:
    value = body.get(name)
    if value is None:  # absent or null: the tier's default applies
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidParameter(f"Invalid type for '{name}': expected an integer, got {_kind(value)}.", name)
    if not 1 <= value <= largest:
        raise InvalidParameter(
            f"Invalid value for '{name}': {value} is out of range; expected an integer from 1 to {largest}.",
            name, "invalid_value")


def _check_messages(messages: Any, limits: Limits) -> None:
    if messages is None:
        raise InvalidParameter("You must provide the 'messages' parameter.", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise InvalidParameter(f"Invalid type for 'messages': expected a non-empty array of objects, "
                               f"got {_kind(messages)}.", "messages")
    if len(messages) > limits.max_messages:
        raise InvalidParameter(f"Too many messages: {len(messages)}; this gateway takes at most "
                               f"{limits.max_messages} per request.", "messages", "too_many_items")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InvalidParameter(f"Invalid type for '{where}': expected an object, got {_kind(message)}.", where)
        role = message.get("role")
        if not isinstance(role, str):
            code = "missing_required_parameter" if role is None else "invalid_type"
            raise InvalidParameter(f"Invalid value for '{where}.role': expected a string.", f"{where}.role", code)
        _check_content(message.get("content"), where, limits)


def _check_content(content: Any, where: str, limits: Limits) -> None:
    """A message's or an input item's ``content``: a string, or a bounded array of part objects."""
    if isinstance(content, list):
        if len(content) > limits.max_content_parts:
            raise InvalidParameter(
                f"Too many content parts in '{where}.content': {len(content)}; this gateway takes at most "
                f"{limits.max_content_parts}.", f"{where}.content", "too_many_items")
        for part_index, part in enumerate(content):
            if not isinstance(part, dict):
                where_part = f"{where}.content[{part_index}]"
                raise InvalidParameter(f"Invalid type for '{where_part}': expected an object, got {_kind(part)}.",
                                       where_part)
    elif content is not None and not isinstance(content, str):
        raise InvalidParameter(f"Invalid type for '{where}.content': expected a string or an array of "
                               f"content parts, got {_kind(content)}.", f"{where}.content")


def _is_prompt(value: Any) -> bool:
    """A string, strings, token ids, or arrays of token ids (OpenAI's four prompt shapes)."""
    if isinstance(value, str):
        return True
    if not isinstance(value, list):
        return False
    return (all(isinstance(item, str) for item in value) or all(_is_token(item) for item in value)
            or all(isinstance(item, list) and all(_is_token(token) for token in item) for item in value))


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _depth_exceeds(document: Any, limit: int) -> bool:
    """Whether ``document`` nests containers more than ``limit`` deep (iterative:
    no recursion to blow up, and it stops at the first one too deep)."""
    stack = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _too_deep(limits: Limits) -> NestingTooDeep:
    return NestingTooDeep(
        f"The JSON body is nested more than {limits.max_json_depth} levels deep (shim.max_json_depth).")


def _kind(value: Any) -> str:
    """A value's JSON type, for messages (never the value itself: it may be huge or secret)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string" if value else "an empty string"
    return "an array" if isinstance(value, list) else "an object"
