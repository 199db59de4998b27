"""Usage event schema v1: one CloudEvents 1.0 JSON envelope per request.

Readers accept any ``quotameter.request.vN`` and ignore fields they do not
know, so a v2 that only adds fields never breaks a v1 reader.
"""

from __future__ import annotations

import os
import re
import time as _time
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from json.encoder import encode_basestring as _json_str  # the C encoder where available
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, field_validator

from quotameter.errors import EventError
from quotameter.labels import MAX_ID_CHARS, MAX_TAGS, id_problem, tag_problem

EVENT_TYPE_V1 = "quotameter.request.v1"
# W3C trace context, version 00: 00-<trace id>-<parent span id>-<flags>
TRACEPARENT_PATTERN = r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
_TRACEPARENT_RE = re.compile(TRACEPARENT_PATTERN)
_TRACEPARENT_CHARS = 55
_TRACEPARENT_KEY = b',"traceparent":"'
_EVENT_TYPE_RE = re.compile(r"^quotameter\.request\.v[1-9][0-9]*$")


# The times an event may carry: from the Unix epoch (times travel as Unix
# milliseconds) to the end of what the ledger's DateTime64 holds. Outside them a
# ledger would read a year of three digits as another time or refuse the whole
# batch holding it, so such an event is refused where it enters.
EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=UTC)
END_OF_TIME = datetime(2300, 1, 1, tzinfo=UTC)


class Decision(StrEnum):
    ADMITTED = "admitted"
    REFUSED = "refused"


# Why a request was refused, or admitted in a degraded way (RequestData.reason):
#   refused: rate_limit_requests, rate_limit_tokens, concurrency, quota_tokens,
#            quota_budget, model_not_allowed, queue_full, queue_timeout,
#            redis_unavailable (a fail-closed limit while Redis is away),
#            user_rate_limit_requests, user_rate_limit_tokens, user_quota_tokens
#            (an end user's per_user limits), user_required, user_too_long
#   admitted: fallback (model_served is the tier's cheaper model), queued
#            (waited queued_ms), budget_cut (output cut to what the budget
#            allowed), fail_open (admitted by the in-process limiter)


class UsageSource(StrEnum):
    UPSTREAM = "upstream"  # the upstream reported usage (JSON body or last SSE chunk)
    COUNTED = "counted"  # the shim counted tokens itself (stream cut, usage missing)
    NONE = "none"  # nothing to count (refused, upstream down)


class RequestData(BaseModel):
    """What one request did. Token counts are integers; never the API key itself."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    api_key_id: str
    tier: str
    route: str
    status: int
    decision: Decision
    reason: str | None = None
    model_requested: str | None = None
    model_served: str | None = None
    upstream: str | None = None
    input_tokens: NonNegativeInt = 0
    output_tokens: NonNegativeInt = 0
    # cached and cache-write tokens are part of input_tokens, reasoning tokens
    # part of output_tokens, as OpenAI-compatible servers report them.
    cached_tokens: NonNegativeInt = 0
    cache_write_tokens: NonNegativeInt = 0
    reasoning_tokens: NonNegativeInt = 0
    usage_source: UsageSource = UsageSource.NONE
    streamed: bool = False
    latency_ms: float = Field(default=0.0, ge=0)
    ttft_ms: float | None = Field(default=None, ge=0)
    request_bytes: NonNegativeInt = 0
    response_bytes: NonNegativeInt = 0
    upstream_cost_usd: Decimal | None = None
    queued_ms: float | None = Field(default=None, ge=0)  # time waited in the batch queue
    # Who the spend is for (quotameter/labels.py bounds them). Added to v1 as
    # optional fields: a reader that does not know them ignores them.
    end_user: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS)
    project: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS)
    tags: dict[str, str] | None = Field(default=None, max_length=MAX_TAGS)  # sorted by key when the shim writes them

    @field_validator("end_user", "project")
    @classmethod
    def _plain_id(cls, value: str | None) -> str | None:
        if value is not None and (problem := id_problem(value)):
            raise ValueError(problem)
        return value

    @field_validator("tags")
    @classmethod
    def _bounded_tags(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_TAGS:
            raise ValueError(f"at most {MAX_TAGS} tags")
        for key, text in value.items():
            if problem := tag_problem(key, text):
                raise ValueError(problem)
        return value or None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class UsageEvent(BaseModel):
    """The CloudEvents envelope. ``id`` is the idempotency key; ``subject`` the customer."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(min_length=1, max_length=128)
    source: str = Field(min_length=1)
    type: str = EVENT_TYPE_V1
    subject: str = Field(min_length=1)
    time: datetime
    datacontenttype: Literal["application/json"] = "application/json"
    data: RequestData
    # CloudEvents' distributed-tracing extension: the W3C trace context of the
    # request, only when its trace was sampled. Last, so that a reader finds
    # it at the end of the encoded event without parsing it (traceparent_of).
    traceparent: str | None = None

    @field_validator("traceparent", mode="before")
    @classmethod
    def _trace_context(cls, value: object) -> str | None:
        # A malformed one is dropped, never a reason to refuse usage (it is not billing data).
        return value if isinstance(value, str) and _TRACEPARENT_RE.fullmatch(value) else None

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if not _EVENT_TYPE_RE.match(value):
            raise ValueError(f"not a quotameter request event type: {value!r}")
        return value

    @field_validator("time")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("time must carry a time zone (RFC 3339)")
        value = value.astimezone(UTC)
        if not EARLIEST_TIME <= value < END_OF_TIME:
            raise ValueError(f"time must be from {EARLIEST_TIME:%Y-%m-%d} to {END_OF_TIME.year - 1}-12-31 (UTC)")
        return value

    @property
    def customer_id(self) -> str:
        return self.subject

    @property
    def time_ms(self) -> int:
        return int(self.time.timestamp() * 1000)


