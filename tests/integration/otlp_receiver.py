"""A small OTLP/HTTP receiver on 127.0.0.1, what a collector would be to the
shim and the worker: ``POST /v1/traces`` and ``/v1/metrics`` bodies
(protobuf, gzip or not) decoded with opentelemetry-proto and kept in order.

    async with OtlpReceiver() as receiver:
        env = receiver.env()            # OTEL_* for the process under test
        spans = await receiver.wait_for_spans(lambda spans: ..., timeout_s=10)

As a fixture: ``otlp_receiver`` (one per test module).
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest_asyncio
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan

from quotameter.embedded.procs import free_port


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


def attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: any_value(pair.value) for pair in pairs}


@dataclass(frozen=True)
class Span:
    """One received span, its ids as hex (as a traceparent writes them)."""

    name: str
    kind: str  # SERVER, CLIENT, INTERNAL, CONSUMER, PRODUCER
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status_code: int
    start_ns: int
    end_ns: int
    links: tuple[tuple[str, str], ...]  # (trace id, span id) of each link


@dataclass(frozen=True)
class Point:
    """One metric data point: a sum's or gauge's value, a histogram's count and sum."""

    name: str
    unit: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    value: float | None = None
    count: int | None = None
    sum: float | None = None


def _kind(value: int) -> str:
    return ProtoSpan.SpanKind.Name(value).removeprefix("SPAN_KIND_")


class OtlpReceiver:
    def __init__(self) -> None:
        self.port = free_port()
        self.spans: list[Span] = []
        self.exports: list[list[Point]] = []  # one list of points per metrics export
        self._runner: web.AppRunner | None = None
        self._arrived = asyncio.Event()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        """What a process needs to export here at once: OTLP/HTTP, short intervals."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_METRIC_EXPORT_INTERVAL": "500",  # ms
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms, spans batched this long
            **extra,
        }

    async def __aenter__(self) -> OtlpReceiver:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @staticmethod
    async def _body(request: web.Request) -> bytes:
        raw = await request.read()
        return gzip.decompress(raw) if request.headers.get("Content-Encoding") == "gzip" else raw

    async def _traces(self, request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest.FromString(await self._body(request))
        for resource_spans in message.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(Span(
                        span.name, _kind(span.kind), span.trace_id.hex(), span.span_id.hex(),
                        span.parent_span_id.hex(), attributes(span.attributes), resource, span.status.code,
                        span.start_time_unix_nano, span.end_time_unix_nano,
                        tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
                    ))
        self._arrived.set()
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def _metrics(self, request: web.Request) -> web.Response:
        message = ExportMetricsServiceRequest.FromString(await self._body(request))
        points: list[Point] = []
        for resource_metrics in message.resource_metrics:
            resource = attributes(resource_metrics.resource.attributes)
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    data = metric.WhichOneof("data")
                    for point in getattr(metric, data).data_points:
                        labels = attributes(point.attributes)
                        if data == "histogram":
                            points.append(Point(metric.name, metric.unit, labels, resource,
                                                count=point.count, sum=point.sum))
                        else:
                            number = point.as_int if point.WhichOneof("value") == "as_int" else point.as_double
                            points.append(Point(metric.name, metric.unit, labels, resource, value=number))
        self.exports.append(points)
        self._arrived.set()
        return web.Response(body=ExportMetricsServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def wait_for(self, ready: Callable[[], Any], timeout_s: float, what: str) -> Any:
        """Wait until ``ready()`` is truthy as exports arrive; its value, or an AssertionError."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = ready()
            if found:
                return found
            left = deadline - time.monotonic()
            assert left > 0, f"no {what} over OTLP within {timeout_s:.0f}s ({len(self.spans)} spans, " \
                             f"{len(self.exports)} metric exports received)"
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), min(left, 0.5))
            except TimeoutError:
                pass

    def latest_points(self, name: str) -> list[Point]:
        """``name``'s points in the last export that had it (cumulative: the totals so far)."""
        for points in reversed(self.exports):
            found = [p for p in points if p.name == name]
            if found:
                return found
        return []


@pytest_asyncio.fixture(scope="module")
async def otlp_receiver() -> AsyncIterator[OtlpReceiver]:
    async with OtlpReceiver() as receiver:
        yield receiver

