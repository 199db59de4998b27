"""The Kafka records the emitter makes of a partition's spooled events.

Events of one partition and one turn of the sender travel together: one
record carries up to ``RECORD_EVENTS`` of them as a CloudEvents JSON batch
(quotameter.event_batch), since what a worker spends per record (Faust's
bookkeeping, the ack, the offset guard) cost more than the event itself. A
lone event goes as it always did, one envelope, so a worker older than
batches reads what a quiet shim sends.

A batch may mix customers: all of them map to this partition, which is what
the worker's tables need (one partition per customer). Its key is the first
event's customer, so a producer that partitions by key puts it where every
one of its events belongs; the worker checks each event against the record's
partition.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

from gateway_shim.spool import SpoolRecord
from quotameter.delivery import batch_delivery_headers, delivery_headers
from quotameter.event_batch import BATCH_CONTENT_TYPE, CONTENT_TYPE_HEADER, encode_batch
from quotameter.events import traceparent_of
from telemetry.context import TRACEPARENT_HEADER

RECORD_EVENTS = 1000  # events per record at most
RECORD_BYTES = 256 * 1024  # a record's value at most (well under a broker's 1 MiB default), unless one event is larger


class KafkaRecord(NamedTuple):
    key: bytes
    value: bytes
    timestamp_ms: int
    headers: list[tuple[str, bytes]]
    seqs: list[int]  # the spool seqs of its events, in order


def kafka_records(spool_id: bytes, events: Sequence[SpoolRecord]) -> Iterator[KafkaRecord]:
    """``events`` (one partition's, in spool order) as records, in order."""
    chunk: list[SpoolRecord] = []
    size = 0
    for event in events:
        if chunk and (len(chunk) >= RECORD_EVENTS or size + len(event.value) + 1 > RECORD_BYTES):
            yield _record(spool_id, chunk)
            chunk, size = [], 0
        chunk.append(event)
        size += len(event.value) + 1
    if chunk:
        yield _record(spool_id, chunk)


def _record(spool_id: bytes, chunk: list[SpoolRecord]) -> KafkaRecord:
    first = chunk[0]
    if len(chunk) == 1:
        headers = delivery_headers(spool_id, first.seq)
        # The trace context of a sampled request, read off the event's end (no
        # parse). A batch has none: each event carries its own, which the
        # worker links from the event.
        traceparent = traceparent_of(first.value)
        if traceparent is not None:
            headers.append((TRACEPARENT_HEADER, traceparent))
        return KafkaRecord(first.key, first.value, first.timestamp_ms, headers, [first.seq])
    seqs = [event.seq for event in chunk]
    headers = [*batch_delivery_headers(spool_id, seqs), (CONTENT_TYPE_HEADER, BATCH_CONTENT_TYPE)]
    return KafkaRecord(first.key, encode_batch([event.value for event in chunk]), first.timestamp_ms, headers, seqs)