# Random bits for event ids, drawn from os.urandom in blocks (one syscall per
# _RANDOM_BLOCK ids instead of one each); a forked child starts a block of its own.
_RANDOM_BLOCK = 512
_random = {"pool": b"", "at": 0}
os.register_at_fork(after_in_child=lambda: _random.update(pool=b"", at=0))


def new_event_id() -> str:
    """A unique, time-ordered id (UUIDv7 layout) so ledgers sort by it cheaply:
    48 bits of Unix milliseconds, version 7, variant 0b10, 74 random bits."""
    ms = _time.time_ns() // 1_000_000
    at = _random["at"]
    pool = _random["pool"]
    if at + 10 > len(pool):
        pool, at = os.urandom(10 * _RANDOM_BLOCK), 0
        _random["pool"] = pool
    _random["at"] = at + 10
    rand = int.from_bytes(pool[at : at + 10]) & ((1 << 74) - 1)
    value = (ms << 80) | (0x7 << 76) | ((rand >> 62) << 64) | (0b10 << 62) | (rand & ((1 << 62) - 1))
    text = "%032x" % value
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def encode_event(event: UsageEvent) -> bytes:
    return event.model_dump_json(exclude_none=True).encode()


class EncodedEvent(NamedTuple):
    """An event already encoded (``value``), with what the spool and Kafka need beside it."""

    id: str
    customer_id: str
    time_ms: int
    value: bytes


