"""The worker's metrics (meter ``quotameter.worker``) and the calls that record them.

The worker handles thousands of events a second and an OpenTelemetry
``record``/``add`` costs a few microseconds, so everything here is recorded
once per batch (or per ledger insert, per alert, per webhook attempt), never
once per event: a batch of any size costs the same handful of calls.

    quotameter.worker.events            Counter {event}, ``outcome``: each record read
                                        counts once, under one outcome (their sum is
                                        what was read): consumed (applied on time),
                                        late (applied, older than the late grace),
                                        duplicate (an id already applied), dead_lettered
    quotameter.worker.batch.size        Histogram {event}: records per batch
    quotameter.worker.consumer.lag      Observable gauge {record}, ``topic``, ``partition``
                                        (pipeline.consumer_lag)
    quotameter.worker.freshness         Histogram s, ``target`` (redis, ledger): one
                                        observation per write, the delay of its oldest
                                        event (event time → written): the worst freshness
                                        of the events that write made visible
    quotameter.worker.ledger.insert.duration   Histogram s, each insert attempt
    quotameter.worker.ledger.insert.failures   Counter {failure}, each failed attempt
    quotameter.worker.alerts.fired      Counter {alert}, ``kind``
    quotameter.worker.webhook.deliveries Counter {delivery}, ``outcome``: delivered,
                                        failed (given up or rejected), retried (an
                                        attempt that failed and is tried again)

No attribute names a customer, a key or an event: the series stay few.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

# Seconds from 5 ms to a day: freshness is sub-second when all is well, and a
# spooled event replayed after an outage is hours old.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21_600, 86_400)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000)

_meter = metrics.get_meter("quotameter.worker")
_events = _meter.create_counter("quotameter.worker.events", "{event}", "Records read from the events topic, by outcome")
_batch_size = _meter.create_histogram(
    "quotameter.worker.batch.size", "{event}", "Records per batch", explicit_bucket_boundaries_advisory=BATCH_BUCKETS
)
_freshness = _meter.create_histogram(
    "quotameter.worker.freshness", "s", "Event time to written, the oldest event of each write",
    explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
)
_insert_duration = _meter.create_histogram(
    "quotameter.worker.ledger.insert.duration", "s", "One ledger INSERT attempt",
    explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
)
_insert_failures = _meter.create_counter("quotameter.worker.ledger.insert.failures", "{failure}", "Failed ledger INSERT attempts")
_alerts = _meter.create_counter("quotameter.worker.alerts.fired", "{alert}", "Threshold alerts this worker claimed")
_deliveries = _meter.create_counter("quotameter.worker.webhook.deliveries", "{delivery}", "Alert webhook attempts by outcome")

# Attribute sets built once: the SDK hashes them on every call.
_OUTCOMES = {name: {"outcome": name} for name in ("consumed", "late", "duplicate", "dead_lettered")}
_TARGETS = {name: {"target": name} for name in ("redis", "ledger")}
_DELIVERY = {name: {"outcome": name} for name in ("delivered", "failed", "retried")}

LagSource = Callable[[], Iterable[tuple[str, int, int]]]  # → (topic, partition, lag)
_lag_sources: list[LagSource] = []


def batch(read: int, applied: int, late: int, duplicates: int, dead_lettered: int) -> None:
    """One batch: ``read`` records, of which ``applied`` were new (``late`` of
    those late), ``duplicates`` already applied, ``dead_lettered`` malformed."""
    _batch_size.record(read)
    for outcome, count in (("consumed", applied - late), ("late", late), ("duplicate", duplicates),
                           ("dead_lettered", dead_lettered)):
        if count:
            _events.add(count, _OUTCOMES[outcome])


def freshness(target: str, oldest_event_ms: int, written_ms: int) -> None:
    """A write to ``target`` (redis, ledger) at ``written_ms`` whose oldest event was made at ``oldest_event_ms``."""
    _freshness.record(max(0, written_ms - oldest_event_ms) / 1000, _TARGETS[target])


def ledger_insert(duration_s: float, failed: bool) -> None:
    _insert_duration.record(duration_s)
    if failed:
        _insert_failures.add(1)


def alert_fired(kind: str) -> None:
    _alerts.add(1, {"kind": kind})


def webhook_delivery(outcome: str) -> None:
    _deliveries.add(1, _DELIVERY[outcome])


def watch_lag(source: LagSource) -> None:
    """Report ``source``'s lag per partition on every collection (one source per consumer)."""
    _lag_sources.append(source)


def _observe_lag(options: CallbackOptions) -> Iterable[Observation]:
    for source in list(_lag_sources):
        for topic, partition, lag in source():
            yield Observation(lag, {"topic": topic, "partition": partition})


_meter.create_observable_gauge(
    "quotameter.worker.consumer.lag", [_observe_lag], "{record}",
    "Records of the events topic not yet committed by this worker, per assigned partition",
)
