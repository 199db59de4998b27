"""gateway_shim/otel_histograms.py against the SDK it patches: the shortcut
gives the same points as the SDK's own path, and steps aside where it must."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.metrics.view import View

from gateway_shim.otel_histograms import FastHistogram

CHAT = {"route": "chat", "outcome": "admitted"}
REFUSED = {"route": "chat", "outcome": "refused"}
VALUES = [0.0004, 0.012, 0.0004, 3.5, 0.25, 0.0001, 7.0, 0.012]


def _record_both(provider: MeterProvider) -> tuple[FastHistogram, Histogram, Histogram]:
    meter = provider.get_meter("test")
    fast_histogram = meter.create_histogram("fast-h", unit="s", explicit_bucket_boundaries_advisory=(0.001, 0.1, 1.0))
    plain = meter.create_histogram("sdk-h", unit="s", explicit_bucket_boundaries_advisory=(0.001, 0.1, 1.0))
    fast = FastHistogram(fast_histogram)
    for value in VALUES:
        for attributes in (CHAT, REFUSED):
            fast.record(value, attributes)
            plain.record(value, attributes)
    return fast, fast_histogram, plain


def _by_instrument(reader: InMemoryMetricReader) -> tuple[dict, dict]:
    fast, plain = {}, {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                target = fast if metric.name == "fast-h" else plain
                for point in metric.data.data_points:
                    target[tuple(sorted(point.attributes.items()))] = (
                        point.count, point.sum, tuple(point.bucket_counts), point.min, point.max)
    return fast, plain


def test_the_shortcut_gives_the_sdks_points_to_every_reader() -> None:
    readers = [InMemoryMetricReader(), InMemoryMetricReader()]
    provider = MeterProvider(metric_readers=readers)
    fast, _, _ = _record_both(provider)
    targets = fast._targets[id(CHAT)][1]
    assert targets is not None and len(targets) == 2  # one aggregation per reader, fed directly
    for reader in readers:
        got, expected = _by_instrument(reader)
        assert got == expected and got[tuple(sorted(CHAT.items()))][0] == len(VALUES)
    # Collected (cumulative), then more values: still the same aggregations, still equal.
    for value in VALUES:
        fast.record(value, CHAT)
    got, expected = _by_instrument(readers[0])
    assert got[tuple(sorted(CHAT.items()))][0] == 2 * len(VALUES)
    assert got[tuple(sorted(REFUSED.items()))] == expected[tuple(sorted(REFUSED.items()))]
    provider.shutdown()


def test_delta_temporality_and_filtering_views_take_the_sdks_path() -> None:
    delta = InMemoryMetricReader(preferred_temporality={Histogram: AggregationTemporality.DELTA})
    provider = MeterProvider(metric_readers=[delta])
    fast, _, _ = _record_both(provider)
    assert fast._targets[id(CHAT)][1] is None
    got, expected = _by_instrument(delta)
    assert got == expected and got[tuple(sorted(CHAT.items()))][0] == len(VALUES)
    fast.record(1.0, CHAT)  # after a delta collection: counted once, in the next one
    got, _ = _by_instrument(delta)
    assert got[tuple(sorted(CHAT.items()))][0] == 1
    provider.shutdown()

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], views=[View(instrument_name="fast-h", attribute_keys={"route"})])
    fast, _, _ = _record_both(provider)
    assert fast._targets[id(CHAT)][1] is None
    got, _ = _by_instrument(reader)
    assert got == {(("route", "chat"),): got[(("route", "chat"),)]} and got[(("route", "chat"),)][0] == 2 * len(VALUES)
    provider.shutdown()


def test_without_a_reader_nothing_is_done() -> None:
    provider = MeterProvider(metric_readers=[])
    fast, _, _ = _record_both(provider)
    assert fast._targets[id(CHAT)][1] == []
    provider.shutdown()