def encode_request_event(
    id: str,
    source: str,
    subject: str,
    time: datetime,
    *,
    api_key_id: str,
    tier: str,
    route: str,
    status: int,
    decision: Decision,
    reason: str | None = None,
    model_requested: str | None = None,
    model_served: str | None = None,
    upstream: str | None = None,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cached_tokens: int = 0,
    cache_write_tokens: int = 0,
    reasoning_tokens: int = 0,
    usage_source: UsageSource = UsageSource.NONE,
    streamed: bool = False,
    latency_ms: float = 0.0,
    ttft_ms: float | None = None,
    request_bytes: int = 0,
    response_bytes: int = 0,
    upstream_cost_usd: Decimal | None = None,
    queued_ms: float | None = None,
    end_user: str | None = None,
    project: str | None = None,
    tags: tuple[tuple[str, str], ...] = (),
    traceparent: str | None = None,
) -> EncodedEvent:
    """The event ``UsageEvent(..., data=RequestData(...))`` encoded: the same
    bytes as ``encode_event`` of that model, without building it (the shim's
    hot path). Values the direct encoding does not cover exactly (or that the
    model would refuse) go through the model, which validates them as always."""
    if (
        type(id) is str and 0 < len(id) <= 128 and type(source) is str and source != ""
        and type(subject) is str and subject != "" and type(time) is datetime and time.tzinfo is UTC
        and type(api_key_id) is str and type(tier) is str and type(route) is str and type(status) is int
        and type(decision) is Decision and type(usage_source) is UsageSource and type(streamed) is bool
        and type(input_tokens) is int and input_tokens >= 0 and type(output_tokens) is int and output_tokens >= 0
        and type(cached_tokens) is int and cached_tokens >= 0
        and type(cache_write_tokens) is int and cache_write_tokens >= 0
        and type(reasoning_tokens) is int and reasoning_tokens >= 0
        and type(request_bytes) is int and request_bytes >= 0 and type(response_bytes) is int and response_bytes >= 0
        and (reason is None or type(reason) is str) and (model_requested is None or type(model_requested) is str)
        and (model_served is None or type(model_served) is str) and (upstream is None or type(upstream) is str)
        and _plain_float(latency_ms) and (ttft_ms is None or _plain_float(ttft_ms))
        and (queued_ms is None or _plain_float(queued_ms)) and upstream_cost_usd is None
        and (end_user is None and project is None and tags == () or _valid_labels(end_user, project, tags))
        and (traceparent is None or (type(traceparent) is str and _TRACEPARENT_RE.fullmatch(traceparent) is not None))
    ):
        stamp = time.isoformat()
        if stamp.endswith("+00:00"):
            stamp = stamp[:-6] + "Z"
        optional = ""
        if reason is not None:
            optional += ',"reason":' + _json_str(reason)
        if model_requested is not None:
            optional += ',"model_requested":' + _json_str(model_requested)
        if model_served is not None:
            optional += ',"model_served":' + _json_str(model_served)
        if upstream is not None:
            optional += ',"upstream":' + _json_str(upstream)
        ttft = "" if ttft_ms is None else ',"ttft_ms":' + repr(ttft_ms)
        queued = "" if queued_ms is None else ',"queued_ms":' + repr(queued_ms)
        if end_user is not None:
            queued += ',"end_user":' + _json_str(end_user)
        if project is not None:
            queued += ',"project":' + _json_str(project)
        if tags:
            queued += ',"tags":{' + ",".join(_json_str(k) + ":" + _json_str(v) for k, v in tags) + "}"
        traced = "" if traceparent is None else ',"traceparent":"' + traceparent + '"'
        text = (
            f'{{"specversion":"1.0","id":{_json_str(id)},"source":{_json_str(source)},'
            f'"type":"{EVENT_TYPE_V1}","subject":{_json_str(subject)},"time":"{stamp}",'
            f'"datacontenttype":"application/json","data":{{"api_key_id":{_json_str(api_key_id)},'
            f'"tier":{_json_str(tier)},"route":{_json_str(route)},"status":{status},'
            f'"decision":"{decision.value}"{optional},"input_tokens":{input_tokens},'
            f'"output_tokens":{output_tokens},"cached_tokens":{cached_tokens},'
            f'"cache_write_tokens":{cache_write_tokens},"reasoning_tokens":{reasoning_tokens},'
            f'"usage_source":"{usage_source.value}","streamed":{"true" if streamed else "false"},'
            f'"latency_ms":{latency_ms!r}{ttft},"request_bytes":{request_bytes},'
            f'"response_bytes":{response_bytes}{queued}}}{traced}}}'
        )
        try:
            value = text.encode()
        except UnicodeEncodeError:  # a lone surrogate: the model's encoder decides
            pass
        else:
            return EncodedEvent(id, subject, int(time.timestamp() * 1000), value)
    event = UsageEvent(
        id=id, source=source, subject=subject, time=time,
        data=RequestData(
            api_key_id=api_key_id, tier=tier, route=route, status=status, decision=decision, reason=reason,
            model_requested=model_requested, model_served=model_served, upstream=upstream,
            input_tokens=input_tokens, output_tokens=output_tokens, cached_tokens=cached_tokens,
            cache_write_tokens=cache_write_tokens, reasoning_tokens=reasoning_tokens, usage_source=usage_source,
            streamed=streamed, latency_ms=latency_ms, ttft_ms=ttft_ms, request_bytes=request_bytes,
            response_bytes=response_bytes, upstream_cost_usd=upstream_cost_usd, queued_ms=queued_ms,
            end_user=end_user, project=project, tags=dict(tags) or None,
        ),
        traceparent=traceparent,
    )
    return EncodedEvent(event.id, event.customer_id, event.time_ms, encode_event(event))


def traceparent_of(value: bytes) -> bytes | None:
    """The ``traceparent`` of an encoded event, read from its end (where both
    encoders put it) without parsing it; None when it has none."""
    if value[-2:] != b'"}':
        return None  # an event without one ends with its data object: }}
    start = len(value) - 2 - _TRACEPARENT_CHARS
    if value[start - len(_TRACEPARENT_KEY):start] != _TRACEPARENT_KEY:
        return None
    return value[start:-2]


def _valid_labels(end_user: object, project: object, tags: object) -> bool:
    """Attribution the model would take as it is: else the model decides (and refuses)."""
    if not (end_user is None or (type(end_user) is str and id_problem(end_user) is None)):
        return False
    if not (project is None or (type(project) is str and id_problem(project) is None)):
        return False
    if type(tags) is not tuple or len(tags) > MAX_TAGS:
        return False
    keys = [pair[0] for pair in tags if type(pair) is tuple and len(pair) == 2]
    return (len(keys) == len(tags) and len(set(keys)) == len(keys)
            and all(type(k) is str and type(v) is str and tag_problem(k, v) is None for k, v in tags))


def _plain_float(value: object) -> bool:
    """A float that repr() writes as pydantic does (no exponent, not negative)."""
    return type(value) is float and (1e-4 <= value < 1e15 or (value == 0.0 and repr(value) == "0.0"))


def decode_event(raw: bytes | str) -> UsageEvent:
    """Parse one event, or raise EventError naming the bad fields."""
    try:
        return UsageEvent.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<event>'}: {err['msg']}" for err in exc.errors()
        )
        raise EventError(f"malformed usage event: {problems}") from None
