"""The worker's spans: one CONSUMER span per batch, linked to the requests
whose events it carries, with a child span per stage.

    process {topic}            CONSUMER; messaging.system=kafka,
      │                        messaging.destination.name, messaging.operation.*,
      │                        messaging.consumer.group.name,
      │                        messaging.batch.message_count; a link to each
      │                        sampled request context in the batch
      ├─ quotameter.redis_write
      └─ quotameter.ledger_insert   parent: the oldest batch whose rows it
                                    writes (rows of several batches share one
                                    INSERT, often after their spans ended); a
                                    link to each other batch

A batch is not a child of any request: it carries many, so each request is a
*link* (OpenTelemetry's messaging conventions for batch receivers). A request's
context is the Kafka record header ``traceparent``, else the CloudEvent's
``traceparent`` attribute. At most MAX_LINKS links per span (the SDK's
default span link limit too); past it the contexts are not even parsed, and
``quotameter.trace_links.dropped`` counts the records whose ``traceparent``
header was left unlinked.

Without a tracer provider (no OTLP endpoint) no span is started at all
(the API's no-op spans still cost a context switch each, about as much as
the batch's metrics), and the links are not even looked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanContext, SpanKind

from telemetry.context import TRACEPARENT_HEADER, span_context_of

MAX_LINKS = 128
DROPPED = "quotameter.trace_links.dropped"

_tracer = trace.get_tracer("quotameter.worker")


def _traced() -> bool:
    """Whether a tracer provider is set (telemetry.setup sets one only for an OTLP endpoint)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


@contextmanager
def batch_span(topic: str, group: str) -> Iterator[Span]:
    if not _traced():
        yield trace.INVALID_SPAN
        return
    attributes = {
        "messaging.system": "kafka",
        "messaging.destination.name": topic,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.consumer.group.name": group,
    }
    with _tracer.start_as_current_span(f"process {topic}", kind=SpanKind.CONSUMER, attributes=attributes) as span:
        yield span


def stage_span(name: str) -> Any:
    """A child of the current span for one stage of the batch."""
    return _tracer.start_as_current_span(name) if _traced() else nullcontext()


def _header(message: Any) -> bytes | str | None:
    headers = getattr(message, "headers", None)
    if not headers:
        return None
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    for name, value in pairs:
        if name == TRACEPARENT_HEADER:
            return value
    return None


def link_requests(span: Span, events: Sequence[Any], cloudevents: Iterable[Any]) -> None:
    """Link ``span`` to the sampled request of each record of ``events``
    (Kafka header), then of each decoded event of ``cloudevents`` (CloudEvent
    attribute) not already linked."""
    if not span.is_recording():
        return
    span.set_attribute("messaging.batch.message_count", len(events))
    seen: set[tuple[int, int]] = set()
    dropped = 0

    def add(traceparent: bytes | str | None) -> None:
        nonlocal dropped
        if len(seen) >= MAX_LINKS:
            dropped += traceparent is not None  # past the cap: counted, not parsed
            return
        context = span_context_of(traceparent)  # None when missing or malformed
        if context is not None and context.trace_flags.sampled and (context.trace_id, context.span_id) not in seen:
            seen.add((context.trace_id, context.span_id))
            span.add_link(context)

    for event in events:
        add(_header(event.message))
    if len(seen) < MAX_LINKS:
        for cloudevent in cloudevents:
            add(getattr(cloudevent, TRACEPARENT_HEADER, None))
    if dropped:
        span.set_attribute(DROPPED, dropped)


def current_context() -> SpanContext | None:
    """The current span's context if it is recorded (for a later span's parent or link)."""
    span = trace.get_current_span()
    return span.get_span_context() if span.is_recording() else None


def insert_span(batches: Sequence[SpanContext]) -> Any:
    """``quotameter.ledger_insert`` under the oldest of ``batches``, linked to the others."""
    if not _traced():
        return nullcontext()
    if not batches:
        return _tracer.start_as_current_span("quotameter.ledger_insert")
    parent = trace.set_span_in_context(trace.NonRecordingSpan(batches[0]))
    links = [trace.Link(context) for context in batches[1 : 1 + MAX_LINKS]]
    return _tracer.start_as_current_span("quotameter.ledger_insert", context=parent, links=links)
