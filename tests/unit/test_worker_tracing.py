"""pipeline.tracing: which request contexts a batch span links, and the cap."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pipeline.tracing import DROPPED, MAX_LINKS, link_requests


def record(traceparent: str | None) -> Any:
    headers = [("other", b"x")] + ([("traceparent", traceparent.encode())] if traceparent else [])
    return SimpleNamespace(message=SimpleNamespace(headers=headers))


def context(n: int, flags: str = "01") -> str:
    return f"00-{n:032x}-{n:016x}-{flags}"


def linked(records: list[Any], cloudevents: list[Any]) -> Any:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("process events") as span:
        link_requests(span, records, cloudevents)
    [finished] = exporter.get_finished_spans()
    return finished


def test_sampled_contexts_are_linked_once_from_the_header_or_the_event() -> None:
    records = [record(context(1)), record(context(1)), record(context(2, "00")), record("garbage"), record(None)]
    cloudevents = [SimpleNamespace(traceparent=context(1)), SimpleNamespace(traceparent=context(3)), SimpleNamespace()]
    span = linked(records, cloudevents)
    assert [(link.context.trace_id, link.context.span_id) for link in span.links] == [(1, 1), (3, 3)]
    assert span.attributes["messaging.batch.message_count"] == 5
    assert DROPPED not in span.attributes


def test_links_stop_at_the_cap_and_the_rest_are_counted() -> None:
    span = linked([record(context(n)) for n in range(1, MAX_LINKS + 41)], [])
    assert len(span.links) == MAX_LINKS
    assert span.attributes[DROPPED] == 40


def test_without_a_recording_span_nothing_is_parsed() -> None:
    from opentelemetry.trace import INVALID_SPAN

    class Untouchable:
        @property
        def message(self) -> Any:
            raise AssertionError("read a record for a span nobody records")

    link_requests(INVALID_SPAN, [Untouchable()], [])
