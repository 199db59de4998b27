"""Offline token counting for prompts and completion text.

The shim counts tokens itself only when the upstream does not report usage
(a stream cut mid-way, a server that omits ``usage``); the mock LLM counts
with the same functions, so both sides agree exactly. Vocabularies come from
``bpe-openai``, which ships them: tiktoken would download them at run time.

Chat prompts follow OpenAI's published recipe for current models: 3 tokens of
framing per message, 1 more when a message carries ``name``, and 3 that prime
the assistant's reply. Image, audio and file parts are not counted (their
price depends on the upstream's own rules): this is an estimate for when the
upstream is silent, never a replacement for its report.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any


@contextmanager
def _quiet_vocabulary_loading() -> Iterator[None]:
    # bpe-openai 0.1.4 (the latest) reads its vocabulary files with
    # importlib.resources.open_binary, deprecated since Python 3.11: silence
    # exactly that, where it happens (at import and when a vocabulary loads).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="open_binary is deprecated", category=DeprecationWarning)
        yield


with _quiet_vocabulary_loading():
    import bpe_openai

DEFAULT_ENCODING = "o200k_base"  # current OpenAI models; unknown names fall back to it
_SHIPPED = ("o200k_base", "cl100k_base")  # the legacy ones need tiktoken's files
_CL100K_FAMILIES = ("gpt-4", "gpt-3.5", "gpt-35", "text-embedding-3", "text-embedding-ada-002")
_O200K_FAMILIES = ("gpt-4o", "gpt-4.1", "gpt-4.5")
_TOKENS_PER_MESSAGE = 3
_TOKENS_PER_NAME = 1
_REPLY_PRIMING_TOKENS = 3


@lru_cache(maxsize=256)
def encoding_for(model: str | None) -> bpe_openai.Encoding:
    """The model's encoding; o200k_base for models it cannot place."""
    return _named_encoding(_encoding_name(model or ""))


def _encoding_name(model: str) -> str:
    # bpe-openai knows exact names only ("gpt-4o", not "gpt-4o-2024-08-06"),
    # and its encoding_for_model rejects some it lists: resolve the name here.
    try:
        name = bpe_openai.encoding_name_for_model(model)
    except (LookupError, ValueError):
        name = None
    if name in _SHIPPED:
        return name
    if model.startswith(_CL100K_FAMILIES) and not model.startswith(_O200K_FAMILIES):
        return "cl100k_base"
    return DEFAULT_ENCODING


@lru_cache(maxsize=8)
def _named_encoding(name: str) -> bpe_openai.Encoding:
    with _quiet_vocabulary_loading():
        return bpe_openai.get_encoding(name)


# bpe-openai refuses 1,000,000 characters or 200,000 tokens in one call; a character
# is at most 4 bytes, so at most 4 tokens: a piece this long always passes.
_PIECE_CHARS = 50_000


def count_text(text: str, model: str | None = None) -> int:
    # encode_ordinary: a user's "<|endoftext|>" is text, never a special token.
    if not text:
        return 0
    encoding = encoding_for(model)
    return sum(len(encoding.encode_ordinary(piece)) for piece in _pieces(text))


def _pieces(text: str) -> Iterator[str]:
    """``text`` in pieces bpe-openai takes, each cut just before a space that
    follows a word: the encodings start a word's token with its space, so the
    pieces count as the whole text does (a text without such a space is cut
    anywhere: off by a token or two)."""
    start = 0
    while len(text) - start > _PIECE_CHARS:
        end = start + _PIECE_CHARS
        cut = text.rfind(" ", start + 1, end)
        while cut > start + 1 and text[cut - 1].isspace():  # a space after a word, not inside a run of whitespace
            cut = text.rfind(" ", start + 1, cut - 1)
        cut = cut if cut > start else end
        yield text[start:cut]
        start = cut
    yield text[start:]


def count_messages(messages: Iterable[Any], model: str | None = None) -> int:
    total = _REPLY_PRIMING_TOKENS
    for message in messages:
        if not isinstance(message, dict):
            continue
        total += _TOKENS_PER_MESSAGE
        for key, value in message.items():
            total += count_text(_text_of(value), model)
            if key == "name":
                total += _TOKENS_PER_NAME
    return total


def count_prompt(body: dict[str, Any], model: str | None = None) -> int:
    """Input tokens of an OpenAI request body: chat ``messages``, a completions
    ``prompt`` or an embeddings ``input``. 0 when there is nothing to count."""
    model = model or body.get("model")
    if isinstance(body.get("messages"), list):
        return count_messages(body["messages"], model)
    for field in ("prompt", "input"):
        value = body.get(field)
        if value is not None:
            return _count_inputs(value, model)
    return 0


def count_response_input(body: dict[str, Any], model: str | None = None) -> int:
    """Input tokens of a Responses API body: ``instructions`` as a system message,
    ``input`` as one user message (a string) or a list of items, each message
    item framed as a chat message is; other items (function call outputs,
    reasoning…) count their text fields. The same recipe as chat, so a prompt
    moved from one API to the other costs the same estimate."""
    model = model or body.get("model")
    messages: list[Any] = []
    other_tokens = 0  # items that are not messages: their text, framed as a message is
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list):
        for item in items:
            if not isinstance(item, dict):
                continue
            if "role" in item or item.get("type") == "message":
                messages.append({key: value for key, value in item.items() if key in ("role", "content", "name")})
            else:
                other_tokens += _TOKENS_PER_MESSAGE + sum(
                    count_text(value, model) for key, value in item.items()
                    if isinstance(value, str) and key not in _ITEM_LABELS)
    if not messages and not other_tokens:
        return 0
    return count_messages(messages, model) + other_tokens


_ITEM_LABELS = ("type", "id", "call_id", "status")  # an item's labels, not its text


def _count_inputs(value: Any, model: str | None) -> int:
    if isinstance(value, str):
        return count_text(value, model)
    if isinstance(value, list):
        if value and all(isinstance(item, int) for item in value):
            return len(value)  # already tokenised
        return sum(_count_inputs(item, model) for item in value)
    return 0


def _text_of(value: Any) -> str:
    """The countable text of one message field."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts: count the text ones
        return "".join(
            part.get("text", "") for part in value if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    if value is None or isinstance(value, bool | int | float):
        return "" if value is None else str(value)
    return json.dumps(value, separators=(",", ":"))  # tool calls and the like
