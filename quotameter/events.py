"""Usage event schema v1: one CloudEvents 1.0 JSON envelope per request.

Readers accept any ``quotameter.request.vN`` and ignore fields they do not
know, so a v2 that only adds fields never breaks a v1 reader.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, field_validator

from quotameter.errors import EventError

EVENT_TYPE_V1 = "quotameter.request.v1"
_EVENT_TYPE_RE = re.compile(r"^quotameter\.request\.v[1-9][0-9]*$")


class Decision(StrEnum):
    ADMITTED = "admitted"
    REFUSED = "refused"


# Why a request was refused, or admitted in a degraded way (RequestData.reason):
#   refused: rate_limit_requests, rate_limit_tokens, concurrency, quota_tokens,
#            quota_budget, model_not_allowed, queue_full, queue_timeout,
#            redis_unavailable (a fail-closed limit while Redis is away)
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
        return value.astimezone(UTC)

    @property
    def customer_id(self) -> str:
        return self.subject

    @property
    def time_ms(self) -> int:
        return int(self.time.timestamp() * 1000)


def new_event_id() -> str:
    """A unique, time-ordered id (UUIDv7 layout) so ledgers sort by it cheaply."""
    ms = int(datetime.now(UTC).timestamp() * 1000)
    rand = uuid.uuid4().int & ((1 << 74) - 1)
    value = (ms << 80) | (0x7 << 76) | ((rand >> 62) << 64) | (0b10 << 62) | (rand & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def encode_event(event: UsageEvent) -> bytes:
    return event.model_dump_json(exclude_none=True).encode()


def decode_event(raw: bytes | str) -> UsageEvent:
    """Parse one event, or raise EventError naming the bad fields."""
    try:
        return UsageEvent.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<event>'}: {err['msg']}" for err in exc.errors()
        )
        raise EventError(f"malformed usage event: {problems}") from None
