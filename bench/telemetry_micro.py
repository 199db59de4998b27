"""What the shim's telemetry costs one request, in µs of CPU, without I/O:

    .venv/bin/python bench/telemetry_micro.py [--n 20000]

Drives gateway_shim/telemetry.py as ``Exchange.finish`` does (the sums, then
the deferred histograms, span ends and access line) for a finished admitted
request, under: no providers (the API's no-ops), the Prometheus reader
(``telemetry.metrics: true``), and that plus a tracer provider sampling 10 %
into a discarding exporter; with the access line off and on (to /dev/null).
Each figure is the median of 5 rounds, minus an empty loop's."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opentelemetry import context as otel_context  # noqa: E402
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult  # noqa: E402
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio  # noqa: E402

from gateway_shim import telemetry  # noqa: E402
from gateway_shim.keystore import KeyRecord  # noqa: E402
from gateway_shim.lifecycle import Exchange, Lifecycle  # noqa: E402
from gateway_shim.metering import RequestMeter  # noqa: E402
from gateway_shim.routes import match_route  # noqa: E402
from gateway_shim.usage import Usage  # noqa: E402
from quotameter.config import load_config  # noqa: E402
from quotameter.events import UsageSource  # noqa: E402
from telemetry import logs, setup  # noqa: E402


class _Discard(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class _Enforcer:
    """Prices as the shim's enforcer does (the cost counter), nothing else."""

    def __init__(self, config: object) -> None:
        from gateway_shim.estimates import Estimator

        self.estimator = Estimator(config)


class _Spool:
    depth = 0


class _Emitter:
    spool = _Spool()

    def oldest_undelivered_ms(self) -> None:
        return None


def _lifecycle(config: object) -> Lifecycle:
    return Lifecycle(config, None, _Enforcer(config), _Emitter())  # type: ignore[arg-type]


def _exchange(life: Lifecycle, key: KeyRecord, route: object) -> Exchange:
    exchange = Exchange(life, route, key, RequestMeter(route=route.name, upstream="http://model"))  # type: ignore[attr-defined]
    meter = exchange.meter
    meter.model_requested = meter.model_served = "mock-small"
    meter.usage = Usage(input_tokens=120, output_tokens=48, source=UsageSource.UPSTREAM)
    exchange.admission_s, exchange.upstream_s, exchange.upstream_status = 0.0004, 0.012, 200
    return exchange


async def _round(life: Lifecycle, key: KeyRecord, route: object, n: int, record: bool) -> float:
    """µs per request of building an exchange and (with ``record``) the telemetry of its end."""
    tel = life.telemetry
    began = time.perf_counter()
    for i in range(n):
        exchange = _exchange(life, key, route)
        if record:
            span = tel.server_span("POST", route.name, route.name)  # type: ignore[attr-defined]
            token = None if span is None else otel_context.attach(trace.set_span_in_context(span))
            exchange.span = span
            with logs.request_context(exchange.meter.event_id, key.customer, key.key_id):
                admit = tel.child(exchange, "quotameter.admit")
                if admit is not None:
                    admit.end()
                exchange.calling_upstream()
                exchange.upstream_done()
                settle = tel.child(exchange, "quotameter.settle")
                if settle is not None:
                    settle.end()
                exchange.traceparent()
                tel.finished(exchange)
            if token is not None:
                otel_context.detach(token)
        if i % 64 == 0:
            await asyncio.sleep(0)  # the deferred recordings run
    await asyncio.sleep(0)
    return (time.perf_counter() - began) / n * 1e6


def measure(label: str, life: Lifecycle, key: KeyRecord, route: object, n: int) -> float:
    async def rounds() -> list[float]:
        out = []
        for _ in range(5):
            base = await _round(life, key, route, n, record=False)
            out.append(await _round(life, key, route, n, record=True) - base)
        return out

    cost = statistics.median(asyncio.run(rounds()))
    print(f"  {label:<58} {cost:6.1f} µs/request", flush=True)
    return cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000, help="requests per round")
    args = parser.parse_args()
    config = load_config()
    key = KeyRecord("k1", "acme", next(iter(config.tiers)), False)
    route = match_route("POST", "/chat/completions")
    devnull = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115
    print(f"telemetry cost per request ({args.n} requests a round, median of 5):")
    logs.configure(config.telemetry.model_copy(update={"access_log": False}), "bench")
    measure("no providers (API no-ops), no access line", _lifecycle(config), key, route, args.n)
    setup.start("quotameter-shim", config.telemetry)  # Prometheus reader, as /metrics does
    measure("metrics (Prometheus reader), no access line", _lifecycle(config), key, route, args.n)
    provider = TracerProvider(sampler=ParentBasedTraceIdRatio(0.1))
    provider.add_span_processor(BatchSpanProcessor(_Discard()))
    trace.set_tracer_provider(provider)
    measure("metrics + traces sampled at 10 %, no access line", _lifecycle(config), key, route, args.n)
    for log_format in ("console", "json"):
        logs.configure(config.telemetry.model_copy(update={"access_log": True, "log_format": log_format}), "bench")
        root = logging.getLogger()
        formatter = root.handlers[0].formatter
        root.handlers[0] = devnull
        devnull.setFormatter(formatter)
        measure(f"metrics + traces 10 % + access line ({log_format}, to /dev/null)", _lifecycle(config), key, route,
                args.n)
    provider.shutdown()
    setup.shutdown()


if __name__ == "__main__":
    main()
