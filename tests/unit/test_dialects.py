"""API dialects without services: the Responses API's request checks, prompt
count, usage, stream tally and cut; passthrough routes; error shapes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway_shim.dialects import CutStream
from gateway_shim.dialects.chat import CHAT
from gateway_shim.dialects.responses import RESPONSES
from gateway_shim.errors import InvalidParameter, RouteNotFound, error_answer
from gateway_shim.routes import dialect_for, match_route, read_request
from gateway_shim.sse import StreamTally
from quotameter.config import Shim
from quotameter.events import UsageSource
from quotameter.tokens import count_messages, count_response_input, count_text

LIMITS = Shim()
RESPONSES_ROUTE = match_route("POST", "/responses")


def _event(kind: str, **fields: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()


def _response(status: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": "resp_1", "object": "response", "model": "gpt-4o-mini", "status": status, "output": [], "usage": usage}


USAGE = {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 3,
         "output_tokens_details": {"reasoning_tokens": 1}, "total_tokens": 12}
WORDS = ["alpha", " delta", " echo", " hotel", " the", " and"]  # one token each
STREAM = (
    _event("response.created", response=_response("in_progress"))
    + _event("response.output_item.added", output_index=0, item={"id": "msg_1", "type": "message", "content": []})
    + b"".join(_event("response.output_text.delta", item_id="msg_1", output_index=0, content_index=0, delta=w)
               for w in WORDS)
    + _event("response.reasoning_summary_text.delta", item_id="rs_1", output_index=1, summary_index=0, delta=" why")
)
COMPLETED = _event("response.completed", response=_response("completed", USAGE))


def test_a_responses_stream_is_read_through_its_dialect_and_its_end_held_back() -> None:
    tally = StreamTally(model="gpt-4o-mini", hold_done=True, dialect=RESPONSES)
    stream = STREAM + COMPLETED
    forwarded = b"".join(tally.feed(stream[i : i + 11]) for i in range(0, len(stream), 11))
    assert forwarded == STREAM and tally.held == COMPLETED and tally.done
    assert tally.model == "gpt-4o-mini" and tally.chunk_id == "resp_1"
    assert tally.text == "".join(WORDS) + " why"
    assert tally.usage is not None and tally.usage.source is UsageSource.UPSTREAM
    assert (tally.usage.input_tokens, tally.usage.output_tokens) == (9, 3)
    assert (tally.usage.cached_tokens, tally.usage.reasoning_tokens) == (4, 1)


@pytest.mark.parametrize("terminal", ["response.incomplete", "response.failed"])
def test_every_terminal_event_ends_a_responses_stream(terminal: str) -> None:
    tally = StreamTally(hold_done=True, dialect=RESPONSES)
    end = _event(terminal, response=_response("incomplete", USAGE))
    assert tally.feed(STREAM + end) == STREAM and tally.done and tally.usage is not None


def test_a_responses_stream_is_cut_before_the_delta_past_its_budget() -> None:
    tally = StreamTally(model="gpt-4o-mini", cut_at=4, hold_done=True, dialect=RESPONSES)
    forwarded = tally.feed(STREAM + COMPLETED)
    assert tally.cut and not tally.done and tally.text == "".join(WORDS[:4])
    assert forwarded.count(b"response.output_text.delta") == 2 * 4  # its event: line and its data
    ending = RESPONSES.cut_ending(CutStream("resp_1", "gpt-4o-mini", 4, 9, tally.text, "Budget reached.", 7))
    events = [event for event in ending.split(b"\n\n") if event]
    error, incomplete = (json.loads(event.split(b"data: ", 1)[1]) for event in events)
    assert events[0].startswith(b"event: error\n") and events[1].startswith(b"event: response.incomplete\n")
    # No top-level "error" member: the SDK yields it as an event instead of raising.
    assert error == {"type": "error", "code": "budget_exceeded", "message": "Budget reached.", "param": None,
                     "sequence_number": 7}
    response = incomplete["response"]
    assert response["id"] == "resp_1" and response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["usage"]["output_tokens"] == 4 and response["usage"]["input_tokens"] == 9
    assert response["output"][0]["content"][0]["text"] == "".join(WORDS[:4])


def test_the_json_answer_gives_usage_text_and_model() -> None:
    document = {**_response("completed", USAGE), "output": [
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "because"}]},
        {"type": "message", "content": [{"type": "output_text", "text": "hi"}, {"type": "refusal", "refusal": "no"}]},
        {"type": "function_call", "arguments": "{}"},
    ]}
    assert RESPONSES.text(document) == "becausehino{}"
    assert RESPONSES.usage(document) is not None and RESPONSES.usage(document).output_tokens == 3
    assert RESPONSES.served_model(document) == "gpt-4o-mini"
    assert RESPONSES.upstream_error({**document, "status": "failed", "error": {"message": "x"}}) is None
    assert RESPONSES.upstream_error({"error": {"message": "down"}}) == {"message": "down"}


def test_the_responses_prompt_is_instructions_and_input_framed_as_chat() -> None:
    model = "gpt-4o"
    assert count_response_input({"input": "hello world"}, model) == count_messages(
        [{"role": "user", "content": "hello world"}], model)
    items = [{"role": "user", "content": [{"type": "input_text", "text": "hi there"}]},
             {"type": "message", "role": "assistant", "content": "ok", "id": "msg_9"},
             {"type": "function_call_output", "call_id": "call_1", "output": "42 degrees"}]
    expected = count_messages([{"role": "system", "content": "Be brief."}, items[0],
                               {"role": "assistant", "content": "ok"}], model) + 3 + count_text("42 degrees", model)
    assert count_response_input({"instructions": "Be brief.", "input": items}, model) == expected
    assert count_response_input({}, model) == 0


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"input": "x"}, "model", "missing_required_parameter"),
    ({"model": 3, "input": "x"}, "model", "invalid_type"),
    ({"model": "m", "input": 42}, "input", "invalid_type"),
    ({"model": "m", "input": ["text"]}, "input[0]", "invalid_type"),
    ({"model": "m", "input": [{"role": "user", "content": 5}]}, "input[0].content", "invalid_type"),
    ({"model": "m", "input": [{"role": "user", "content": ["x"]}]}, "input[0].content[0]", "invalid_type"),
    ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
    ({"model": "m", "input": "x", "max_output_tokens": "9"}, "max_output_tokens", "invalid_type"),
    ({"model": "m", "input": "x", "stream": "yes"}, "stream", "invalid_type"),
    ({"model": "m", "input": "x", "instructions": ["a"]}, "instructions", "invalid_type"),
])
def test_a_responses_body_with_a_wrong_field_is_refused_naming_it(body: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(InvalidParameter) as refused:
        read_request(RESPONSES_ROUTE, json.dumps(body).encode(), LIMITS)
    assert (refused.value.param, refused.value.code, refused.value.status) == (param, code, 400)


def test_a_responses_request_is_read_and_its_stream_never_rewritten() -> None:
    raw = json.dumps({"model": "m", "input": "hi", "stream": True, "max_output_tokens": 7}).encode()
    proxied = read_request(RESPONSES_ROUTE, raw, LIMITS, count=True)
    assert proxied.stream and not proxied.usage_injected and proxied.upstream_body == raw
    assert proxied.dialect is RESPONSES and RESPONSES.max_output(proxied.body) == 7
    assert proxied.prompt_tokens == count_response_input({"input": "hi"}, "m")
    degraded = RESPONSES.degrade(proxied.body, "cheap", 5)
    assert degraded["model"] == "cheap" and degraded["max_output_tokens"] == 5 and "max_tokens" not in degraded
    assert dialect_for("/v1/responses?x=1") is RESPONSES and dialect_for("/v1/chat/completions") is CHAT


def test_unknown_paths_are_refused_by_name_unless_passed_through() -> None:
    with pytest.raises(RouteNotFound) as unknown:
        match_route("POST", "/files")
    assert "POST /v1/files" in unknown.value.message and unknown.value.status == 404
    allowed = ["/v1/files", "/v1/files/*"]
    for method, path in (("POST", "/files"), ("GET", "/files/file-1/content")):
        route = match_route(method, path, allowed)
        assert not route.has_body and not route.streams and route.name in allowed
    assert match_route("POST", "/responses", allowed) is RESPONSES_ROUTE  # metered routes come first
    with pytest.raises(RouteNotFound):
        match_route("GET", "/batches", allowed)


class _Shaped:
    def error_body(self, status: int, error_type: str, code: str, message: str, param: str | None) -> bytes:
        return json.dumps({"type": "error", "error": {"type": code, "message": message}}).encode()


def test_error_bodies_take_their_dialects_shape() -> None:
    refusal = RouteNotFound("Unknown request URL: GET /v1/x.")
    openai_shaped = json.loads(error_answer(refusal).body)
    assert openai_shaped == json.loads(error_answer(refusal, dialect=RESPONSES).body)
    assert openai_shaped["error"]["code"] == "unknown_url"
    assert json.loads(error_answer(refusal, dialect=_Shaped()).body) == {
        "type": "error", "error": {"type": "unknown_url", "message": "Unknown request URL: GET /v1/x."}}


def test_named_events_read_by_the_newline_fast_path_as_by_the_general_parser() -> None:
    stream = STREAM + b"event: response.in_progress\nid: 3\ndata: {}\n\n" + b": ping\n\n" + COMPLETED
    for cut_at in (None, 3, 100):
        fast = StreamTally(model="m", cut_at=cut_at, hold_done=True, dialect=RESPONSES)
        general = StreamTally(model="m", cut_at=cut_at, hold_done=True, dialect=RESPONSES)
        assert fast.feed(stream) == general._feed_any(stream)
        state = ("cut", "counted_output", "chunk_id", "usage", "model", "done", "events", "text", "held")
        assert [getattr(fast, name) for name in state] == [getattr(general, name) for name in state]
