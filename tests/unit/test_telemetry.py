"""telemetry/: log lines, the trace context carried by events, the providers."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from quotameter.config import Telemetry
from telemetry import context, logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logs.configure  # noqa: B018 - the module keeps its access flag; reset it
    logs._access_enabled = True


def test_json_lines_carry_the_request_and_the_span(capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    logs.configure(Telemetry(log_format="json"), "quotameter-shim")
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("request") as span, logs.request_context("ev-1", "acme", "key-9"):
        logging.getLogger("gateway_shim.proxy").warning("upstream said %s", "no")
        logs.access(method="POST", path="/v1/chat/completions", status=429, outcome="refused", reason="rate_limited",
                    input_tokens=0)
    logging.getLogger("x").info("outside")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    ids = span.get_span_context()
    assert lines[0] == {"time": lines[0]["time"], "level": "WARNING", "logger": "gateway_shim.proxy",
                        "message": "upstream said no", "request_id": "ev-1", "customer": "acme", "key_id": "key-9",
                        "trace_id": f"{ids.trace_id:032x}", "span_id": f"{ids.span_id:016x}"}
    assert lines[0]["time"].endswith("+00:00") and len(lines[0]["time"]) == 29
    assert lines[1]["logger"] == "quotameter.access" and lines[1]["message"] == "POST /v1/chat/completions 429 refused"
    assert (lines[1]["status"], lines[1]["reason"], lines[1]["input_tokens"]) == (429, "rate_limited", 0)
    assert lines[2]["message"] == "outside" and "request_id" not in lines[2] and "trace_id" not in lines[2]


def test_the_console_shows_an_access_line_with_its_fields(capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    logs.configure(Telemetry(), "quotameter-shim")
    logs.access(method="POST", path="/v1/responses", status=200, outcome="admitted", reason="", tokens="17/11")
    line = capsys.readouterr().err.strip()
    assert line.endswith("INFO quotameter.access: POST /v1/responses 200 admitted tokens=17/11"), line


def test_the_access_log_can_be_turned_off(capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    logs.configure(Telemetry(log_format="json", access_log=False), "quotameter-shim")
    logs.access(method="GET", path="/", status=404, outcome="error")
    logging.getLogger("x").info("still logging")
    assert [json.loads(line)["message"] for line in capsys.readouterr().err.splitlines()] == ["still logging"]


def test_a_sampled_span_travels_as_traceparent_and_an_unsampled_one_not() -> None:
    assert context.inject_traceparent() is None  # no span at all
    with TracerProvider().get_tracer("t").start_as_current_span("s") as span:
        carried = context.inject_traceparent()
    ids = span.get_span_context()
    assert ids.trace_flags.sampled and carried == f"00-{ids.trace_id:032x}-{ids.span_id:016x}-{int(ids.trace_flags):02x}"
    linked = context.span_context_of(carried.encode())
    assert linked is not None and (linked.trace_id, linked.span_id, linked.is_remote) == (ids.trace_id, ids.span_id, True)
    with TracerProvider(sampler=ALWAYS_OFF).get_tracer("t").start_as_current_span("s"):
        assert context.inject_traceparent() is None
    for bad in (None, "", "00-zz-01", "00-" + "0" * 32 + "-" + "1" * 16 + "-01"):
        assert context.extract(bad) is None


def _run(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={**clean, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout


PROVIDERS = """
from opentelemetry import metrics, trace
from quotameter.config import Telemetry
from telemetry import prometheus, setup
setup.start("quotameter-shim", Telemetry(metrics={metrics}))
setup.start("quotameter-worker", Telemetry())  # a second start keeps the first
metrics.get_meter("quotameter.shim").create_counter("quotameter.shim.requests", unit="{{request}}").add(3, {{"route": "chat"}})
print(prometheus.exposition().decode())
print("tracing:", trace.get_tracer("t").start_span("s").is_recording())
"""


def test_start_serves_metrics_to_prometheus_and_traces_only_with_an_endpoint() -> None:
    text = _run(PROVIDERS.format(metrics=True))
    assert 'quotameter_shim_requests_total{route="chat"} 3.0' in text
    assert 'service_name="quotameter-shim"' in text and 'service_namespace="quotameter"' in text
    assert "tracing: False" in text
    assert "quotameter_shim_requests" not in _run(PROVIDERS.format(metrics=False))
    named = _run(PROVIDERS.format(metrics=True), OTEL_SERVICE_NAME="shim-eu-1",
                 OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", OTEL_METRIC_EXPORT_INTERVAL="600000")
    assert 'service_name="shim-eu-1"' in named and "tracing: True" in named
    assert "tracing: False" in _run(PROVIDERS.format(metrics=True), OTEL_SDK_DISABLED="true")
