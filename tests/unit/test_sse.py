"""The shim's pure parts: SSE tally, usage extraction, routes, admission headers."""

from __future__ import annotations

import json

import pytest

from gateway_shim.admission import format_duration
from gateway_shim.errors import MalformedRequest, RouteNotFound
from gateway_shim.routes import match_route, read_request
from gateway_shim.sse import StreamTally, event_data
from gateway_shim.usage import completion_text, counted_usage, usage_from
from quotameter.events import UsageSource


def _event(document: object, null_usage: bool = False) -> bytes:
    if isinstance(document, dict) and null_usage:
        document = {**document, "usage": None}
    return b"data: " + json.dumps(document).encode() + b"\n\n"


def _chunk(content: str | None = None, model: str = "m-1") -> dict:
    delta = {} if content is None else {"content": content}
    return {"object": "chat.completion.chunk", "model": model, "choices": [{"index": 0, "delta": delta}]}


USAGE_CHUNK = {"object": "chat.completion.chunk", "model": "m-1", "choices": [], "usage": {
    "prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9,
    "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 1},
}}


def test_events_split_across_reads_are_forwarded_whole() -> None:
    stream = _event(_chunk("Hel")) + _event(_chunk("lo")) + b"data: [DONE]\n\n"
    tally = StreamTally()
    forwarded = b"".join(tally.feed(stream[i : i + 7]) for i in range(0, len(stream), 7))
    assert forwarded == stream
    assert tally.text == "Hello" and tally.done and tally.model == "m-1" and tally.usage is None


def test_crlf_delimited_events() -> None:
    stream = b"data: " + json.dumps(_chunk("a")).encode() + b"\r\n\r\ndata: [DONE]\r\n\r\n"
    tally = StreamTally()
    assert tally.feed(stream) == stream
    assert tally.text == "a" and tally.done


def test_usage_chunk_is_read_and_kept_when_the_client_asked() -> None:
    stream = _event(_chunk("hi"), null_usage=True) + _event(USAGE_CHUNK) + b"data: [DONE]\n\n"
    tally = StreamTally(hide_usage=False)
    assert tally.feed(stream) == stream
    assert tally.usage is not None
    assert (tally.usage.input_tokens, tally.usage.output_tokens) == (7, 2)
    assert (tally.usage.cached_tokens, tally.usage.reasoning_tokens) == (4, 1)


def test_injected_usage_leaves_no_trace_for_the_client() -> None:
    upstream = _event(_chunk("hi"), null_usage=True) + _event(USAGE_CHUNK) + b"data: [DONE]\n\n"
    tally = StreamTally(hide_usage=True)
    seen = tally.feed(upstream)
    assert seen == _event(_chunk("hi")) + b"data: [DONE]\n\n"
    assert tally.usage is not None and tally.usage.output_tokens == 2


def test_cut_stream_drops_the_trailing_fragment() -> None:
    tally = StreamTally()
    whole = _event(_chunk("one")) + _event(_chunk(" two"))
    assert tally.feed(whole + b'data: {"choices": [{"delta": {"content": " thr') == whole
    assert tally.text == "one two" and not tally.done and tally.pending_bytes > 0


def test_budget_cut_stops_before_the_chunk_that_would_pass_the_reservation() -> None:
    words = [" word"] * 12  # one token each
    stream = b"".join(_event(_chunk(w)) for w in words) + b"data: [DONE]\n\n"
    tally = StreamTally(cut_at=5)
    forwarded = tally.feed(stream)
    assert tally.cut and tally.counted_output == 5
    assert forwarded == b"".join(_event(_chunk(w)) for w in words[:5])
    assert tally.text == " word" * 5


def test_no_cut_and_no_count_while_the_bytes_cannot_reach_the_reservation() -> None:
    stream = b"".join(_event(_chunk(" word")) for _ in range(12)) + b"data: [DONE]\n\n"
    tally = StreamTally(cut_at=100_000)
    assert tally.feed(stream) == stream
    assert not tally.cut and tally.counted_output == 0 and tally.done
    assert tally.text == " word" * 12  # still recoverable for the shim's own count


def test_comments_pass_through_and_garbage_data_is_dropped() -> None:
    # Data that is no JSON object would break the client's parser mid-stream.
    garbage = b"data: {not json\n\n" + b"data: not json\n\n" + b"event: ping\ndata: 42\n\n"
    for model in (None, "m"):  # parsed, and passed on unparsed once the model is known
        tally = StreamTally(hide_usage=True, model=model)
        tally.model = model
        good = b": keep-alive\n\n" + _event(_chunk("x"))
        assert tally.feed(b": keep-alive\n\n" + garbage + _event(_chunk("x"))) == good
        assert tally.text == "x" and tally.usage is None and tally.dropped == 3


