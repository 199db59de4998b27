from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from quotameter.errors import EventError
from quotameter.events import Decision, RequestData, UsageEvent, UsageSource, decode_event, encode_event, new_event_id


def make_event(**data_overrides) -> UsageEvent:
    data = {
        "api_key_id": "a1b2c3d4e5f6",
        "tier": "pro",
        "route": "/v1/chat/completions",
        "status": 200,
        "decision": Decision.ADMITTED,
        "model_requested": "gpt-4o-mini",
        "model_served": "gpt-4o-mini-2024-07-18",
        "input_tokens": 12,
        "output_tokens": 30,
        "usage_source": UsageSource.UPSTREAM,
        "streamed": True,
        "latency_ms": 41.5,
        "ttft_ms": 9.25,
        "upstream_cost_usd": Decimal("0.000019800000"),
        **data_overrides,
    }
    return UsageEvent(
        id=new_event_id(),
        source="shim-1",
        subject="acme",
        time=datetime(2026, 11, 28, 12, 0, 1, 500000, tzinfo=UTC),
        data=RequestData(**data),
    )


def test_round_trip_is_lossless():
    event = make_event()
    assert decode_event(encode_event(event)) == event


def test_envelope_is_cloudevents_1_0():
    import json

    body = json.loads(encode_event(make_event()))
    assert body["specversion"] == "1.0"
    assert body["type"] == "quotameter.request.v1"
    assert body["subject"] == "acme"
    assert body["datacontenttype"] == "application/json"
    assert body["time"].startswith("2026-11-28T12:00:01.5")
    assert "key" not in json.dumps(body["data"]).replace("api_key_id", "")


def test_time_is_normalised_to_utc():
    event = make_event().model_copy(update={"time": datetime(2026, 1, 1, 1, 0, tzinfo=timezone(timedelta(hours=1)))})
    decoded = decode_event(encode_event(event))
    assert decoded.time == datetime(2026, 1, 1, 0, 0, tzinfo=UTC)


def test_a_v2_event_with_new_fields_still_reads_as_v1():
    import json

    body = json.loads(encode_event(make_event()))
    body["type"] = "quotameter.request.v2"
    body["data"]["new_field"] = {"nested": True}
    body["traceparent"] = "00-abc"
    decoded = decode_event(json.dumps(body))
    assert decoded.data.input_tokens == 12


@pytest.mark.parametrize(
    ("mutate", "mentions"),
    [
        (lambda b: b.pop("id"), "id"),
        (lambda b: b["data"].update(input_tokens=-1), "data.input_tokens"),
        (lambda b: b["data"].update(input_tokens=1.5), "data.input_tokens"),
        (lambda b: b.update(type="com.example.other"), "type"),
        (lambda b: b.update(time="2026-11-28T12:00:00"), "time"),
        # Outside what the ledger holds: a year of three digits would be misread or block its batch.
        (lambda b: b.update(time="0999-05-06T07:08:09.123Z"), "time"),
        (lambda b: b.update(time="1969-12-31T23:59:59.999Z"), "time"),
        (lambda b: b.update(time="2300-01-01T00:00:00Z"), "time"),
        (lambda b: b.update(specversion="0.3"), "specversion"),
    ],
)
def test_malformed_events_name_the_field(mutate, mentions):
    import json

    body = json.loads(encode_event(make_event()))
    mutate(body)
    with pytest.raises(EventError, match=mentions.replace(".", r"\.")):
        decode_event(json.dumps(body))


def test_the_ledger_range_is_accepted_to_its_ends():
    import json

    for moment in ("1970-01-01T00:00:00Z", "2299-12-31T23:59:59.999Z"):
        body = json.loads(encode_event(make_event()))
        body["time"] = moment
        assert decode_event(json.dumps(body)).time.year in (1970, 2299)


def test_not_json_at_all():
    with pytest.raises(EventError, match="malformed usage event"):
        decode_event(b"\x00not json")


def test_event_ids_are_unique_and_time_ordered():
    ids = [new_event_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids[0][:8] <= ids[-1][:8]
