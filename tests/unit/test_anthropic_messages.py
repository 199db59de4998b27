"""The Messages API pieces as pure functions (gateway_shim/anthropic_messages.py,
anthropic_answers.py, quotameter/message_tokens.py), no services."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime

import pytest
import yaml

from gateway_shim.anthropic_answers import duration_ms, error_body, error_type, ratelimit_headers, rfc3339
from gateway_shim.anthropic_messages import (
    answer_text,
    answer_usage,
    check_request,
    cut_ending,
    event_text,
    open_block,
)
from gateway_shim.attribution import attribution_of
from gateway_shim.dialects.messages import MESSAGES
from gateway_shim.errors import InvalidParameter
from gateway_shim.estimates import Estimator
from gateway_shim.sse import StreamTally
from quotameter.config import DEFAULT_CONFIG, Shim, TokenCount, parse_config
from quotameter.events import UsageSource
from quotameter.message_tokens import count_messages_prompt, prefix_tokens

LIMITS = Shim()
# Under o200k_base (written down, see tests/unit/test_tokens.py): "You are terse." 4,
# "Say some words." 4, "hello world" 2; 3 per message, 3 priming the reply.
BODY = {
    "model": "mock-small",
    "max_tokens": 50,
    "system": "You are terse.",
    "messages": [{"role": "user", "content": "Say some words."}],
}
BODY_TOKENS = 4 + (3 + 4) + 3


def test_the_prompt_is_the_system_and_every_block_counted() -> None:
    assert count_messages_prompt(BODY) == BODY_TOKENS
    blocks = {
        **BODY,
        "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Say some words."},
                                         {"type": "image", "source": {"type": "base64", "data": "AAAA"}}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                          "content": [{"type": "text", "text": "hello world"}]}]},
        ],
    }
    # "f{}" is 2 tokens; the image is not counted; each message frames with 3.
    assert count_messages_prompt(blocks) == 4 + (3 + 4) + (3 + 2) + (3 + 2) + 3
    assert prefix_tokens(blocks) == 4  # the system prompt, up to its cache_control
    assert prefix_tokens(BODY) == 0


def test_a_request_is_read_with_its_prompt_and_its_max_tokens() -> None:
    body = {**BODY, "stream": True}
    check_request(body, LIMITS)
    assert (MESSAGES.model(body), MESSAGES.wants_stream(body), MESSAGES.max_output(body)) == ("mock-small", True, 50)
    assert MESSAGES.count_prompt(body, "mock-small") == BODY_TOKENS
    assert MESSAGES.ask_for_usage(body) is None and MESSAGES.cap_required
    assert MESSAGES.degrade(body, "mock-large", 9) == {**body, "model": "mock-large", "max_tokens": 9}
    # The key as Anthropic's clients send it, or as a Bearer token (which wins).
    assert MESSAGES.credentials({"x-api-key": " sk-1 "}) == "Bearer sk-1"
    assert MESSAGES.credentials({"authorization": "Bearer sk-2", "x-api-key": "sk-1"}) == "Bearer sk-2"
    assert MESSAGES.credentials({}) is None


@pytest.mark.parametrize(("change", "param", "code"), [
    ({"max_tokens": None}, "max_tokens", "missing_required_parameter"),
    ({"max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"max_tokens": True}, "max_tokens", "invalid_value"),
    ({"model": None}, "model", "missing_required_parameter"),
    ({"model": 7}, "model", "invalid_type"),
    ({"stream": "yes"}, "stream", "invalid_type"),
    ({"system": 3}, "system", "invalid_type"),
    ({"system": ["text"]}, "system.0", "invalid_type"),
    ({"messages": []}, "messages", "invalid_type"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role", "invalid_type"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", "invalid_type"),
    ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages.0.content.0", "invalid_type"),
])
def test_a_field_admission_reads_is_refused_when_wrong(change: dict, param: str, code: str) -> None:
    body = {key: value for key, value in {**BODY, **change}.items() if value is not None}
    with pytest.raises(InvalidParameter) as caught:
        check_request(body, LIMITS)
    assert (caught.value.param, caught.value.code) == (param, code)


def test_cache_reads_and_writes_are_part_of_the_input() -> None:
    document = {"type": "message", "content": [{"type": "text", "text": "hi"}], "usage": {
        "input_tokens": 12, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 2000, "output_tokens": 7}}
    usage = answer_usage(document)
    assert usage is not None
    assert (usage.input_tokens, usage.cached_tokens, usage.cache_write_tokens, usage.output_tokens) == (2112, 2000, 100, 7)
    assert usage.source is UsageSource.UPSTREAM
    assert answer_usage({"type": "message"}) is None
    thought = {"content": [{"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": " yes"},
                           {"type": "tool_use", "name": "f", "input": {"a": 1}}]}
    assert answer_text(thought) == 'hmm yes{"a":1}'


def _stream_events() -> list[dict]:
    return [
        {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
                                              "content": [], "usage": {"input_tokens": 10, "cache_read_input_tokens": 30,
                                                                       "cache_creation_input_tokens": 5, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me see"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "c2ln"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hello"}},
        {"type": "message_delta", "delta": {"stop_reason": None}, "usage": {"output_tokens": 4}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": " there"}},
    ]


def _sse(events: list[dict]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def test_a_stream_gives_its_usage_cumulatively_and_its_text_by_delta() -> None:
    tally = StreamTally(hold_done=True, dialect=MESSAGES)
    end = [{"type": "message_delta", "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 9, "input_tokens": None}},
           {"type": "message_stop"}]
    raw = _sse(_stream_events() + end)
    out = b"".join(tally.feed(raw[i : i + 7]) for i in range(0, len(raw), 7))  # any split
    assert out + tally.held == raw  # passed on byte for byte, message_stop held back
    assert tally.held == _sse(end[1:]) and tally.done
    assert tally.text == "Let me seeHello there"  # thinking counts as output; the signature does not
    assert (tally.chunk_id, tally.model) == ("msg_1", "claude-x")
    usage = tally.usage
    assert usage is not None and (usage.input_tokens, usage.cached_tokens, usage.cache_write_tokens,
                                  usage.output_tokens) == (45, 30, 5, 9)  # a null changes nothing
    assert event_text({"type": "content_block_delta", "delta": {"type": "input_json_delta",
                                                                "partial_json": '{"a":'}}) == '{"a":'
    # A delta carrying the input too (newer servers) replaces it.
    newer = MESSAGES.event_usage({"type": "message_delta", "usage": {"input_tokens": 11, "output_tokens": 10}}, usage)
    assert newer is not None and (newer.input_tokens, newer.cached_tokens, newer.output_tokens) == (46, 30, 10)


def test_a_cut_stream_ends_as_max_tokens_with_the_output_sent() -> None:
    tally = StreamTally(hold_done=True, dialect=MESSAGES)
    tally.feed(_sse(_stream_events()))
    assert open_block(tally.last_event) == 1
    raw = cut_ending(open_block(tally.last_event), 6, "Pro tier budget reached.")
    events = [part for part in raw.decode().split("\n\n") if part]
    assert events[0] == ": Pro tier budget reached."
    parsed = [(part.split("\n")[0], json.loads(part.split("\n")[1].removeprefix("data: "))) for part in events[1:]]
    assert [name for name, _ in parsed] == ["event: content_block_stop", "event: message_delta", "event: message_stop"]
    assert parsed[0][1] == {"type": "content_block_stop", "index": 1}
    assert parsed[1][1]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    # Only the output: the SDK keeps the input message_start reported.
    assert parsed[1][1]["usage"] == {"output_tokens": 6}
    assert open_block({"type": "content_block_stop", "index": 0}) is None
    assert b"content_block_stop" not in cut_ending(None, 0, "")


@pytest.mark.parametrize(("status", "kind"), [
    (400, "invalid_request_error"), (401, "authentication_error"), (402, "billing_error"),
    (403, "permission_error"), (404, "not_found_error"), (408, "invalid_request_error"),
    (413, "request_too_large"), (429, "rate_limit_error"), (500, "api_error"), (502, "api_error"),
    (503, "overloaded_error"), (504, "timeout_error"), (529, "overloaded_error"),
])
def test_errors_take_anthropics_type_for_their_status(status: int, kind: str) -> None:
    assert error_type(status) == kind
    assert json.loads(error_body(status, "why", "req_1")) == {
        "type": "error", "error": {"type": kind, "message": "why"}, "request_id": "req_1"}


def test_the_dialect_answers_errors_in_anthropics_shape() -> None:
    assert json.loads(MESSAGES.error_body(429, "requests", "rate_limit_exceeded", "Slow down.", None)) == {
        "type": "error", "error": {"type": "rate_limit_error", "message": "Slow down."}}
    assert MESSAGES.upstream_error({"type": "error", "error": {"type": "api_error", "message": "x"}}) == {
        "type": "api_error", "message": "x"}
    assert MESSAGES.upstream_error({"type": "message", "content": []}) is None


def test_openai_rate_limit_headers_become_anthropics() -> None:
    now = datetime(2026, 3, 1, 12, 0, 0, 250_000, tzinfo=UTC)
    openai = {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0",
              "x-ratelimit-reset-requests": "8.571s", "x-ratelimit-limit-tokens": "1000",
              "x-ratelimit-remaining-tokens": "10", "x-ratelimit-reset-tokens": "1m0s",
              "RateLimit": '"requests";r=0;t=9', "Retry-After": "9"}
    assert ratelimit_headers(openai, TokenCount.TOTAL, now) == {
        "anthropic-ratelimit-requests-limit": "60",
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": "2026-03-01T12:00:09Z",  # 12:00:08.821, rounded up
        "anthropic-ratelimit-tokens-limit": "1000",
        "anthropic-ratelimit-tokens-remaining": "10",
        "anthropic-ratelimit-tokens-reset": "2026-03-01T12:01:01Z",
        "RateLimit": '"requests";r=0;t=9',
        "Retry-After": "9",
    }
    output_only = ratelimit_headers(openai, TokenCount.OUTPUT, now)
    assert output_only["anthropic-ratelimit-output-tokens-limit"] == "1000"
    assert "anthropic-ratelimit-tokens-limit" not in output_only
    assert "anthropic-ratelimit-input-tokens-limit" in ratelimit_headers(openai, TokenCount.INPUT, now)
    assert (duration_ms("20ms"), duration_ms("1.5s"), duration_ms("2m3s"), duration_ms("soon")) == (20, 1500, 123_000, None)
    assert rfc3339(datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)) == "2026-03-01T12:00:00Z"


def test_the_settle_prices_cache_writes_at_their_rate() -> None:
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    document["prices"] = [{"model": "claude-x", "input_per_million_usd": "3.00", "output_per_million_usd": "15.00",
                           "cached_input_per_million_usd": "0.30", "cache_write_per_million_usd": "3.75"}]
    estimator = Estimator(parse_config(document))
    usage = answer_usage({"usage": {"input_tokens": 1000, "cache_read_input_tokens": 2000,
                                    "cache_creation_input_tokens": 4000, "output_tokens": 100}})
    assert usage is not None
    # 1000 × 3.00 + 2000 × 0.30 + 4000 × 3.75 + 100 × 15.00 micro-USD
    assert estimator.cost_micro_usd("claude-x", date(2026, 3, 1), usage) == 3000 + 600 + 15_000 + 1500


def test_the_end_user_is_read_from_metadata_user_id() -> None:
    config = parse_config(yaml.safe_load(DEFAULT_CONFIG.read_text()))
    assert attribution_of({}, {**BODY, "metadata": {"user_id": "u-42"}}, config).end_user == "u-42"
    assert attribution_of({}, {**BODY, "metadata": {"user_id": ""}}, config).end_user is None
    assert attribution_of({"x-quotameter-user": "h"}, BODY, config).end_user == "h"
