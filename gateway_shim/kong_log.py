"""Kong Gateway's http-log entries read as usage events (no I/O).

Kong's http-log plugin POSTs one JSON object per request, or a JSON array when
its queue batches (``queue.max_batch_size`` > 1), in the format of Kong's log
serializer (``kong.log.serialize``). With the AI plugins (ai-proxy,
ai-proxy-advanced) and their ``logging.log_statistics`` on, an entry carries
``ai.proxy.usage`` (token counts, cost) and ``ai.proxy.meta`` (models, provider).

Fields followed are those of Kong Gateway 3.8+ as documented in "HTTP Log"
(plugin reference), "kong.log" (PDK reference, ``serialize``) and "AI Gateway
audit log reference". That reference's example spells the counts
``prompt_token`` / ``completion_token`` while Kong's own serializer
(kong/llm/plugin/shared-filters/serialize-analytics.lua) writes
``prompt_tokens`` / ``completion_tokens``: both are read, the plural first.

Mapping (one usage event per entry with AI usage; the others are skipped):
  subject        the customer: ``consumer.username`` or ``consumer.custom_id``, or the
                 ``x-quotameter-customer`` request header a /v1/check admission set
                 (``shim.kong_customer_from``)
  id             header mode: the check's ``x-quotameter-event-id`` request header, so
                 the report settles that reservation; else, and in the consumer modes
                 always, a UUID derived from Kong's request id (``request.id``, else the
                 ``x-kong-request-id`` header), so Kong's retries are billed once
  time           ``started_at`` (Unix ms)
  model_*        ``ai.proxy.meta.request_model`` / ``response_model``
  input/output   ``ai.proxy.usage.prompt_tokens`` / ``completion_tokens``
  upstream       ``ai.proxy.meta.provider_name``
  upstream_cost_usd  ``ai.proxy.usage.cost`` when not zero (priced by Kong's own
                 model.options input_cost / output_cost, kept beside quotameter's)
  status, latency_ms, route, bytes   ``response.status``, ``latencies.request``,
                 the path of ``request.uri``, ``request.size`` / ``response.size``

In the consumer modes the ``x-quotameter-*`` request headers are ignored: a
client could send them, and an event id of its choosing would let it merge its
requests into one. In header mode Kong must set them from the check's answer
(replacing whatever the client sent).

Like a CloudEvents batch, a body is taken whole or not at all: one bad entry
refuses the request, naming ``entries[i].<field>``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from gateway_shim.errors import InvalidEvents, MalformedRequest, PayloadTooLarge, UnsupportedMediaType
from quotameter.events import Decision, EncodedEvent, RequestData, UsageEvent, UsageSource, encode_event

JSON = "application/json"  # the only content type http-log sends
SOURCE = "kong"
CUSTOMER_HEADER = "x-quotameter-customer"
EVENT_ID_HEADER = "x-quotameter-event-id"
TIER_HEADER = "x-quotameter-tier"
REQUEST_ID_HEADER = "x-kong-request-id"
# Event ids derived from Kong's request ids: the same request id gives the same event id.
_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:quotameter:kong-request-id")
_SHOWN_PROBLEMS = 10


class CustomerFrom(StrEnum):  # shim.kong_customer_from
    CONSUMER_USERNAME = "consumer_username"
    CONSUMER_CUSTOM_ID = "consumer_custom_id"
    HEADER = "header"  # x-quotameter-customer, set by Kong from a /v1/check admission


@dataclass(frozen=True, slots=True)
class KongSettings:
    customer_from: CustomerFrom
    tier: str  # recorded when no check admission named one (header mode's x-quotameter-tier)


@dataclass(frozen=True, slots=True)
class KongBatch:
    events: list[EncodedEvent]
    skipped: int  # entries without AI usage (routes that are not LLM calls)


class _Bad(Exception):
    """One entry's problem: the field (relative to the entry) and what is wrong."""

    def __init__(self, field: str, what: str) -> None:
        super().__init__(what)
        self.field = field
        self.what = what


