"""A sampled request's trace context in its event (CloudEvents' ``traceparent``)
and on its Kafka record, and the spool's age gauge: no services."""

from datetime import UTC, datetime
from pathlib import Path

from gateway_shim.kafka_records import kafka_records
from gateway_shim.spool import Spool, SpoolRecord
from quotameter.event_batch import decode_record
from quotameter.events import (
    Decision,
    RequestData,
    UsageEvent,
    decode_event,
    encode_event,
    encode_request_event,
    traceparent_of,
)

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
AT = datetime(2026, 11, 28, 12, 0, 1, 500000, tzinfo=UTC)
DATA = {"api_key_id": "a1b2c3d4e5f6", "tier": "pro", "route": "/v1/chat/completions", "status": 200,
        "decision": Decision.ADMITTED, "input_tokens": 11, "output_tokens": 5, "latency_ms": 3.5}


def _fast(traceparent: str | None) -> bytes:
    return encode_request_event("0190a0b0-0000-7000-8000-000000000000", "shim-1", "acme", AT, **DATA,
                                traceparent=traceparent).value


def _model(traceparent: str | None) -> bytes:
    return encode_event(UsageEvent(id="0190a0b0-0000-7000-8000-000000000000", source="shim-1", subject="acme",
                                   time=AT, data=RequestData(**DATA), traceparent=traceparent))


def test_a_sampled_event_ends_with_its_traceparent_in_both_encoders() -> None:
    fast = _fast(TRACEPARENT)
    assert fast == _model(TRACEPARENT)
    assert fast.endswith(f',"traceparent":"{TRACEPARENT}"}}'.encode())
    assert traceparent_of(fast) == TRACEPARENT.encode()
    assert decode_event(fast).traceparent == TRACEPARENT


def test_an_unsampled_event_is_as_before() -> None:
    plain = _fast(None)
    assert plain == _model(None) and b"traceparent" not in plain and plain.endswith(b"}}")
    assert traceparent_of(plain) is None
    # A text value that merely ends like one is not taken for it.
    tagged = encode_request_event("id-2", "shim-1", "acme", AT, **DATA, tags=(("t", TRACEPARENT),)).value
    assert traceparent_of(tagged) is None


def test_a_malformed_traceparent_is_dropped_not_refused() -> None:
    for bad in ("00-abc", TRACEPARENT.upper(), TRACEPARENT + "\n", 42):
        assert _fast(bad) == _fast(None)  # type: ignore[arg-type]
    reported = _fast(TRACEPARENT).replace(TRACEPARENT.encode(), b"01-nonsense")
    assert decode_event(reported).traceparent is None


def test_records_carry_the_traceparent_header_also_from_an_old_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20).open()
    spool.append(b"acme", 1, _fast(None))  # as a spool written before trace contexts existed
    spool.append(b"acme", 2, _fast(TRACEPARENT))
    spool.close()
    again = Spool(tmp_path, max_bytes=1 << 20).open()
    old, new = again.read(0, 2)
    # A record of one event carries its request's trace context as a header;
    # a batch does not (its events carry theirs, linked from the event).
    [old_record] = kafka_records(again.spool_id, [old])
    [new_record] = kafka_records(again.spool_id, [new])
    assert "traceparent" not in dict(old_record.headers)
    assert dict(new_record.headers)["traceparent"] == TRACEPARENT.encode()
    [both] = kafka_records(again.spool_id, [old, new])
    assert "traceparent" not in dict(both.headers) and decode_record(both.value)[1].traceparent == TRACEPARENT
    again.close()


def test_the_spool_age_is_its_oldest_undelivered_event(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20).open()
    assert spool.oldest_ms() is None
    for seq, at_ms in enumerate((1000, 2000, 3000)):
        assert spool.append(b"k", at_ms, b"v") == SpoolRecord(seq, b"k", at_ms, b"v")
    assert spool.oldest_ms() == 1000
    spool.ack(1)  # out of order: the oldest still waits
    assert spool.oldest_ms() == 1000
    spool.ack(0)
    assert spool.oldest_ms() == 3000
    spool.close()
    again = Spool(tmp_path, max_bytes=1 << 20).open()  # replayed after a restart
    assert again.oldest_ms() == 3000
    again.append(b"k", 4000, b"v")
    again.ack(2)
    assert again.oldest_ms() == 4000
    again.ack(3)
    assert again.oldest_ms() is None
    again.close()
