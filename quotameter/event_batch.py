"""Many usage events in one Kafka record: a CloudEvents JSON batch.

A record's value is either one envelope (``{...}``: old shims, other
producers) or ``application/cloudevents-batch+json``, a JSON array of the
same envelopes. Per-record costs on the way (the producer's framing, Faust's
per-message bookkeeping, the ack, the offset guard) dominated the worker's
time per event, so the shim sends one record per partition and turn of its
sender.

Where an event sits is (partition, offset, index): the record's place in
the partition and the event's place in the record. ``position`` folds the
two last into one increasing integer, which is what the windows' watermarks
compare.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import NamedTuple

from pydantic import TypeAdapter, ValidationError

from quotameter.errors import EventError
from quotameter.events import UsageEvent, decode_event

BATCH_CONTENT_TYPE = b"application/cloudevents-batch+json"
CONTENT_TYPE_HEADER = "content-type"  # the CloudEvents Kafka binding's name for it
INDEX_BITS = 16
MAX_BATCH_EVENTS = 1 << INDEX_BITS  # an index must fit below the offset in a position

_BATCH = TypeAdapter(list[UsageEvent])


class BadEvent(NamedTuple):
    """One element of a record that is no usage event: dead-lettered alone."""

    value: bytes
    reason: str


def position(offset: int, index: int) -> int:
    """One integer ordering events by (offset, index)."""
    return (offset << INDEX_BITS) | index


def encode_batch(values: Sequence[bytes]) -> bytes:
    """Encoded envelopes as one batch value (no re-encoding: the spool holds them encoded)."""
    return b"[" + b",".join(values) + b"]"


def is_batch(raw: bytes) -> bool:
    return raw.lstrip()[:1] == b"["


def decode_record(raw: bytes) -> list[UsageEvent | BadEvent]:
    """Every event a record carries, in order; an element that does not
    decode is a BadEvent in its place. Raises EventError when the record as a
    whole is unreadable (not JSON, not an envelope or a non-empty array)."""
    if not isinstance(raw, bytes | bytearray) or not is_batch(raw):
        return [decode_event(raw)]  # also refuses what is no bytes (a tombstone), as ever
    try:
        events: list[UsageEvent | BadEvent] = list(_BATCH.validate_json(raw))
    except ValidationError:
        events = _one_by_one(raw)  # rare: find which elements are bad
    if not events:
        raise EventError("malformed usage event batch: empty")
    if len(events) > MAX_BATCH_EVENTS:
        raise EventError(f"malformed usage event batch: more than {MAX_BATCH_EVENTS} events")
    return events


def _one_by_one(raw: bytes) -> list[UsageEvent | BadEvent]:
    try:
        elements = json.loads(raw)
    except ValueError as exc:
        raise EventError(f"malformed usage event batch: {exc}") from None
    if not isinstance(elements, list):
        raise EventError("malformed usage event batch: not a JSON array")
    out: list[UsageEvent | BadEvent] = []
    for element in elements:
        value = json.dumps(element, separators=(",", ":")).encode()
        try:
            out.append(decode_event(value))
        except EventError as exc:
            out.append(BadEvent(value, str(exc)))
    return out
