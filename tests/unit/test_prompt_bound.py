"""The bound admission reserves for a large prompt instead of counting it
(gateway_shim/estimates.py) is never below the count, whatever the text."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway_shim.estimates import prompt_bound
from quotameter.message_tokens import count_messages_prompt
from quotameter.tokens import count_prompt, count_response_input


def _chat(message: dict[str, Any], times: int = 1) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [message] * times}


BODIES = {
    "english": _chat({"role": "user", "content": "the quota holds while every token is metered " * 200}),
    "cjk": _chat({"role": "user", "content": "中文测试文本" * 300}),
    "emoji": _chat({"role": "user", "content": "😀🎉" * 400}),
    "content parts": _chat({"role": "user", "content": [{"type": "text", "text": "Grüße " * 500},
                                                        {"type": "image_url", "image_url": {"url": "u"}}]}),
    # A nested object is counted as ASCII JSON: each non-ASCII byte may become three.
    "nested non-ASCII": _chat({"role": "user", "content": "x", "extra": {"k": "äöüß" * 600}}),
    "nested 4-byte": _chat({"role": "user", "content": "x", "extra": {"k": "😀" * 800}}),
    "empty messages": _chat({"role": "user", "content": ""}, 600),
    "names": _chat({"role": "user", "content": "a", "name": "b"}, 600),
    "numbers": _chat({"role": "user", "content": "a", "w": {"v": [1e5, 123456789, -0.5] * 300}}),
    "completions token ids": {"model": "gpt-4o", "prompt": [1, 2, 3] * 2000},
}


@pytest.mark.parametrize("ensure_ascii", [True, False])
@pytest.mark.parametrize("name", BODIES)
def test_the_bound_covers_the_chat_count(name: str, ensure_ascii: bool) -> None:
    body = BODIES[name]
    for separators in ((",", ":"), (", ", ": ")):
        raw = json.dumps(body, ensure_ascii=ensure_ascii, separators=separators).encode()
        assert count_prompt(body, "gpt-4o") <= prompt_bound(raw)


@pytest.mark.parametrize("text", ["plain words " * 500, "Grüße aus Zürich " * 300, "中文测试" * 500])
def test_the_bound_covers_the_responses_and_messages_counts(text: str) -> None:
    responses = {"model": "gpt-4o", "instructions": text, "input": [{"role": "user", "content": text},
                                                                     {"type": "function_call_output", "output": text}]}
    messages = {"model": "claude-sonnet-4-5", "system": text, "messages": [
        {"role": "user", "content": [{"type": "text", "text": text}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"q": text}}]}]}
    for ensure_ascii in (True, False):
        assert count_response_input(responses) <= prompt_bound(json.dumps(responses, ensure_ascii=ensure_ascii).encode())
        assert count_messages_prompt(messages) <= prompt_bound(json.dumps(messages, ensure_ascii=ensure_ascii).encode())


def test_an_ascii_body_is_bounded_by_its_size_alone() -> None:
    assert prompt_bound(b'{"a":"b"}') == 9
    assert prompt_bound('{"a":"ü"}'.encode()) == 10 + 2 * 2
