"""The process's OpenTelemetry providers, configured the standard way.

The config says only what is the product's to say (serve ``/metrics``);
exporters, sampling and the resource come from the ``OTEL_*`` variables an
operator already sets for every other service (OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES, OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]ENDPOINT,
OTEL_TRACES_SAMPLER[_ARG], OTEL_METRIC_EXPORT_INTERVAL, OTEL_SDK_DISABLED).

Without an OTLP endpoint no tracer provider is set: the API's tracer then
hands out non-recording spans, which cost a few hundred nanoseconds, so an
instrumented request pays for tracing only where someone collects traces.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from quotameter import __version__
from quotameter.config import Telemetry

log = logging.getLogger("telemetry")

_meter_provider: MeterProvider | None = None
_tracer_provider: TracerProvider | None = None


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def _exports(signal: str) -> bool:
    """Whether OTLP export of ``signal`` (traces, metrics) is asked for."""
    if _env(f"OTEL_{signal.upper()}_EXPORTER").lower() == "none":
        return False
    return bool(_env("OTEL_EXPORTER_OTLP_ENDPOINT") or _env(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT"))


def resource(service: str) -> Resource:
    """Who is reporting: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over ours."""
    ours = Resource({
        "service.name": service,
        "service.namespace": "quotameter",
        "service.version": __version__,
        "service.instance.id": f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
    })
    theirs = Resource.create({})  # the environment's (and the SDK's defaults)
    named = {"service.name": _env("OTEL_SERVICE_NAME")} if _env("OTEL_SERVICE_NAME") else {}
    return ours.merge(Resource({k: v for k, v in theirs.attributes.items() if k != "service.name"})).merge(Resource(named))


# xds-protos (Envoy's API, for the shim's ext_proc) carries an old copy of
# opentelemetry-proto's modules under the same names; installed after
# opentelemetry-proto, it breaks the OTLP exporters' imports.
_PROTOS_OVERWRITTEN = (
    "OTLP export is configured (OTEL_EXPORTER_OTLP_*), but the installed opentelemetry/proto modules are "
    "xds-protos's older copies, which the OTLP exporter cannot use: reinstall opentelemetry-proto after it "
    "(pip install --force-reinstall --no-deps opentelemetry-proto==<its version>; `make` does this)"
)


def _otlp_exporters() -> tuple[type, type]:
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise RuntimeError(_PROTOS_OVERWRITTEN) from exc
    return OTLPMetricExporter, OTLPSpanExporter


def start(service: str, config: Telemetry) -> None:
    """Set the global meter and tracer providers; once per process (a second
    call, e.g. a second shim in one test process, keeps the first's)."""
    global _meter_provider, _tracer_provider
    if _meter_provider is not None or _env("OTEL_SDK_DISABLED").lower() == "true":
        return
    who = resource(service)
    readers: list[MetricReader] = []
    if config.metrics:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        # Our metric names say which part they come from: no otel_scope_* labels.
        readers.append(PrometheusMetricReader(scope_info_enabled=False))
    if _exports("metrics"):
        readers.append(PeriodicExportingMetricReader(_otlp_exporters()[0]()))
    _meter_provider = MeterProvider(resource=who, metric_readers=readers)
    metrics.set_meter_provider(_meter_provider)
    if _exports("traces"):
        exporter = _otlp_exporters()[1]()
        # The sampler is the SDK's reading of OTEL_TRACES_SAMPLER[_ARG]
        # (unset: parentbased_always_on).
        _tracer_provider = TracerProvider(resource=who)
        _tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(_tracer_provider)
    log.debug("telemetry: metrics %s, OTLP metrics %s, OTLP traces %s", config.metrics, _exports("metrics"),
              _tracer_provider is not None)


def shutdown() -> None:
    """Flush what the exporters hold (spans in a batch, the last metric interval)."""
    global _meter_provider, _tracer_provider
    if _tracer_provider is not None:
        _tracer_provider.shutdown()
    if _meter_provider is not None:
        _meter_provider.shutdown()
    _tracer_provider = _meter_provider = None
