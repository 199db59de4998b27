"""Reported usage events read from CloudEvents bodies (gateway_shim/cloudevents.py)."""

import json
from decimal import Decimal

import pytest

from gateway_shim.cloudevents import BATCH, STRUCTURED, parse_events
from gateway_shim.errors import InvalidEvents, MalformedRequest, PayloadTooLarge, UnsupportedMediaType
from quotameter.events import EVENT_TYPE_V1, decode_event


def event(id: str = "ev-1", **data: object) -> dict:
    return {
        "specversion": "1.0",
        "id": id,
        "source": "kong-1",
        "type": EVENT_TYPE_V1,
        "subject": "acme",
        "time": "2026-11-28T12:00:01.5+01:00",
        "data": {
            "api_key_id": "consumer-7",
            "tier": "pro",
            "route": "/v1/chat/completions",
            "status": 200,
            "decision": "admitted",
            "model_served": "gpt-4o-mini",
            "input_tokens": 12,
            "output_tokens": 30,
            "usage_source": "upstream",
            **data,
        },
    }


def body(value: object) -> bytes:
    return json.dumps(value).encode()


def test_one_event_is_read_and_encoded_as_the_topic_carries_it() -> None:
    [encoded] = parse_events(STRUCTURED, body(event(extra_field="kept out")), 10)
    decoded = decode_event(encoded.value)
    assert (encoded.id, encoded.customer_id) == ("ev-1", "acme")
    assert decoded.time.isoformat() == "2026-11-28T11:00:01.500000+00:00"
    assert encoded.time_ms == int(decoded.time.timestamp() * 1000)
    assert (decoded.data.input_tokens, decoded.data.output_tokens) == (12, 30)
    assert b"extra_field" not in encoded.value  # readers ignore unknown fields; the topic never carries them


def test_a_batch_keeps_its_order_and_money_stays_exact() -> None:
    raw = b'[' + b",".join(body(event(f"ev-{n}")) for n in range(3))[:-2] + b',"upstream_cost_usd":0.12345678901234567891}}]'
    encoded = parse_events(BATCH, raw, 10)
    assert [e.id for e in encoded] == ["ev-0", "ev-1", "ev-2"]
    assert decode_event(encoded[2].value).data.upstream_cost_usd == Decimal("0.12345678901234567891")


def test_a_bad_field_is_named_with_its_index_and_nothing_is_taken() -> None:
    batch = [event("ok-0"), event("ok-1"), event("bad-2", input_tokens=-1), event("ok-3")]
    with pytest.raises(InvalidEvents) as caught:
        parse_events(BATCH, body(batch), 10)
    assert caught.value.message == (
        "events[2].data.input_tokens: Input should be greater than or equal to 0; none of the batch was taken."
    )
    assert caught.value.param == "events[2].data.input_tokens"


def test_every_problem_is_named_and_a_single_event_has_no_index() -> None:
    broken = event(status="teapot")
    del broken["subject"]
    with pytest.raises(InvalidEvents) as caught:
        parse_events(STRUCTURED, body(broken), 10)
    assert caught.value.param == "subject"
    assert caught.value.message.startswith("subject: Field required; data.status: Input should be a valid integer")
    with pytest.raises(InvalidEvents, match=r"^events\[1\]: Input should be a valid dictionary"):
        parse_events(BATCH, body([event(), "not an event"]), 10)
    with pytest.raises(InvalidEvents, match=r"^events\[0\]\.type: Value error, not a quotameter request event type"):
        parse_events(BATCH, body([{**event(), "type": "com.example.other"}]), 10)
    with pytest.raises(InvalidEvents, match=r"^events\[0\]\.time: Value error, time must carry a time zone"):
        parse_events(BATCH, body([{**event(), "time": "2026-11-28T12:00:00"}]), 10)


def test_fractional_tokens_are_refused() -> None:
    with pytest.raises(InvalidEvents, match=r"^data\.output_tokens: Input should be a valid integer"):
        parse_events(STRUCTURED, body(event(output_tokens=1.5)), 10)


def test_many_problems_are_counted_past_the_first_ten() -> None:
    with pytest.raises(InvalidEvents, match=r"\(and 2 more\); none of the batch was taken\.$"):
        parse_events(BATCH, body([event(str(n), input_tokens=-1) for n in range(12)]), 20)


def test_content_type_shape_and_count_are_checked() -> None:
    with pytest.raises(UnsupportedMediaType, match="application/cloudevents\\+json"):
        parse_events("application/json", body(event()), 10)
    with pytest.raises(MalformedRequest):
        parse_events(STRUCTURED, b"{not json", 10)
    with pytest.raises(MalformedRequest, match="JSON array"):
        parse_events(BATCH, body(event()), 10)
    with pytest.raises(PayloadTooLarge, match="at most 2 "):
        parse_events(BATCH, body([event("a"), event("b"), event("c")]), 2)
    assert parse_events(BATCH, body([event("a"), event("b")]), 2)[1].id == "b"
    assert parse_events(BATCH, b"[]", 2) == []
