"""Reported usage events read from a CloudEvents HTTP body (no I/O).

Structured mode (``application/cloudevents+json``) carries one event, batched
mode (``application/cloudevents-batch+json``) a JSON array of them. Each must
be a ``quotameter.request.vN`` event as the topic carries it
(quotameter/events.py); fields the schema does not know are dropped, as every
reader ignores them.

A batch is taken whole or not at all: every event is validated and encoded
before any is spooled, so one bad event refuses the request and the ledger
gets none of it.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from gateway_shim.errors import InvalidEvents, MalformedRequest, PayloadTooLarge, UnsupportedMediaType
from quotameter.events import EncodedEvent, UsageEvent, encode_event

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
_SHOWN_PROBLEMS = 10  # a message names this many problems, then counts the rest


def parse_events(content_type: str, raw: bytes, max_events: int) -> list[EncodedEvent]:
    """The body's events, validated and encoded in order; or the ShimError to answer.

    ``content_type`` is the media type alone, lower case (no parameters)."""
    if content_type not in (STRUCTURED, BATCH):
        raise UnsupportedMediaType(
            f"POST /v1/events takes Content-Type {STRUCTURED} (one event) or {BATCH} "
            f"(a JSON array of events), not {content_type or 'none'!r}."
        )
    try:
        # Decimals, not floats: an upstream_cost_usd is money and stays exact.
        body = json.loads(raw, parse_float=Decimal)
    except (ValueError, RecursionError):  # also UnicodeDecodeError; RecursionError: nested too deep
        raise MalformedRequest("We could not parse the JSON body of your request.") from None
    if content_type == BATCH:
        if not isinstance(body, list):
            raise MalformedRequest(f"A {BATCH} body must be a JSON array of events.")
        if len(body) > max_events:
            raise PayloadTooLarge(
                f"The batch has {len(body)} events; at most {max_events} are taken per request "
                "(shim.ingest_max_events). Send smaller batches."
            )
        items, places = body, [f"events[{n}]" for n in range(len(body))]
    else:
        items, places = [body], [""]
    events: list[EncodedEvent] = []
    problems: list[tuple[str, str]] = []  # (field, what is wrong)
    for item, place in zip(items, places, strict=True):
        encoded = _encode(item, place, problems)
        if encoded is not None:
            events.append(encoded)
    if problems:
        shown = "; ".join(f"{where}: {what}" for where, what in problems[:_SHOWN_PROBLEMS])
        more = len(problems) - _SHOWN_PROBLEMS
        nothing = "none of the batch was taken" if content_type == BATCH else "the event was not taken"
        raise InvalidEvents(
            f"{shown}{f' (and {more} more)' if more > 0 else ''}; {nothing}.", param=problems[0][0]
        )
    return events


def _encode(item: Any, place: str, problems: list[tuple[str, str]]) -> EncodedEvent | None:
    try:
        event = UsageEvent.model_validate(item)
    except ValidationError as exc:
        for error in exc.errors():
            problems.append((_field(place, error["loc"]), error["msg"]))
        return None
    try:
        value = encode_event(event)
    except PydanticSerializationError as exc:  # e.g. a lone surrogate in a string
        problems.append((place or "event", f"cannot be encoded as UTF-8 JSON ({exc})"))
        return None
    return EncodedEvent(event.id, event.customer_id, event.time_ms, value)


def _field(place: str, loc: tuple[int | str, ...]) -> str:
    """``events[2].data.input_tokens`` in a batch, ``data.input_tokens`` alone."""
    path = ".".join(str(part) for part in loc)
    if not place:
        return path or "event"
    return f"{place}.{path}" if path else place