def parse_kong_log(content_type: str, raw: bytes, max_entries: int, settings: KongSettings) -> KongBatch:
    """The body's entries with AI usage as encoded usage events, in order; or the
    ShimError to answer. ``content_type`` is the media type alone, lower case."""
    if content_type != JSON:
        raise UnsupportedMediaType(
            f"POST /v1/events/kong takes Kong's http-log entries as Content-Type {JSON}, "
            f"not {content_type or 'none'!r}."
        )
    try:
        # Decimals, not floats: Kong's cost is money and stays exact.
        body = json.loads(raw, parse_float=Decimal)
    except (ValueError, RecursionError):  # also UnicodeDecodeError; RecursionError: nested too deep
        raise MalformedRequest("We could not parse the JSON body of your request.") from None
    entries = body if isinstance(body, list) else [body]
    if len(entries) > max_entries:
        raise PayloadTooLarge(
            f"The batch has {len(entries)} entries; at most {max_entries} are taken per request "
            "(shim.ingest_max_events). Lower the http-log plugin's queue.max_batch_size."
        )
    events: list[EncodedEvent] = []
    skipped = 0
    problems: list[tuple[str, str]] = []
    for index, entry in enumerate(entries):
        place = f"entries[{index}]"
        try:
            event = entry_event(entry, settings)
        except _Bad as bad:
            problems.append((f"{place}.{bad.field}" if bad.field else place, bad.what))
            continue
        if event is None:
            skipped += 1
        else:
            events.append(event)
    if problems:
        shown = "; ".join(f"{where}: {what}" for where, what in problems[:_SHOWN_PROBLEMS])
        more = len(problems) - _SHOWN_PROBLEMS
        raise InvalidEvents(
            f"{shown}{f' (and {more} more)' if more > 0 else ''}; none of the request was taken.",
            param=problems[0][0],
        )
    return KongBatch(events, skipped)


def entry_event(entry: Any, settings: KongSettings) -> EncodedEvent | None:
    """One entry as an encoded usage event; None without AI usage; _Bad if malformed."""
    if not isinstance(entry, dict):
        raise _Bad("", "must be a JSON object (one http-log entry)")
    usage, meta = _ai_proxy(entry)
    if usage is None:
        return None
    input_tokens = _tokens(usage, "prompt_tokens", "prompt_token")
    output_tokens = _tokens(usage, "completion_tokens", "completion_token")
    if input_tokens is None and output_tokens is None:
        return None  # the AI plugin saw no usage (e.g. the provider failed): nothing to bill
    request = _object(entry, "request")
    response = _object(entry, "response")
    headers = _headers(request)
    customer, event_id, tier = _who(entry, request, headers, settings)
    try:
        event = UsageEvent(
            id=event_id,
            source=SOURCE,
            subject=customer,
            time=_started_at(entry),
            data=RequestData(
                api_key_id=_credential(entry),
                tier=tier,
                route=_route(request),
                status=_int(response, "status", "response.status"),
                decision=Decision.ADMITTED,  # Kong served it: refusals carry no usage
                model_requested=_model(meta, "request_model"),
                model_served=_model(meta, "response_model"),
                upstream=_optional_str(meta, "provider_name", "ai.proxy.meta.provider_name"),
                input_tokens=input_tokens or 0,
                output_tokens=output_tokens or 0,
                usage_source=UsageSource.UPSTREAM,
                streamed=_streamed(response),
                latency_ms=_latency_ms(entry),
                request_bytes=_size(request, "request.size"),
                response_bytes=_size(response, "response.size"),
                upstream_cost_usd=_cost(usage),
            ),
        )
    except ValidationError as exc:  # a value Kong's fields passed but the schema refuses
        error = exc.errors()[0]
        raise _Bad(".".join(str(part) for part in error["loc"]), error["msg"]) from None
    try:
        value = encode_event(event)
    except PydanticSerializationError as exc:  # e.g. a lone surrogate in a string
        raise _Bad("", f"cannot be encoded as UTF-8 JSON ({exc})") from None
    return EncodedEvent(event.id, event.customer_id, event.time_ms, value)