def test_of_two_usage_chunks_the_last_counts() -> None:
    first = {"id": "c", "model": "m", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 9}}
    tally = StreamTally()
    tally.feed(_event(first) + _event(USAGE_CHUNK))
    assert tally.usage == usage_from(USAGE_CHUNK)


def test_a_huge_event_split_in_many_reads_costs_linear_time() -> None:
    import time

    event = _event(_chunk(" word" * 2_000_000))  # 10 MB
    started = time.perf_counter()
    assert StreamTally(model="m").feed(event) == event
    whole = time.perf_counter() - started
    tally = StreamTally(model="m")
    started = time.perf_counter()
    out = b"".join(tally.feed(event[i : i + 65536]) for i in range(0, len(event), 65536))
    split = time.perf_counter() - started
    assert out == event and tally.pending_bytes == 0 and tally.text == " word" * 2_000_000
    # Rescanning the event at each of its 160 reads would cost ~80 times one pass.
    assert split < 10 * whole + 0.05, f"{split:.3f} s split vs {whole:.3f} s whole: rescanned at every read"


def test_event_data_joins_multiline_data() -> None:
    assert event_data(b"event: x\ndata: a\ndata:b\n\n") == b"a\nb"
    assert event_data(b": comment\n\n") is None


def test_usage_from_each_shape() -> None:
    chat = usage_from({"usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}})
    assert chat is not None and (chat.input_tokens, chat.output_tokens, chat.source) == (3, 5, UsageSource.UPSTREAM)
    responses = usage_from({"response": {"usage": {"input_tokens": 2, "output_tokens": 4}}})
    assert responses is not None and (responses.input_tokens, responses.output_tokens) == (2, 4)
    embeddings = usage_from({"usage": {"prompt_tokens": 6, "total_tokens": 6}})
    assert embeddings is not None and (embeddings.input_tokens, embeddings.output_tokens) == (6, 0)
    assert usage_from({"usage": None}) is None and usage_from("nope") is None
    bogus = usage_from({"usage": {"prompt_tokens": -1, "completion_tokens": "7"}})
    assert bogus is not None and (bogus.input_tokens, bogus.output_tokens) == (0, 0)


def test_completion_text_of_bodies_and_chunks() -> None:
    body = {"choices": [{"message": {"role": "assistant", "content": "a b"}}, {"text": " c"}]}
    assert completion_text(body) == "a b c"
    assert completion_text(_chunk("d")) == "d"
    assert completion_text(None) == ""


def test_counted_usage_counts_prompt_and_delivered_text() -> None:
    usage = counted_usage({"messages": [{"role": "user", "content": "hi"}]}, "gpt-4o", "alpha delta")
    assert (usage.input_tokens, usage.output_tokens, usage.source) == (8, 2, UsageSource.COUNTED)


def test_routes() -> None:
    assert match_route("POST", "/chat/completions").streams
    assert match_route("GET", "/models/gpt-4o").name == "/v1/models/{model}"
    for method, path in [("GET", "/chat/completions"), ("POST", "/nope"), ("GET", "/models/a/b")]:
        with pytest.raises(RouteNotFound):
            match_route(method, path)


def test_read_request_injects_usage_only_when_needed() -> None:
    chat = match_route("POST", "/chat/completions")
    messages = [{"role": "user", "content": "Hi."}]  # a body the shim takes (request_checks.py)
    raw = json.dumps({"model": "m", "messages": messages, "stream": True}).encode()
    proxied = read_request(chat, raw)
    assert proxied.stream and proxied.usage_injected and proxied.model == "m"
    assert json.loads(proxied.upstream_body)["stream_options"] == {"include_usage": True}

    asked = json.dumps({"model": "m", "messages": messages, "stream": True,
                        "stream_options": {"include_usage": True}}).encode()
    assert read_request(chat, asked).upstream_body == asked  # the client's bytes, untouched
    plain = json.dumps({"model": "m", "messages": messages}).encode()
    assert read_request(chat, plain).upstream_body == plain and not read_request(chat, plain).stream
    for bad in (b"{nope", b"[1, 2]", b"\xff"):
        with pytest.raises(MalformedRequest):
            read_request(chat, bad)


def test_reset_durations_are_written_as_openai_does() -> None:
    assert [format_duration(ms) for ms in (20, 8571, 60_000, 61_500)] == ["20ms", "8.571s", "1m0s", "1m1.5s"]


def test_the_newline_fast_path_reads_streams_as_the_general_parser_does() -> None:
    """``feed`` cuts "\\n"-only buffers with bytes.split; the regex parser must agree on every event."""
    import random

    rng = random.Random(3)
    pieces = [
        _event(_chunk("hi")), _event(_chunk(" a,\"usage\":null"), null_usage=True), b": keep-alive\n\n",
        b"data:" + json.dumps(_chunk("x")).encode() + b"\n\n", b"event: e\ndata: " + json.dumps(_chunk("y")).encode() + b"\n\n",
        _event(USAGE_CHUNK), b"data: {broken\n\n", b"data: a\ndata: b\n\n", b"\n", b"data: [DONE]\n\n",
    ]
    state = ("cut", "counted_output", "chunk_id", "usage", "model", "done", "events", "text", "pending_bytes")
    for _ in range(2000):
        stream = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 8))) + rng.choice([b"", b"data: par"])
        options = {"hide_usage": rng.random() < 0.5, "cut_at": rng.choice([None, 3, 30]), "model": "gpt-4o"}
        fast, general = StreamTally(**options), StreamTally(**options)
        cuts = sorted(rng.sample(range(len(stream) + 1), min(3, len(stream) + 1)))
        for part in (stream[i:j] for i, j in zip([0, *cuts], [*cuts, len(stream)], strict=True)):
            buffer = general._pending + part
            assert fast.feed(part) == general._feed_any(buffer)
            assert [getattr(fast, name) for name in state] == [getattr(general, name) for name in state]
            if fast.cut:
                break


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_done_is_held_back_for_the_relay_to_write_after_billing(newline: bytes) -> None:
    chunk = b'data: {"id":"c1","model":"m","choices":[{"index":0,"delta":{"content":"hi"}}]}' + newline * 2
    done = b"data: [DONE]" + newline * 2
    tally = StreamTally(model="m", hold_done=True)
    assert tally.feed(chunk + done) == chunk
    assert tally.done and tally.held == done
    # Without hold_done it goes out at once, as before.
    plain = StreamTally(model="m")
    assert plain.feed(chunk + done) == chunk + done and plain.held == b""


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_the_usage_chunk_is_held_back_with_done(newline: bytes) -> None:
    """OpenAI's client takes a stream whose usage chunk arrived as whole,
    even if the connection breaks before [DONE]: that chunk too goes out
    only after the request's event is spooled."""
    end = newline * 2
    chunk = b'data: {"id":"c1","model":"m","choices":[{"index":0,"delta":{"content":"hi"}}]}' + end
    usage = b'data: {"id":"c1","model":"m","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1}}' + end
    done = b"data: [DONE]" + end
    for parts in ([chunk + usage + done], [chunk, usage, done], [chunk + usage, done]):
        tally = StreamTally(model="m", hold_done=True)
        assert b"".join(tally.feed(part) for part in parts) == chunk
        assert (tally.held_usage, tally.held) == (usage, done)
        assert tally.usage is not None and tally.usage.output_tokens == 1
    # An event after the usage chunk (not what OpenAI sends) takes it along, in order.
    tally = StreamTally(model="m", hold_done=True)
    assert tally.feed(chunk + usage) == chunk
    assert tally.feed(chunk) == usage + chunk and tally.held_usage == b""
    # Without hold_done, and with the usage hidden from the client, as before.
    assert StreamTally(model="m").feed(chunk + usage + done) == chunk + usage + done
    hidden = StreamTally(model="m", hold_done=True, hide_usage=True)
    assert hidden.feed(chunk + usage + done) == chunk and hidden.held_usage == b""


def test_only_data_event_lines_and_comments_reach_the_client() -> None:
    # After an "id:", the official client reads every keep-alive as an empty event and fails on it.
    chunk = json.dumps(_chunk("x")).encode()
    stream = (b"retry: 100\nid: 7\nx-unknown: 1\nevent: delta\ndata: " + chunk + b"\n\n"
              + b"event: ping\n\n" + b"id: 8\n\n" + b": keep-alive\n\n")
    tally = StreamTally(model="m")
    assert tally.feed(stream) == b"event: delta\ndata: " + chunk + b"\n\n" + b": keep-alive\n\n"
    assert tally.text == "x"
