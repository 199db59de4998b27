"""What the worker's telemetry costs per event, beside what processing an event costs.

    .venv/bin/python bench/worker_telemetry_bench.py     # about 20 s

In this process, with the providers the worker sets up (telemetry.setup:
a Prometheus reader; and, for the traced rows, a tracer provider whose
spans go to an exporter that drops them), it times per batch size:

- the floor of processing one event: ``decode_event`` + ``price_event``, the
  pure part of the worker's per-event work (the whole worker costs far more:
  about 210 µs per event at its 4.7k events/s in bench/README.md);
- everything pipeline/telemetry.py and pipeline/tracing.py add per batch:
  the events counter and batch size, both freshness observations (with the
  ``min`` over the batch's event times), one ledger insert's duration, the
  batch span, its two stage spans and the request links;
  untraced (no OTLP endpoint, the default) and traced with every event
  carrying a sampled ``traceparent`` header (the worst case: one link each,
  up to 128).

It prints the added cost per event and as a share of both the floor and the
whole worker's cost per event.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult  # noqa: E402

import telemetry.setup  # noqa: E402
from pipeline import telemetry as worker_telemetry  # noqa: E402
from pipeline import tracing  # noqa: E402
from quotameter.aggregate import price_event  # noqa: E402
from quotameter.config import DEFAULT_CONFIG, Telemetry, load_config  # noqa: E402
from quotameter.events import RequestData, UsageEvent, decode_event, encode_event  # noqa: E402
from quotameter.pricing import PriceTable  # noqa: E402

WORKER_US_PER_EVENT = 1e6 / 4748  # bench/README.md, pipeline_bench.py: the worker until all in the ledger
BATCH_SIZES = (1, 10, 100, 1000, 5000)
EVENTS_PER_RUN = 20_000


class Dropped(SpanExporter):
    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def events(n: int) -> list[Any]:
    """Faust-shaped records (``.message.headers``, ``.value``) of realistic events."""
    out = []
    for i in range(n):
        event = UsageEvent(
            id=f"ev-{i:08d}", source="bench", subject=f"c{i % 500}", time=datetime.now(UTC),
            data=RequestData(api_key_id="key-1", tier="pro", route="/v1/chat/completions", status=200,
                             decision="admitted", model_requested="gpt-4o-mini", model_served="gpt-4o-mini",
                             usage_source="upstream", latency_ms=12.5, input_tokens=1000 + i % 97, output_tokens=200),
        )
        headers = [("traceparent", f"00-{i + 1:032x}-{i + 1:016x}-01".encode())]
        out.append(SimpleNamespace(message=SimpleNamespace(headers=headers), value=encode_event(event), event=event,
                                   time_ms=event.time_ms))  # as pipeline's Delivered keeps it
    return out


def per_event_us(run: Callable[[list[Any]], None], records: list[Any], batch: int) -> float:
    batches = [records[i : i + batch] for i in range(0, len(records), batch)]
    began = time.perf_counter()
    for chunk in batches:
        run(chunk)
    return (time.perf_counter() - began) / len(records) * 1e6


def telemetry_of_batch(chunk: list[Any]) -> None:
    """What the worker's code adds per batch (pipeline.usage_agent, ledger_sink)."""
    now_ms = time.time_ns() // 1_000_000
    with tracing.batch_span("events", "bench") as span:
        tracing.link_requests(span, chunk, (r.event for r in chunk))
        with tracing.stage_span("quotameter.redis_write"):
            pass
        oldest_ms = min(r.time_ms for r in chunk)
        worker_telemetry.freshness("redis", oldest_ms, now_ms)
        batch = tracing.current_context()
    worker_telemetry.batch(len(chunk), len(chunk), 0, 0, 0)
    with tracing.insert_span([batch] if batch else []):
        worker_telemetry.ledger_insert(0.01, failed=False)
    worker_telemetry.freshness("ledger", oldest_ms, now_ms)


def main() -> None:
    config = load_config(DEFAULT_CONFIG)  # the example config's prices
    prices = PriceTable(list(config.prices), config.default_price)
    telemetry.setup.start("quotameter-worker", Telemetry())
    records = events(EVENTS_PER_RUN)

    def process(chunk: list[Any]) -> None:
        for record in chunk:
            price_event(decode_event(record.value), prices)

    floor_us = min(per_event_us(process, records, 1000) for _ in range(3))
    print(f"floor, decode + price: {floor_us:.2f} µs/event; whole worker (bench/README): {WORKER_US_PER_EVENT:.0f} µs/event")
    rows = []
    for traced in (False, True):
        if traced:
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(Dropped()))
            trace.set_tracer_provider(provider)
        for batch in BATCH_SIZES:
            added = min(per_event_us(telemetry_of_batch, records, batch) for _ in range(3))
            rows.append((traced, batch, added))
    print("| traced | batch | added µs/event | of the floor | of the worker |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for traced, batch, added in rows:
        print(f"| {'yes' if traced else 'no'} | {batch} | {added:.2f} | {added / floor_us:.1%} | {added / WORKER_US_PER_EVENT:.2%} |")


if __name__ == "__main__":
    main()
