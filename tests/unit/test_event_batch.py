"""Many events per Kafka record, without a broker: the batch encoding, the
spool seqs a record carries, how the emitter cuts records, and the windows
applying each event of a record once."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from gateway_shim.kafka_records import RECORD_BYTES, RECORD_EVENTS, kafka_records
from gateway_shim.spool import SpoolRecord
from quotameter.aggregate import PricedEvent
from quotameter.delivery import format_seqs, parse_seqs, read_headers, read_seqs
from quotameter.errors import EventError
from quotameter.event_batch import BadEvent, decode_record, encode_batch, position
from quotameter.events import RequestData, UsageEvent, decode_event, encode_event
from quotameter.periods import BillingCalendar
from quotameter.pricing import Cost
from quotameter.windows import Delivered, Granularity, WindowRecord, apply

T0 = datetime(2025, 3, 3, 12, 0, tzinfo=UTC)


def usage(n: int, customer: str = "acme", tokens: int = 10) -> UsageEvent:
    return UsageEvent(
        id=f"e{n}", source="s", subject=customer, time=T0,
        data=RequestData(api_key_id="k", tier="pro", route="/v1/chat/completions", status=200, decision="admitted",
                         model_served="m1", input_tokens=tokens),
    )


def spooled(seq: int, customer: str = "acme", size: int = 0) -> SpoolRecord:
    event = usage(seq, customer) if not size else usage(seq, customer).model_copy(update={"source": "s" * size})
    return SpoolRecord(seq, customer.encode(), 1_000 + seq, encode_event(event))


def test_a_batch_decodes_to_its_events_in_order() -> None:
    events = [usage(1), usage(2, "globex", 7), usage(3)]
    decoded = decode_record(encode_batch([encode_event(e) for e in events]))
    assert decoded == events
    assert decode_record(encode_event(events[0])) == [events[0]]  # a record of one envelope, as older shims send


def test_a_bad_element_is_set_apart_and_the_rest_decode() -> None:
    bad = json.dumps({"id": "x", "type": "quotameter.request.v1"}).encode()
    decoded = decode_record(encode_batch([encode_event(usage(1)), bad, encode_event(usage(3))]))
    assert [d.id for d in decoded if isinstance(d, UsageEvent)] == ["e1", "e3"]
    assert isinstance(decoded[1], BadEvent) and "malformed usage event" in decoded[1].reason
    assert json.loads(decoded[1].value) == json.loads(bad)


@pytest.mark.parametrize("raw", [b"[]", b"[1,", b"not json", b'{"id": 1}'])
def test_an_unreadable_record_is_refused_whole(raw: bytes) -> None:
    with pytest.raises(EventError):
        decode_record(raw)


def test_seqs_travel_as_runs() -> None:
    seqs = [3, 4, 5, 9, 11, 12]
    assert format_seqs(seqs) == b"3-5,9,11-12"
    assert parse_seqs(format_seqs(seqs)) == seqs
    assert parse_seqs(b"7") == [7]
    for bad in (b"", b"5-3", b"-1", b"a", b"1-", b"0-99999999"):
        assert parse_seqs(bad) is None, bad


def test_one_event_records_keep_their_old_headers() -> None:
    [record] = kafka_records(b"ab12", [spooled(42)])
    assert decode_event(record.value).id == "e42" and record.key == b"acme" and record.seqs == [42]
    assert read_headers(record.headers) == ("ab12", 42)  # what an older worker reads
    assert read_seqs(record.headers) == ("ab12", [42])


def test_a_partitions_events_share_records_each_naming_every_seq() -> None:
    events = [spooled(seq, "acme" if seq % 2 else "globex") for seq in [*range(10, 10 + RECORD_EVENTS), 5000, 5001]]
    records = list(kafka_records(b"ab12", events))
    assert len(records) > 1 and all(1 < len(r.seqs) <= RECORD_EVENTS for r in records)
    assert [s for r in records for s in r.seqs] == [e.seq for e in events]  # none lost, none twice, in order
    for record in records:
        carried = decode_record(record.value)
        assert [e.id for e in carried] == [f"e{seq}" for seq in record.seqs]  # in spool order, one seq per event
        assert read_seqs(record.headers) == ("ab12", record.seqs)
        assert record.key == carried[0].subject.encode() and record.timestamp_ms == 1_000 + record.seqs[0]
        assert ("content-type", b"application/cloudevents-batch+json") in record.headers


def test_records_stay_under_their_byte_bound() -> None:
    events = [spooled(seq, size=40_000) for seq in range(20)]
    records = list(kafka_records(b"ab12", events))
    assert len(records) > 1 and all(len(r.value) <= RECORD_BYTES for r in records)
    assert [s for r in records for s in r.seqs] == list(range(20))


def test_each_event_of_a_record_is_applied_once() -> None:
    def at(offset: int, index: int) -> Delivered:
        event = usage(offset * 100 + index)
        return Delivered(PricedEvent(event, Cost(Decimal("0.001"), "p@1")), partition=1, offset=offset, index=index)

    record = WindowRecord()
    calendar = BillingCalendar("UTC", 1)
    apply(record, Granularity.PERIOD, [at(7, 0), at(7, 1), at(7, 2)], {}, calendar)
    assert record.totals("2025-03").events == 3  # one offset, three events
    # The record again (a crash before the commit), then the next one.
    apply(record, Granularity.PERIOD, [at(7, 0), at(7, 1), at(7, 2), at(8, 0)], {}, calendar)
    assert record.totals("2025-03").events == 4 and record.totals("2025-03").input_tokens == 40
    assert record.wm == {"1": position(8, 0)}
