"""Offline token counts of an Anthropic Messages API prompt (``system`` and
``messages``), with the encodings of quotameter.tokens.

Anthropic publishes no tokenizer for its current models, so this is the
shim's estimate (for admission, and for a stream the upstream never reported),
never a replacement for the upstream's ``usage``. The mock model counts its
answers with the same functions, so both sides agree exactly in tests.

The prompt is a list of pieces, in order: the system prompt, then each
message's blocks (text, tool_use name and input, tool_result content,
thinking). Each message adds the same framing OpenAI's recipe uses (3
tokens), and 3 more prime the reply. Images and documents are not counted.
``cache_control`` marks where a cacheable prefix ends: ``prefix_tokens``
says how many of the prompt's tokens lie before it.
"""

from __future__ import annotations

import json
from typing import Any

from quotameter.tokens import count_text

_TOKENS_PER_MESSAGE = 3
_REPLY_PRIMING_TOKENS = 3


def block_text(block: Any) -> str:
    """The countable text of one content block (or of a plain string)."""
    if isinstance(block, str):
        return block
    if not isinstance(block, dict):
        return ""
    kind = block.get("type")
    if kind == "text" and isinstance(block.get("text"), str):
        return block["text"]
    if kind == "thinking" and isinstance(block.get("thinking"), str):
        return block["thinking"]
    if kind in ("tool_use", "server_tool_use"):
        name = block.get("name") if isinstance(block.get("name"), str) else ""
        return name + json.dumps(block.get("input", {}), separators=(",", ":"), ensure_ascii=False)
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            return "".join(block_text(part) for part in content)
        return content if isinstance(content, str) else ""
    return ""  # images, documents, redacted thinking: priced by the upstream's own rules


def prompt_pieces(body: dict[str, Any]) -> list[tuple[str, bool, int]]:
    """(text, ends a cacheable prefix, framing tokens) for each piece of the prompt, in order."""
    pieces: list[tuple[str, bool, int]] = []
    system = body.get("system")
    if isinstance(system, str):
        pieces.append((system, False, 0))
    elif isinstance(system, list):
        pieces.extend((block_text(block), _marked(block), 0) for block in system)
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        blocks = content if isinstance(content, list) else [content]
        for i, block in enumerate(blocks):
            pieces.append((block_text(block), _marked(block), _TOKENS_PER_MESSAGE if i == 0 else 0))
    return pieces


def count_messages_prompt(body: dict[str, Any], model: str | None = None) -> int:
    """Input tokens of a Messages API request body."""
    model = model or (body.get("model") if isinstance(body.get("model"), str) else None)
    return _REPLY_PRIMING_TOKENS + sum(count_text(text, model) + framing for text, _, framing in prompt_pieces(body))


def prefix_tokens(body: dict[str, Any], model: str | None = None) -> int:
    """Tokens of the prompt up to and including its last ``cache_control`` block (0: none)."""
    model = model or (body.get("model") if isinstance(body.get("model"), str) else None)
    pieces = prompt_pieces(body)
    last = max((i for i, (_, marked, _) in enumerate(pieces) if marked), default=-1)
    return sum(count_text(text, model) + framing for text, _, framing in pieces[: last + 1])


def _marked(block: Any) -> bool:
    return isinstance(block, dict) and isinstance(block.get("cache_control"), dict)
