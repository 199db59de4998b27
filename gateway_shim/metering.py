"""What one request did, gathered while it runs, then turned into its event."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from gateway_shim.attribution import NO_ATTRIBUTION, Attribution
from gateway_shim.errors import Refusal, ShimError
from gateway_shim.keystore import KeyRecord
from gateway_shim.usage import NO_USAGE, Usage
from quotameter.events import Decision, EncodedEvent, encode_request_event, new_event_id


@dataclass(slots=True)
class RequestMeter:
    route: str
    upstream: str | None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    status: int = 200
    decision: Decision = Decision.ADMITTED
    reason: str | None = None
    model_requested: str | None = None
    model_served: str | None = None
    usage: Usage = NO_USAGE
    streamed: bool = False
    request_bytes: int = 0
    response_bytes: int = 0
    queued_ms: float | None = None
    cost_micro_usd: int | None = None  # at the shim's prices, once the settle priced it
    attribution: Attribution = NO_ATTRIBUTION
    event_id: str = field(default_factory=new_event_id)  # also the reservation's id
    _t0: float = field(default_factory=time.perf_counter)
    _first_byte_s: float | None = None

    def refused(self, exc: ShimError) -> None:
        """The request ends with ``exc``'s answer: its status, and the refusal's reason."""
        self.status = exc.status
        if isinstance(exc, Refusal):
            self.decision, self.reason = Decision.REFUSED, exc.reason
        self.reason = self.reason or exc.code

    def first_byte(self) -> None:
        """The first body byte went to the client (time to first token, for streams)."""
        if self._first_byte_s is None:
            self._first_byte_s = time.perf_counter() - self._t0

    def encoded_event(self, source: str, key: KeyRecord, traceparent: str | None = None) -> EncodedEvent:
        """This request's usage event, encoded directly (the bytes ``encode_event`` would give; no model built)."""
        latency_ms = (time.perf_counter() - self._t0) * 1000
        usage, attribution = self.usage, self.attribution
        return encode_request_event(
            self.event_id,
            source,
            key.customer,
            self.started_at,
            api_key_id=key.key_id,  # never the key itself
            tier=key.tier,
            route=self.route,
            status=self.status,
            decision=self.decision,
            reason=self.reason,
            model_requested=self.model_requested,
            model_served=self.model_served,
            upstream=self.upstream,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_tokens=usage.cached_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            usage_source=usage.source,
            streamed=self.streamed,
            latency_ms=round(latency_ms, 3),
            ttft_ms=None if self._first_byte_s is None else round(self._first_byte_s * 1000, 3),
            request_bytes=self.request_bytes,
            response_bytes=self.response_bytes,
            queued_ms=None if self.queued_ms is None else round(self.queued_ms, 3),
            end_user=attribution.end_user,
            project=key.project or attribution.project,  # a key's own project wins over a header
            tags=attribution.tags,
            traceparent=traceparent,  # a sampled request's trace context, for the worker's spans
        )