def _ai_proxy(entry: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """``ai.proxy.usage`` and ``ai.proxy.meta``: the usage of the request the client
    made. Other AI plugins' sections (prompt transformers, semantic cache) are calls
    Kong makes for the operator, not the customer's, and are not billed here."""
    ai = entry.get("ai")
    if ai is None:
        return None, {}
    if not isinstance(ai, dict):
        raise _Bad("ai", "must be an object")
    proxy = ai.get("proxy")
    if proxy is None:
        return None, {}
    if not isinstance(proxy, dict):
        raise _Bad("ai.proxy", "must be an object")
    usage, meta = proxy.get("usage"), proxy.get("meta")
    if usage is not None and not isinstance(usage, dict):
        raise _Bad("ai.proxy.usage", "must be an object")
    if meta is not None and not isinstance(meta, dict):
        raise _Bad("ai.proxy.meta", "must be an object")
    return usage, meta or {}


def _tokens(usage: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = usage.get(name)
        if value is None:
            continue
        if type(value) is not int or value < 0:
            raise _Bad(f"ai.proxy.usage.{name}", f"must be a non-negative integer, not {value!r}")
        return value
    return None


def _cost(usage: dict[str, Any]) -> Decimal | None:
    value = usage.get("cost")
    if value is None or value == 0:  # Kong logs 0 when the route sets no input_cost / output_cost
        return None
    if type(value) not in (int, Decimal) or value < 0:
        raise _Bad("ai.proxy.usage.cost", f"must be a non-negative number, not {value!r}")
    return Decimal(value)


def _model(meta: dict[str, Any], name: str) -> str | None:
    value = _optional_str(meta, name, f"ai.proxy.meta.{name}")
    return None if value in (None, "", "UNSPECIFIED") else value  # Kong's placeholder for no model


def _who(
    entry: dict[str, Any], request: dict[str, Any], headers: dict[str, Any], settings: KongSettings
) -> tuple[str, str, str]:
    """(customer, event id, tier) as ``settings`` says to read them."""
    if settings.customer_from is CustomerFrom.HEADER:
        customer = _header(headers, CUSTOMER_HEADER)
        if not customer:
            raise _Bad(
                f"request.headers.{CUSTOMER_HEADER}",
                "is missing: with shim.kong_customer_from: header, Kong must pass the /v1/check "
                "admission's x-quotameter-customer upstream on every metered route",
            )
        event_id = _header(headers, EVENT_ID_HEADER) or _derived_id(entry, request, headers)
        if len(event_id) > 128:  # the schema's bound on ids; a check's are 36 characters
            raise _Bad(f"request.headers.{EVENT_ID_HEADER}", "is longer than 128 characters: not a check's event id")
        return customer, event_id, _header(headers, TIER_HEADER) or settings.tier
    consumer = entry.get("consumer")
    field = "username" if settings.customer_from is CustomerFrom.CONSUMER_USERNAME else "custom_id"
    if consumer is None:
        raise _Bad("consumer", "is missing: the route needs an authentication plugin that identifies a consumer")
    if not isinstance(consumer, dict):
        raise _Bad("consumer", "must be an object")
    customer = consumer.get(field)
    if not isinstance(customer, str) or not customer:
        raise _Bad(f"consumer.{field}", f"must be a non-empty string (shim.kong_customer_from: {settings.customer_from})")
    return customer, _derived_id(entry, request, headers), settings.tier


def _derived_id(entry: dict[str, Any], request: dict[str, Any], headers: dict[str, Any]) -> str:
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _Bad("request.id", "must be a string")
    if not request_id:
        response = entry.get("response")
        response_headers = response.get("headers") if isinstance(response, dict) else None
        request_id = (
            _header(response_headers, REQUEST_ID_HEADER, "response.headers") or _header(headers, REQUEST_ID_HEADER)
        )
    if not request_id:
        raise _Bad(
            "request.id",
            "is missing, and no x-kong-request-id header either: without Kong's request id a "
            "retried delivery could be billed twice",
        )
    return str(uuid.uuid5(_ID_NAMESPACE, request_id))


def _credential(entry: dict[str, Any]) -> str:
    """The credential Kong authenticated (never its secret), else the consumer's id."""
    for field in ("authenticated_entity", "consumer"):
        value = entry.get(field)
        if isinstance(value, dict) and isinstance(value.get("id"), str):
            return value["id"]
    return ""


def _route(request: dict[str, Any]) -> str:
    uri = request.get("uri")
    if not isinstance(uri, str) or not uri:
        raise _Bad("request.uri", "must be a non-empty string")
    return uri.split("?", 1)[0]


def _started_at(entry: dict[str, Any]) -> datetime:
    value = entry.get("started_at")
    if type(value) not in (int, Decimal) or value <= 0:  # Lua numbers are floats: 1.7e12 is fine
        raise _Bad("started_at", f"must be the request's start in Unix milliseconds, not {value!r}")
    try:
        return datetime.fromtimestamp(int(value) / 1000, UTC)
    except (OverflowError, ValueError, OSError):
        raise _Bad("started_at", f"is out of range: {value!r}") from None


def _latency_ms(entry: dict[str, Any]) -> float:
    latencies = entry.get("latencies")
    value = latencies.get("request") if isinstance(latencies, dict) else None
    if value is None:
        return 0.0
    if type(value) not in (int, Decimal) or value < 0:
        raise _Bad("latencies.request", f"must be a non-negative number of milliseconds, not {value!r}")
    return float(value)


def _streamed(response: dict[str, Any]) -> bool:
    content_type = _header(response.get("headers"), "content-type", "response.headers") or ""
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


def _size(part: dict[str, Any], field: str) -> int:
    value = part.get("size")
    if value is None:
        return 0
    if type(value) is str and value.isdigit():  # older serializers wrote sizes as strings
        return int(value)
    if type(value) is not int or value < 0:
        raise _Bad(field, f"must be a non-negative integer, not {value!r}")
    return value


def _object(entry: dict[str, Any], field: str) -> dict[str, Any]:
    value = entry.get(field)
    if not isinstance(value, dict):
        raise _Bad(field, "must be an object")
    return value


def _int(part: dict[str, Any], name: str, field: str) -> int:
    value = part.get(name)
    if type(value) is not int:
        raise _Bad(field, f"must be an integer, not {value!r}")
    return value


def _optional_str(part: dict[str, Any], name: str, field: str) -> str | None:
    value = part.get(name)
    if value is not None and not isinstance(value, str):
        raise _Bad(field, f"must be a string, not {value!r}")
    return value


def _headers(request: dict[str, Any]) -> dict[str, Any]:
    headers = request.get("headers")
    if headers is None:
        return {}
    if not isinstance(headers, dict):
        raise _Bad("request.headers", "must be an object")
    return headers


def _header(headers: Mapping[str, Any] | None, name: str, where: str = "request.headers") -> str | None:
    """A header's value. Kong writes names in lower case, and a repeated header as
    an array: one that differs is refused, as it cannot be told which is meant."""
    if not isinstance(headers, Mapping):
        return None
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if isinstance(k, str) and k.lower() == name), None)
    if isinstance(value, list):
        if not value or any(v != value[0] for v in value):
            raise _Bad(f"{where}.{name}", "was sent more than once with different values")
        value = value[0]
    if value is not None and not isinstance(value, str):
        raise _Bad(f"{where}.{name}", "must be a string")
    return value
