"""What the shim refuses in a proxied body, and what it lets through untouched."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import pytest

from gateway_shim.errors import InvalidParameter, MalformedRequest, NestingTooDeep
from gateway_shim.routes import match_route, read_request
from quotameter import tokens
from quotameter.config import Shim
from quotameter.tokens import count_text, encoding_for

LIMITS = Shim(max_json_depth=8, max_messages=3, max_content_parts=2)
CHAT = match_route("POST", "/chat/completions")
MSGS = [{"role": "user", "content": "Hi."}]


def _read(body: Any, route: str = "/chat/completions") -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return read_request(match_route("POST", route), raw, LIMITS)


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"messages": MSGS}, "model", "missing_required_parameter"),
    ({"model": None, "messages": MSGS}, "model", "missing_required_parameter"),
    ({"model": 42, "messages": MSGS}, "model", "invalid_type"),
    ({"model": " ", "messages": MSGS}, "model", "invalid_type"),
    ({"model": "m", "messages": MSGS, "max_tokens": "lots"}, "max_tokens", "invalid_type"),
    ({"model": "m", "messages": MSGS, "max_tokens": 3.0}, "max_tokens", "invalid_type"),
    ({"model": "m", "messages": MSGS, "max_tokens": False}, "max_tokens", "invalid_type"),
    ({"model": "m", "messages": MSGS, "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"model": "m", "messages": MSGS, "max_tokens": 2**31}, "max_tokens", "invalid_value"),
    ({"model": "m", "messages": MSGS, "max_completion_tokens": -1}, "max_completion_tokens", "invalid_value"),
    ({"model": "m", "messages": MSGS, "n": 129}, "n", "invalid_value"),
    ({"model": "m", "messages": MSGS, "n": True}, "n", "invalid_type"),
    ({"model": "m", "messages": MSGS, "stream": 1}, "stream", "invalid_type"),
    ({"model": "m", "messages": MSGS, "stream_options": []}, "stream_options", "invalid_type"),
    ({"model": "m"}, "messages", "missing_required_parameter"),
    ({"model": "m", "messages": []}, "messages", "invalid_type"),
    ({"model": "m", "messages": {"role": "user"}}, "messages", "invalid_type"),
    ({"model": "m", "messages": MSGS * 4}, "messages", "too_many_items"),
    ({"model": "m", "messages": [*MSGS, "hi"]}, "messages[1]", "invalid_type"),
    ({"model": "m", "messages": [{"role": 1}]}, "messages[0].role", "invalid_type"),
    ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role", "missing_required_parameter"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
    ({"model": "m", "messages": [{"role": "user", "content": [{}] * 3}]}, "messages[0].content", "too_many_items"),
    ({"model": "m", "messages": [{"role": "user", "content": ["x"]}]}, "messages[0].content[0]", "invalid_type"),
])
def test_chat_fields_metering_reads_are_checked(body: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(InvalidParameter) as refused:
        _read(body)
    assert (refused.value.param, refused.value.code, refused.value.status) == (param, code, 400)
    assert refused.value.error_type == "invalid_request_error"


@pytest.mark.parametrize(("route", "field"), [("/completions", "prompt"), ("/embeddings", "input")])
def test_prompt_shapes(route: str, field: str) -> None:
    for good in ("text", ["a", "b"], [1, 2, 3], [[1, 2], [3]], []):
        assert _read({"model": "m", field: good}, route).body[field] == good
    for bad in (5, {"a": 1}, [1, "a"], [[1, "a"]], [True], None):
        with pytest.raises(InvalidParameter) as refused:
            _read({"model": "m", field: bad}, route)
        assert refused.value.param == field


def test_everything_else_passes_through_untouched() -> None:
    body = {"model": "m", "messages": [{"role": "tool", "content": None, "x": [[[1]]]}], "max_tokens": None,
            "temperature": "hot", "tools": [{"type": "function"}], "n": 2, "stream": False, "stream_options": None}
    raw = json.dumps(body).encode()
    proxied = read_request(CHAT, raw, LIMITS)
    assert proxied.upstream_body == raw and proxied.model == "m" and proxied.prompt_tokens is None
    assert read_request(CHAT, raw, LIMITS, count=True).prompt_tokens == tokens.count_prompt(body, "m")
    # /v1/models and /v1/check's routes are not checked.
    assert read_request(match_route("GET", "/models"), b"", LIMITS).body is None


def test_nesting_is_bounded_without_recursion() -> None:
    def nested(depth: int) -> bytes:
        return b'{"model":"m","messages":[{"role":"user"}],"x":' + b"[" * depth + b"]" * depth + b"}"

    assert _read(nested(6)).model == "m"  # 1 (body) + 6 arrays = 7 <= 8
    for depth in (8, 900, 200_000):  # deeper than the limit, than the parser can go, than the stack
        with pytest.raises(NestingTooDeep) as refused:
            _read(nested(depth))
        assert refused.value.status == 400 and "8 levels" in refused.value.message
    with pytest.raises(NestingTooDeep):  # objects too, not only arrays
        _read(b'{"model":"m","x":' + b'{"a":' * 9 + b"1" + b"}" * 9 + b"}")


def test_not_an_object_is_malformed() -> None:
    for raw in (b"{nope", b"[1]", b"\xff", b""):
        with pytest.raises(MalformedRequest) as refused:
            _read(raw)
        assert refused.value.code == "invalid_json"


def test_long_texts_count_in_pieces_exactly() -> None:
    # bpe-openai refuses 1M characters or 200k tokens in one call: a long prompt is counted in pieces.
    rng = random.Random(7)
    words = ["hello", "world", "  ", "x\n", "über", "42,", "日本語", "\t", " ", "🎉"]
    text = "".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(110_000))
    assert len(text) > 6 * tokens._PIECE_CHARS
    assert count_text(text, "mock-small") == len(encoding_for("mock-small").encode_ordinary(text))
    started = time.perf_counter()
    assert count_text(" ".join(["a"] * 1_500_000)) == 1_500_000  # 3M characters: "a", then " a" each a token
    assert count_text("🎉" * 300_000) > 200_000  # past the per-call token limit
    assert time.perf_counter() - started < 10


def test_a_body_with_fewer_brackets_than_the_limit_is_not_walked(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each level of nesting takes a bracket: a body with at most max_json_depth of them
    # (strings' included) passes without the walk, which every request would pay.
    import gateway_shim.request_checks as checks

    walked = []
    monkeypatch.setattr(checks, "_depth_exceeds", lambda document, limit: walked.append(limit) or False)
    assert _read(b'{"model":"m","messages":[{"role":"user","content":"[{[{["}]}').model == "m"  # 8 opening brackets
    assert walked == []
    _read(b'{"model":"m","messages":[{"role":"user","content":"[{[{[{"}]}')  # 9: walked
    assert walked == [8]
